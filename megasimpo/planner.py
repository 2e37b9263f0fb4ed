"""Layout planner: (model, GPUs, GPU memory, sequence length, loss) -> Plan + per-GPU memory.

Pure arithmetic: no process group, no torch, no Megatron. ``plan`` enumerates every layout the
model and the world allow, predicts the peak memory of each with ``memory_breakdown`` and keeps the
fastest one that fits in ``MEMORY_FRACTION`` of the GPU, by this preference order:

1. no activation recompute (full recompute costs a second forward, ~33% more compute);
2. the smallest model-parallel size TP x PP x CP (the most data parallelism: the cheapest
   communication and the most optimizer-state sharding);
3. for sequences shorter than ``LONG_SEQUENCE``, CP=1 (context parallelism only when it is what
   makes the smaller model-parallel size fit);
4. larger micro-batches while a micro-batch holds fewer than ``TARGET_TOKENS_PER_MICROBATCH``
   tokens (bigger GEMMs; beyond that they only lengthen the pipeline bubble);
5. the smallest step overhead: pipeline bubble (pp-1)/(num_microbatches x vpp) plus
   ``VPP_STEP_COST`` per extra virtual stage (each adds a point-to-point hop per micro-batch);
6. then more CP for long sequences (less TP otherwise), larger TP, less memory.

Mixture-of-experts models (``ModelConfig.num_experts``) also get an expert layout: EP dividing
the experts, ETP 1 unless fixed (``--etp``), with ETP x EP x PP dividing the world (the expert-DP
group, world / (ETP x EP x PP), shards the experts' optimizer state). EP is not part of the
model-parallel size above (it takes its ranks from TP x CP x DP); right after recompute (1.) a
layout ranks by whether its all-to-all stays inside a node (ETP x EP <= ``gpus_per_node``: EP
across nodes only when no in-node layout fits), then, after TP x PP x CP, by the largest EP
inside a node (fewest expert weights, gradients and
optimizer state per GPU) or the smallest one across nodes. The memory model prices MoE layers'
dispatcher buffers under uniform routing plus its ``MOE_IMBALANCE`` headroom (dropless routing
is never uniform). The dispatcher is alltoall unless fixed (``--moe-dispatcher``).

Memory per layout comes from ``megasimpo.memory_model`` (its docstring has the model), the reasons
text from ``megasimpo.planner_reasons``. With LoRA (``lora``) the base is frozen: bf16 weights
only, gradients and optimizer state of the adapters, so a model plans on far fewer GPUs.
"""

import dataclasses
from dataclasses import dataclass
from typing import Optional

from megasimpo.config import (CP_BACKENDS, LOGPROB_CHUNK, LOSSES, REFERENCE_SOURCES, Layout,
                              LoraConfig, ModelConfig)
from megasimpo.memory_model import (OVERHEAD_GB, MemoryBreakdown, lora_on, memory_breakdown,
                                    model_parameters, stage_breakdowns)
from megasimpo.pipeline_split import stage_layer_counts, uneven_splits
from megasimpo.planner_reasons import describe, reasons

MEMORY_FRACTION = 0.9  # plan to this share of the GPU: the rest is the model's error margin
LONG_SEQUENCE = 16384  # from here on context parallelism is preferred over PP/TP
TARGET_TOKENS_PER_MICROBATCH = 8192  # GEMMs are saturated beyond this many tokens
VPP_STEP_COST = 0.01  # modelled step-time cost of each extra virtual pipeline stage
MICRO_BATCH_SIZES = (1, 2, 4)  # pairs per micro-batch the search tries
CP_SIZES = (1, 2, 4, 8, 16)
MIN_TOKENS_PER_CP_RANK = 1024
OVERRIDABLE = ("tp", "pp", "vpp", "cp", "micro_batch_size", "recompute", "sequence_parallel",
               "first_stage_layers", "last_stage_layers", "ep", "etp", "moe_dispatcher")
EXPERT = ("ep", "etp", "moe_dispatcher")  # the expert layout (EP is planned unless fixed)
SPLIT_MIDDLES = 3  # uneven splits: the fullest middle stages tried (``_choose_split``)
SPLIT = ("first_stage_layers", "last_stage_layers")


@dataclass(frozen=True)
class Plan:
    """A complete layout and batch split for one run, with its predicted memory and the reasons."""

    layout: Layout  # TP/PP/VPP/CP/DP sizes and sequence parallelism
    micro_batch_size: int  # pairs per micro-batch (2x sequences)
    num_microbatches: int  # micro-batches per DP rank per optimizer step
    global_batch_size: int  # pairs per optimizer step
    recompute: bool  # full activation recompute of every layer
    seq_length: int  # tokens per sequence
    loss: str  # preference loss planned for
    gpu_mem_gb: float  # memory of one GPU
    memory: MemoryBreakdown  # predicted peak per GPU (the higher of the stages)
    stages: tuple = ()  # MemoryBreakdown of the first and, when pp > 1, the last stage
    reasons: tuple = ()  # one line per choice, why it was made
    ref: str = "live"  # reference log-probs of REFERENCE_LOSSES: live frozen copy or precomputed
    logprob_chunk: int = LOGPROB_CHUNK  # fused output-layer chunk the memory model assumed
    attention_backend: str = "te"  # core attention the memory model assumed (te, sdpa, unfused)
    lora: Optional[LoraConfig] = None  # LoRA adapters planned for; None: full fine-tuning
    trainable_parameters: int = 0  # of the whole model: the adapters with LoRA, else all
    total_parameters: int = 0  # of the whole model, adapters included

    @property
    def world_size(self) -> int:
        """GPUs the plan occupies."""
        return self.layout.world_size

    @property
    def bubble(self) -> float:
        """Pipeline bubble fraction (pp-1) / (num_microbatches x vpp)."""
        return (self.layout.pp - 1) / (self.num_microbatches * self.layout.num_chunks)

    def to_dict(self) -> dict:
        """JSON/YAML form: the layout's fields at the top level (the ``plan --json`` contract),
        every other field, ``memory_gb`` with its total, budget and bubble; ``lora_rank`` 0 and
        ``lora_alpha``/``lora_targets`` None without LoRA."""
        d = dataclasses.asdict(self.layout)
        d.update({k: getattr(self, k) for k in ("micro_batch_size", "num_microbatches",
                                                "global_batch_size", "recompute", "seq_length",
                                                "loss", "ref", "logprob_chunk",
                                                "attention_backend", "gpu_mem_gb")})
        d["memory_budget_gb"] = round(MEMORY_FRACTION * self.gpu_mem_gb, 2)
        d["memory_gb"] = self.memory.to_dict()
        d["memory_peak_stage"] = self.memory.stage
        d["memory_gb_by_stage"] = {str(m.stage): m.to_dict() for m in self.stages}
        d["pipeline_bubble"] = round(self.bubble, 4)
        on = lora_on(self.lora)
        d.update(lora_rank=self.lora.rank if on else 0, lora_alpha=self.lora.alpha if on else None,
                 lora_targets=list(self.lora.targets) if on else None,
                 trainable_parameters=self.trainable_parameters,
                 total_parameters=self.total_parameters)
        d["reasons"] = list(self.reasons)
        return d


def layout_key(layout) -> tuple:
    """What identifies a layout (a Plan or a candidate dict) for ``plan(exclude=...)``."""
    if not isinstance(layout, dict):
        layout = {**dataclasses.asdict(layout.layout), "micro_batch_size": layout.micro_batch_size,
                  "recompute": layout.recompute}
    return tuple(layout.get(k) for k in ("tp", "pp", "vpp", "cp", "micro_batch_size",
                                         "recompute", "sequence_parallel", "ep") + SPLIT)


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def _layouts(model: ModelConfig, gpus: Optional[int], *, gpus_per_node: int, seq_length: int,
             global_batch_size: int, fixed: dict, lean: bool = False, cp_ok: bool = True):
    """Every valid layout as a dict (without memory). ``gpus`` None: any world size whose DP
    divides the global batch. ``lean``: only the least-memory variant of each split (no
    interleaving, smallest micro-batch, recompute unless fixed off) for the minimum-GPU search.
    ``cp_ok`` False: CP=1 only (an attention backend without context parallelism)."""
    L, heads, kv = model.num_layers, model.num_attention_heads, model.num_query_groups
    tps = [fixed["tp"]] if "tp" in fixed else [
        t for t in (2 ** i for i in range(8)) if t <= gpus_per_node and heads % t == 0
        and kv % t == 0 and (gpus is None or t <= gpus)]
    # any PP up to one layer per stage: the layers need not divide (pipeline_split.py)
    pps = [fixed["pp"]] if "pp" in fixed else sorted(
        p for p in range(1, L + 1) if gpus is None or gpus % p == 0 or L % p == 0)
    cps = [fixed["cp"]] if "cp" in fixed else [
        c for c in CP_SIZES if c == 1 or (cp_ok and seq_length // c >= MIN_TOKENS_PER_CP_RANK)]
    mbss = [fixed["micro_batch_size"]] if "micro_batch_size" in fixed else (
        MICRO_BATCH_SIZES[:1] if lean else MICRO_BATCH_SIZES)
    rcs = [fixed["recompute"]] if "recompute" in fixed else ([True] if lean else [False, True])
    for tp in tps:
        sp = fixed.get("sequence_parallel", tp > 1)
        if sp and tp == 1:
            continue
        for pp in pps:
            if "vpp" in fixed:
                vpps = [fixed["vpp"]]
            elif pp == 1 or lean:
                vpps = [None]
            elif L % pp == 0:
                vpps = [None] + [v for v in _divisors(L // pp) if v > 1 and L // (pp * v) >= 2]
            else:  # uneven: an interleaving whose chunks hold 2 layers or more somewhere
                vpps = [None] + [v for v in range(2, L // pp // 2 + 1) if uneven_splits(L, pp, v)]
            for cp in cps:
                mp = tp * pp * cp
                if seq_length % (2 * cp * (tp if sp else 1)):
                    continue  # the trainer needs whole, equal sequence shards
                if gpus is not None and gpus % mp:
                    continue
                dps = [gpus // mp] if gpus is not None else _divisors(global_batch_size)
                for dp, (ep, etp) in ((d, e) for d in dps for e in _expert_layouts(
                        model, mp * d, tp, pp, sp, fixed)):
                    for vpp in vpps:
                        if vpp and pp == 1:
                            continue
                        split = {k: fixed.get(k) for k in SPLIT}
                        if split[SPLIT[0]] is not None and not _valid(L, pp, vpp, split):
                            continue
                        if L % (pp * (vpp or 1)) and split[SPLIT[0]] is None:
                            if not uneven_splits(L, pp, vpp):
                                continue
                            split[SPLIT[0]] = "?"  # _choose_split picks it by memory
                        for mbs in mbss:
                            if global_batch_size % (mbs * dp):
                                continue
                            nm = global_batch_size // (mbs * dp)
                            if vpp and (nm < pp or nm % pp):
                                continue  # Megatron's interleaved schedule needs this
                            if pp > 1 and nm < pp and "pp" not in fixed:
                                continue  # a pipeline that is never full
                            for rc in rcs:
                                yield dict(tp=tp, pp=pp, vpp=vpp, cp=cp, dp=dp,
                                           sequence_parallel=sp, micro_batch_size=mbs,
                                           num_microbatches=nm, recompute=rc, ep=ep, etp=etp,
                                           **split)


def _expert_layouts(model: ModelConfig, world: int, tp: int, pp: int, sp: bool,
                    fixed: dict) -> list:
    """(ep, etp) pairs of a world of ``world`` ranks: dense models (1, None); MoE models every EP
    dividing the experts (or the fixed one) with ETP 1 (or the fixed one) whose expert layout
    etp x ep x pp tiles the world; Megatron needs sequence parallelism for TP > 1 with EP > 1."""
    if not model.is_moe:
        return [(1, None)]
    etp = fixed.get("etp", 1)
    eps = [fixed["ep"]] if "ep" in fixed else _divisors(model.num_experts)
    return [(ep, etp) for ep in eps if world % (etp * ep * pp) == 0
            and model.moe_ffn_hidden_size % etp == 0 and (sp or tp == 1 or ep == 1)]


def _valid(num_layers: int, pp: int, vpp, split: dict) -> bool:
    """Whether the fixed uneven ``split`` works at this pp and vpp."""
    try:
        stage_layer_counts(num_layers, pp, vpp, *(split[k] for k in SPLIT))
    except ValueError:
        return False
    return True


def _memory(model, layout: dict, work: dict) -> MemoryBreakdown:
    """Peak memory of ``layout`` for the workload ``work`` (seq_length, loss, ref,
    logprob_chunk, attention_backend); an uneven split still to choose is chosen first."""
    if layout.get(SPLIT[0]) == "?":
        _choose_split(model, layout, work)
    return memory_breakdown(model, **work, **{k: v for k, v in layout.items() if k != "memory"})


def _choose_split(model, layout: dict, work: dict) -> None:
    """Sets ``layout``'s first/last stage layers to the uneven split of least peak memory.

    Per middle-stage count (the ``SPLIT_MIDDLES`` fullest: emptier middles load the ends, which
    carry the embedding, the output layer and stage 0's deepest pipeline, more), the first
    stage's memory grows and the last stage's shrinks with the first stage's count, so the peak
    is lowest where they cross: a bisection finds it."""
    def peak(split):
        stages = stage_breakdowns(model, **work, **{**layout, SPLIT[0]: split[0],
                                                    SPLIT[1]: split[2]})
        return stages[0].total, stages[-1].total, max(m.total for m in stages)

    splits = uneven_splits(model.num_layers, layout["pp"], layout["vpp"])
    middles = sorted({s[1] for s in splits}, key=lambda m: -(m or 0))[:SPLIT_MIDDLES]
    best = None
    for middle in middles:
        group = [s for s in splits if s[1] == middle]  # ascending first-stage count
        lo, hi = 0, len(group) - 1
        while lo < hi:  # the first split whose first stage outweighs its last
            mid = (lo + hi) // 2
            first, last, _ = peak(group[mid])
            lo, hi = (lo, mid) if first >= last else (mid + 1, hi)
        for s in group[max(lo - 1, 0):lo + 1]:
            if best is None or peak(s)[2] < best[0]:
                best = (peak(s)[2], s)
    layout[SPLIT[0]], layout[SPLIT[1]] = best[1][0], best[1][2]


def _rank(c: dict, seq_length: int, num_layers: int, gpus_per_node: int = 8) -> tuple:
    """Sort key: lower is faster (see the module docstring)."""
    ep_ranks = c.get("ep", 1) * (c.get("etp") or c["tp"])
    cross_node = c.get("ep", 1) > 1 and ep_ranks > gpus_per_node
    long_seq = seq_length >= LONG_SEQUENCE
    tokens = 2 * c["micro_batch_size"] * seq_length // c["cp"]
    vpp = c["vpp"] or 1
    overhead = (c["pp"] - 1) / (c["num_microbatches"] * vpp) + VPP_STEP_COST * (vpp - 1)
    if c.get(SPLIT[0]) is not None:  # an uneven pipeline runs at its fullest stage's pace
        counts = stage_layer_counts(num_layers, c["pp"], c["vpp"], c[SPLIT[0]], c[SPLIT[1]])
        overhead += max(counts) * c["pp"] / sum(counts) - 1
    return (c["recompute"], cross_node, c["tp"] * c["pp"] * c["cp"],
            ep_ranks if cross_node else -c.get("ep", 1), c["cp"] > 1 and not long_seq,
            -min(tokens, TARGET_TOKENS_PER_MICROBATCH), round(overhead, 6),
            -c["cp"] if long_seq else c["cp"], -c["tp"], c["memory"].total)


def _check_overrides(model: ModelConfig, gpus: int, overrides: dict) -> dict:
    """The overrides that are set, normalized (vpp 1 -> None); ValueError naming bad values."""
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"unknown plan override(s) {', '.join(unknown)}; known: "
                         + ", ".join(OVERRIDABLE))
    fixed = {k: v for k, v in overrides.items() if v is not None}
    if fixed.get("vpp") == 1:
        fixed["vpp"] = None
    for k in ("tp", "pp", "cp", "micro_batch_size"):
        if k in fixed and fixed[k] < 1:
            raise ValueError(f"--{k.replace('_', '-')} {fixed[k]} must be >= 1")
    if fixed.get("vpp") is not None and fixed["vpp"] < 1:
        raise ValueError(f"--vpp {fixed['vpp']} must be >= 1")
    # Layout.resolve words the structural errors (divisibility by heads, layers, world).
    lay = Layout.resolve(model, gpus, tp=fixed.get("tp", 1), pp=fixed.get("pp", 1),
                         vpp=fixed.get("vpp") if "pp" in fixed else None, cp=fixed.get("cp", 1),
                         sequence_parallel=fixed.get("sequence_parallel") if "tp" in fixed
                         else None, **{k: fixed.get(k) for k in SPLIT},
                         **{k: fixed[k] for k in EXPERT if k in fixed and k != "etp"},
                         **({"etp": fixed["etp"]} if "etp" in fixed else {}),
                         **({"etp": 1} if model.is_moe and "etp" not in fixed else {}))
    if any(k in fixed for k in SPLIT):  # at PP=2 one count gives the other
        fixed.update({k: getattr(lay, k) for k in SPLIT})
    return fixed


def _no_layout_message(what: str, gpus: int, fixed: dict, global_batch_size: int) -> str:
    """Why no layout exists at all: the global batch does not split into DP x micro-batches."""
    mbs = fixed.get("micro_batch_size")
    if mbs and global_batch_size % mbs:
        return (f"--global-batch-size {global_batch_size} is not a multiple of "
                f"--micro-batch-size {mbs}: every data-parallel rank runs whole micro-batches; "
                f"choose a global batch that DP x {mbs} divides, or another micro-batch size")
    model_ranks = fixed.get("tp", 1) * fixed.get("pp", 1) * fixed.get("cp", 1)
    dp = gpus // model_ranks if gpus % model_ranks == 0 else None
    if dp and global_batch_size % (dp * (mbs or 1)):
        return (f"--global-batch-size {global_batch_size} is not divisible by data-parallel size "
                f"{dp} x micro-batch {mbs or 1} = {dp * (mbs or 1)} ({gpus} GPUs / "
                f"{model_ranks} per model replica); choose a multiple of {dp * (mbs or 1)}")
    return (f"no valid layout for {what} on {gpus} GPUs with a global batch of "
            f"{global_batch_size} pairs: the GPU count must be TP x PP x CP x DP and DP x "
            "micro-batch must divide the global batch; relax the fixed flags")


def _no_fit_message(model, gpus, budget, gpu_mem_gb, work, fixed, search) -> str:
    """Why nothing fits, with the minimum (or nearest) GPU count that would work."""
    loss, seq_length, lora = work["loss"], work["seq_length"], work["lora"]
    n = model.num_parameters
    size = f"{n / 1e9:.1f} B" if n >= 1e8 else f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"
    what = (f"the model ({size} parameters, {loss}, seq {seq_length}"
            + (f", LoRA r={lora.rank}" if lora_on(lora) else "")
            + "".join(f", {k}={v}" for k, v in fixed.items()) + ")")
    mem = f"GPUs of {gpu_mem_gb:g} GB (budget {budget:.1f} GB = {MEMORY_FRACTION:.0%})"
    works, leanest = set(), None
    for c in _layouts(model, None, fixed=fixed, lean=True, **search):
        c["memory"] = _memory(model, c, work)
        if leanest is None or c["memory"].total < leanest["memory"].total:
            leanest = c
        if c["memory"].total <= budget:
            works.add(c["tp"] * c["pp"] * c["cp"] * c["dp"])
    if not works:
        if leanest is None:
            return _no_layout_message(what, gpus, fixed, search["global_batch_size"])
        return (f"{what} does not fit on {mem} at any GPU count: the leanest layout "
                f"({describe(leanest)}) needs {leanest['memory'].total:.1f} GB per GPU; "
                "use GPUs with more memory or a shorter --seq-length")
    minimum = min(works)
    if gpus < minimum:
        example = plan(model, minimum, gpu_mem_gb=gpu_mem_gb, overrides=fixed,
                       gpus_per_node=search["gpus_per_node"],
                       global_batch_size=search["global_batch_size"], **work)
        return (f"{what} needs at least {minimum} {mem}; got --gpus {gpus} (on {minimum}: "
                f"tp={example.layout.tp} pp={example.layout.pp} cp={example.layout.cp} "
                f"dp={example.layout.dp}, "
                f"{example.memory.total:.1f} GB per GPU)")
    below = max(w for w in works if w <= gpus)
    above = [w for w in sorted(works) if w > gpus][:1]
    near = f"{below}" + (f" or {above[0]}" if above else "")
    return (f"no layout of {what} fits --gpus {gpus} on {mem}: the GPU count must be TP x PP x CP "
            f"x DP with DP x micro-batch dividing the global batch of "
            f"{search['global_batch_size']} pairs; nearest GPU counts that work: {near} "
            f"(minimum {minimum})")

def plan(model: ModelConfig, gpus: int, *, gpus_per_node: int = 8, gpu_mem_gb: float = 80.0,
         seq_length: int = 4096, loss: str = "simpo", ref: str = "live",
         logprob_chunk: int = LOGPROB_CHUNK, attention_backend: str = "te",
         global_batch_size: int = 128, overrides: Optional[dict] = None,
         exclude: tuple = (), lora: Optional[LoraConfig] = None) -> Plan:
    """The fastest layout that fits (see the module docstring for the order of preference).

    ``overrides`` fixes any of tp, pp, vpp, cp, micro_batch_size, recompute, sequence_parallel
    (None values are ignored) and the rest is planned around them; layouts in ``exclude``
    (Plans, e.g. ones a simulation refused) are not considered. ``attention_backend`` (te,
    sdpa or unfused: the one the run will use) decides whether attention scores take memory;
    ``lora`` (a LoraConfig, None or rank 0: full fine-tuning) freezes the base for adapters.
    Raises ValueError when nothing fits, naming the
    minimum (or nearest) GPU count that would work.
    """
    for name, value in (("--gpus", gpus), ("--gpus-per-node", gpus_per_node),
                        ("--seq-length", seq_length), ("--global-batch-size", global_batch_size)):
        if value < 1:
            raise ValueError(f"{name} {value} must be >= 1")
    if gpu_mem_gb <= OVERHEAD_GB / MEMORY_FRACTION:
        raise ValueError(f"--gpu-mem-gb {gpu_mem_gb:g} is too small (the fixed overhead alone "
                         f"is {OVERHEAD_GB:g} GB)")
    if loss not in LOSSES:
        raise ValueError(f"--loss {loss!r} is not one of {', '.join(LOSSES)}")
    if ref not in REFERENCE_SOURCES:
        raise ValueError(f"--ref {ref!r} must be 'live' or 'precomputed'")
    if attention_backend not in ("te", "sdpa", "unfused"):
        raise ValueError(f"attention backend {attention_backend!r} must be te, sdpa or unfused "
                         "(resolve auto first)")
    fixed = _check_overrides(model, gpus, dict(overrides or {}))
    cp_ok = attention_backend in CP_BACKENDS
    if fixed.get("cp", 1) > 1 and not cp_ok:
        raise ValueError(f"--attention-backend {attention_backend} has no context parallelism "
                         f"(--cp {fixed['cp']}); use --attention-backend sdpa or te")
    lora = lora if lora_on(lora) else None
    budget = MEMORY_FRACTION * gpu_mem_gb
    search = dict(gpus_per_node=gpus_per_node, seq_length=seq_length,
                  global_batch_size=global_batch_size, cp_ok=cp_ok)
    work = dict(seq_length=seq_length, loss=loss, ref=ref, logprob_chunk=logprob_chunk,
                attention_backend=attention_backend, lora=lora)
    candidates = [c for c in _layouts(model, gpus, fixed=fixed, **search)
                  if layout_key(c) not in {layout_key(x) for x in exclude}]
    for c in candidates:
        c["memory"] = _memory(model, c, work)
    feasible = [c for c in candidates if c["memory"].total <= budget]
    if not feasible:
        raise ValueError(_no_fit_message(model, gpus, budget, gpu_mem_gb, work, fixed, search))
    best = min(feasible, key=lambda c: _rank(c, seq_length, model.num_layers, gpus_per_node))
    why = reasons(model, best, candidates, fixed, gpus=gpus, gpus_per_node=gpus_per_node,
                  budget=budget, gpu_mem_gb=gpu_mem_gb, seq_length=seq_length, loss=loss, ref=ref,
                  global_batch_size=global_batch_size, long_sequence=LONG_SEQUENCE, lora=lora,
                  cp_backend=None if cp_ok else attention_backend)
    trainable, total = model_parameters(model, lora)
    layout = {k: v for k, v in best.items() if k != "memory"}
    split = {k: layout.pop(k) for k in ("tp", "pp", "vpp", "cp", "dp", "sequence_parallel")
             + SPLIT}
    expert = {k: layout.pop(k) for k in ("ep", "etp")}
    dispatcher = {"moe_dispatcher": fixed["moe_dispatcher"]} if "moe_dispatcher" in fixed else {}
    return Plan(layout=Layout(**split, **expert, **dispatcher), **layout, global_batch_size=global_batch_size,
                seq_length=seq_length, loss=loss, gpu_mem_gb=gpu_mem_gb, memory=best["memory"],
                stages=stage_breakdowns(model, **work, **split, **expert, **layout),
                reasons=tuple(why),
                ref=ref, logprob_chunk=logprob_chunk, attention_backend=attention_backend,
                lora=lora, trainable_parameters=trainable, total_parameters=total)
