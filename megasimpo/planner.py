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

Memory model, bytes per GPU on the pipeline stage with the highest total (first or last):

* parameters per GPU: the stage's layers / TP (norm weights replicated), plus the (padded)
  embedding / TP on the first stage and the output layer / TP on the last (tied embeddings are
  kept on both ends when PP > 1, as Megatron does);
* Megatron's distributed optimizer: bf16 weights 2 B + fp32 main gradients 4 B
  (``grad_reduce_in_fp32``) + fp32 master weights and Adam m, v 12 B / (DP x CP) (the optimizer
  shards over the data-parallel group including CP ranks), i.e. 6 + 12/(DP*CP) B per parameter;
* live DPO reference (``dpo``, ``ipo``, ``rdpo`` with ``ref="live"``): a frozen bf16 copy at the
  same sharding, 2 B per parameter. Its forward-only pass runs before the policy's and frees its
  activations, so it adds no activation memory;
* activations per layer per micro-batch (Korthikanti et al. 2022, "Reducing Activation
  Recomputation", re-derived for a Llama layer with Transformer Engine flash attention: no
  dropout masks, no s^2 scores, SwiGLU, GQA with g = KV heads / heads), with s = seq/CP tokens and
  b = 2 x micro-batch sequences (chosen and rejected), in bf16:
  ``s*b*((12 + 4g)*h + 6*f)`` bytes = two norm inputs, QKV input, Q, K and V, attention output,
  fc1 input (each s*b*h, K and V g times that), the SwiGLU input [s, b, 2f] and fc2 input [s, b, f].
  Sequence parallelism shards all of it over TP; without it the norm inputs, QKV input and fc1
  input (8*s*b*h) are replicated. ~34*s*b*h for Llama-3 (g = 1/8, f = 3.5h), Korthikanti's 34 too.
  Full recompute keeps only each layer's input (2*s*b*h / TP with SP). One extra layer's worth is
  the working set of the layer being (re)computed and back-propagated;
* in-flight micro-batches (Megatron's schedules): without pipelining 1; 1F1B stage r holds
  min(pp - r, num_microbatches); interleaved stage r holds min(2*(pp-r-1) + (vpp-1)*pp + 1,
  num_microbatches*vpp) model chunks of layers/(pp*vpp) layers. Stage 0 thus holds all layers'
  activations of ~one micro-batch (x (1 + (pp-1)/(pp*vpp)) when interleaved);
* last stage, plain path (``logprob_chunk`` 0): logits [2*mbs, s, v/TP] at 10 B per element (bf16
  output-layer result, the fp32 working copy kept as the softmax for backward, and the fp32
  gradient / bf16 cast in backward); fused path (the default): the same 10 B for one chunk of
  ``logprob_chunk`` tokens only, plus the bf16 [v/TP, h] weight-gradient product buffer and 8 B
  per token x h (the fp32 hidden states Float16Module hands over, their bf16 cast and the bf16
  input gradient); both plus the final-norm and output-layer inputs;
* ``OVERHEAD_GB`` fixed: CUDA context, cuBLAS/TE workspaces, NCCL buffers, allocator slack.

GB are 1e9 bytes, like ``mem_peak_gb`` in the metrics.
"""

import math
from dataclasses import asdict, dataclass
from typing import Optional

from megasimpo.config import LOGPROB_CHUNK, LOSSES, REFERENCE_LOSSES, Layout, ModelConfig

GB = 1e9
VOCAB_MULTIPLE = 128  # = megasimpo.model.VOCAB_MULTIPLE (not imported: that module pulls torch)
OVERHEAD_GB = 4.0  # CUDA context + workspaces + NCCL buffers + fragmentation
MEMORY_FRACTION = 0.9  # plan to this share of the GPU: the rest is the model's error margin
LONG_SEQUENCE = 16384  # from here on context parallelism is preferred over PP/TP
TARGET_TOKENS_PER_MICROBATCH = 8192  # GEMMs are saturated beyond this many tokens
VPP_STEP_COST = 0.01  # modelled step-time cost of each extra virtual pipeline stage
MICRO_BATCH_SIZES = (1, 2, 4)  # pairs per micro-batch the search tries
CP_SIZES = (1, 2, 4, 8, 16)
MIN_TOKENS_PER_CP_RANK = 1024
LOGIT_BYTES = 10  # per element of [2*mbs, s, v/tp], see the module docstring
OVERRIDABLE = ("tp", "pp", "vpp", "cp", "micro_batch_size", "recompute", "sequence_parallel")


@dataclass(frozen=True)
class MemoryBreakdown:
    """Predicted peak memory of one GPU in GB (1e9 bytes), on pipeline stage ``stage``."""

    weights: float  # bf16 policy weights
    grads: float  # fp32 main gradients
    optimizer: float  # fp32 master weights + Adam m, v, sharded over DP x CP
    reference: float  # frozen bf16 reference model (live DPO-style reference), else 0
    activations: float  # saved activations of the in-flight micro-batches + one layer's working set
    logits: float  # output-layer / log-prob buffers (last stage only)
    overhead: float  # fixed: CUDA context, workspaces, NCCL buffers, fragmentation
    stage: int = 0  # pipeline rank these numbers are for (the one with the highest total)

    @property
    def total(self) -> float:
        """Sum of the parts, GB."""
        return (self.weights + self.grads + self.optimizer + self.reference + self.activations
                + self.logits + self.overhead)

    def to_dict(self) -> dict:
        """GB per part plus ``total`` (rounded to 0.01 GB), without the stage."""
        d = {k: round(v, 2) for k, v in asdict(self).items() if k != "stage"}
        d["total"] = round(self.total, 2)
        return d


@dataclass(frozen=True)
class Plan:
    """A complete layout and batch split for one run, with its predicted memory and the reasons."""

    tp: int  # tensor-parallel size
    pp: int  # pipeline stages
    vpp: Optional[int]  # virtual stages per pipeline rank (None: not interleaved)
    cp: int  # context-parallel size
    dp: int  # data-parallel replicas
    sequence_parallel: bool  # SP over the TP group
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

    @property
    def world_size(self) -> int:
        """GPUs the plan occupies."""
        return self.tp * self.pp * self.cp * self.dp

    @property
    def bubble(self) -> float:
        """Pipeline bubble fraction (pp-1) / (num_microbatches x vpp)."""
        return (self.pp - 1) / (self.num_microbatches * (self.vpp or 1))

    @property
    def layout(self) -> Layout:
        """The parallel layout as ``config.Layout``."""
        return Layout(tp=self.tp, pp=self.pp, vpp=self.vpp, cp=self.cp, dp=self.dp,
                      sequence_parallel=self.sequence_parallel)

    def to_dict(self) -> dict:
        """JSON/YAML form: every field, ``memory_gb`` with its total, budget and bubble."""
        d = {k: getattr(self, k) for k in ("tp", "pp", "vpp", "cp", "dp", "sequence_parallel",
                                           "micro_batch_size", "num_microbatches",
                                           "global_batch_size", "recompute", "seq_length",
                                           "loss", "gpu_mem_gb")}
        d["memory_budget_gb"] = round(MEMORY_FRACTION * self.gpu_mem_gb, 2)
        d["memory_gb"] = self.memory.to_dict()
        d["memory_peak_stage"] = self.memory.stage
        d["memory_gb_by_stage"] = {str(m.stage): m.to_dict() for m in self.stages}
        d["pipeline_bubble"] = round(self.bubble, 4)
        d["reasons"] = list(self.reasons)
        return d


def padded_vocab_size(vocab_size: int) -> int:
    """Embedding rows as stored (same rounding as ``megasimpo.model.padded_vocab_size``)."""
    return math.ceil(vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def layer_parameters(model: ModelConfig) -> tuple[int, int]:
    """(TP-sharded, replicated) parameter counts of one transformer layer."""
    h, q = model.hidden_size, model.num_attention_heads * model.head_dim
    kv = 2 * model.num_query_groups * model.head_dim
    sharded = h * (q + kv) + q * h + 3 * h * model.ffn_hidden_size
    sharded += q + kv if model.qkv_bias else 0
    return sharded, 2 * h  # the two RMSNorm weights are replicated over TP


def stage_parameters(model: ModelConfig, tp: int, pp: int, stage: int) -> float:
    """Parameters held by one GPU of pipeline stage ``stage``."""
    sharded, replicated = layer_parameters(model)
    params = model.num_layers // pp * (sharded / tp + replicated)
    embedding = padded_vocab_size(model.vocab_size) * model.hidden_size / tp
    if stage == 0:
        params += embedding
    if stage == pp - 1:
        params += model.hidden_size  # final norm
        if pp > 1 or not model.tie_word_embeddings:
            params += embedding  # output layer (a tied copy on the last stage when pp > 1)
    return params


def layer_activation_bytes(model: ModelConfig, *, tokens: int, tp: int, sequence_parallel: bool,
                           recompute: bool) -> float:
    """Saved activations of one layer for ``tokens`` = (s/cp) x sequences, bytes on one GPU."""
    h, f = model.hidden_size, model.ffn_hidden_size
    split = tp if sequence_parallel else 1
    if recompute:
        return 2 * tokens * h / split  # the layer input only
    g = model.num_query_groups / model.num_attention_heads
    replicated = 8 * h  # norm inputs (2), QKV input, fc1 input: sharded only by SP
    sharded = (4 + 4 * g) * h + 6 * f  # Q, K, V, attention output, SwiGLU input and output
    return tokens * (replicated / split + sharded / tp)  # bf16: the factor 2 is in the counts


def in_flight_chunks(pp: int, vpp: Optional[int], stage: int, num_microbatches: int) -> int:
    """Model-chunk forward passes whose activations stage ``stage`` holds at its peak."""
    if pp == 1:
        return 1
    if not vpp or vpp == 1:
        return min(pp - stage, num_microbatches)
    warmup = 2 * (pp - stage - 1) + (vpp - 1) * pp
    return min(warmup + 1, num_microbatches * vpp)


def stage_memory(model: ModelConfig, *, tp: int, pp: int, vpp: Optional[int], cp: int, dp: int,
                 sequence_parallel: bool, seq_length: int, micro_batch_size: int,
                 num_microbatches: int, loss: str, recompute: bool, stage: int,
                 ref: str = "live", logprob_chunk: int = LOGPROB_CHUNK) -> MemoryBreakdown:
    """Predicted memory of one GPU on pipeline stage ``stage`` (see the module docstring)."""
    params = stage_parameters(model, tp, pp, stage)
    tokens = seq_length // cp * 2 * micro_batch_size
    stored = layer_activation_bytes(model, tokens=tokens, tp=tp,
                                    sequence_parallel=sequence_parallel, recompute=recompute)
    working = layer_activation_bytes(model, tokens=tokens, tp=tp,
                                     sequence_parallel=sequence_parallel, recompute=False)
    layers_per_chunk = model.num_layers // (pp * (vpp or 1))
    chunks = in_flight_chunks(pp, vpp, stage, num_microbatches)
    activations = chunks * layers_per_chunk * stored + working
    logits = 0.0
    if stage == pp - 1:
        vocab = padded_vocab_size(model.vocab_size) / tp
        split = tp if sequence_parallel else 1
        h = model.hidden_size
        inputs = 2 * (2 * tokens * h / split)  # final-norm and output-layer inputs, bf16
        if logprob_chunk:  # fused: one chunk's logits; hidden handed over in fp32, cast, dgrad
            chunk = min(logprob_chunk, tokens)
            logits = chunk * vocab * LOGIT_BYTES + 2 * vocab * h + (4 + 2 + 2) * tokens * h
        else:
            logits = tokens * vocab * LOGIT_BYTES
        logits += inputs
    reference = 2 * params if loss in REFERENCE_LOSSES and ref == "live" else 0.0
    return MemoryBreakdown(weights=2 * params / GB, grads=4 * params / GB,
                           optimizer=12 * params / (dp * cp) / GB, reference=reference / GB,
                           activations=activations / GB, logits=logits / GB,
                           overhead=OVERHEAD_GB, stage=stage)


def stage_breakdowns(model: ModelConfig, *, tp: int = 1, pp: int = 1, vpp: Optional[int] = None,
                     cp: int = 1, dp: int = 1, sequence_parallel: Optional[bool] = None,
                     seq_length: int = 4096, micro_batch_size: int = 1,
                     num_microbatches: Optional[int] = None, loss: str = "simpo",
                     recompute: bool = False, ref: str = "live",
                     logprob_chunk: int = LOGPROB_CHUNK) -> tuple:
    """Memory of the first and (when pp > 1) the last pipeline stage; middle stages hold less.

    ``sequence_parallel`` None means on when tp > 1; ``num_microbatches`` None means plenty
    (at least pp x vpp, the pipeline is full).
    """
    sp = tp > 1 if sequence_parallel is None else sequence_parallel
    nm = num_microbatches or pp * (vpp or 1)
    return tuple(stage_memory(model, tp=tp, pp=pp, vpp=vpp, cp=cp, dp=dp, sequence_parallel=sp,
                              seq_length=seq_length, micro_batch_size=micro_batch_size,
                              num_microbatches=nm, loss=loss, recompute=recompute, stage=s, ref=ref,
                              logprob_chunk=logprob_chunk)
                 for s in sorted({0, pp - 1}))


def memory_breakdown(model: ModelConfig, **layout) -> MemoryBreakdown:
    """Peak per-GPU memory of a layout: the first or last pipeline stage, whichever is higher.
    Takes the keyword arguments of :func:`stage_breakdowns`."""
    return max(stage_breakdowns(model, **layout), key=lambda m: m.total)


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def _layouts(model: ModelConfig, gpus: Optional[int], *, gpus_per_node: int, seq_length: int,
             global_batch_size: int, fixed: dict, fused_norms: bool, lean: bool = False):
    """Every valid layout as a dict (without memory). ``gpus`` None: any world size whose DP
    divides the global batch. ``lean``: only the least-memory variant of each split (no
    interleaving, smallest micro-batch, recompute unless fixed off) for the minimum-GPU search."""
    L, heads, kv = model.num_layers, model.num_attention_heads, model.num_query_groups
    tps = [fixed["tp"]] if "tp" in fixed else [
        t for t in (2 ** i for i in range(8)) if t <= gpus_per_node and heads % t == 0
        and kv % t == 0 and (gpus is None or t <= gpus)]
    pps = [fixed["pp"]] if "pp" in fixed else _divisors(L)
    cps = [fixed["cp"]] if "cp" in fixed else [
        c for c in CP_SIZES if c == 1 or seq_length // c >= MIN_TOKENS_PER_CP_RANK]
    mbss = [fixed["micro_batch_size"]] if "micro_batch_size" in fixed else (
        MICRO_BATCH_SIZES[:1] if lean else MICRO_BATCH_SIZES)
    rcs = [fixed["recompute"]] if "recompute" in fixed else ([True] if lean else [False, True])
    for tp in tps:
        sp = fixed.get("sequence_parallel", tp > 1 and fused_norms)
        if sp and tp == 1:
            continue
        for pp in pps:
            if L % pp:
                continue
            if "vpp" in fixed:
                vpps = [fixed["vpp"]]
            elif pp == 1 or lean:
                vpps = [None]
            else:
                vpps = [None] + [v for v in _divisors(L // pp) if v > 1 and L // (pp * v) >= 2]
            for cp in cps:
                mp = tp * pp * cp
                if seq_length % (2 * cp * (tp if sp else 1)):
                    continue  # the trainer needs whole, equal sequence shards
                if gpus is not None and gpus % mp:
                    continue
                dps = [gpus // mp] if gpus is not None else _divisors(global_batch_size)
                for dp in dps:
                    for vpp in vpps:
                        if vpp and (pp == 1 or L % (pp * vpp)):
                            continue
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
                                           num_microbatches=nm, recompute=rc)


def _memory(model, layout: dict, seq_length: int, loss: str, ref: str,
            logprob_chunk: int) -> MemoryBreakdown:
    return memory_breakdown(model, seq_length=seq_length, loss=loss, ref=ref,
                            logprob_chunk=logprob_chunk, **layout)


def _stages(model, layout: dict, seq_length: int, loss: str, ref: str, logprob_chunk: int) -> tuple:
    return stage_breakdowns(model, seq_length=seq_length, loss=loss, ref=ref,
                            logprob_chunk=logprob_chunk, **layout)


def _rank(c: dict, seq_length: int) -> tuple:
    """Sort key: lower is faster (see the module docstring)."""
    long_seq = seq_length >= LONG_SEQUENCE
    tokens = 2 * c["micro_batch_size"] * seq_length // c["cp"]
    vpp = c["vpp"] or 1
    overhead = (c["pp"] - 1) / (c["num_microbatches"] * vpp) + VPP_STEP_COST * (vpp - 1)
    return (c["recompute"], c["tp"] * c["pp"] * c["cp"], c["cp"] > 1 and not long_seq,
            -min(tokens, TARGET_TOKENS_PER_MICROBATCH), round(overhead, 6),
            -c["cp"] if long_seq else c["cp"], -c["tp"], c["memory"].total)


def _describe(c: dict) -> str:
    vpp = f" vpp={c['vpp']}" if c["vpp"] else ""
    return (f"tp={c['tp']} pp={c['pp']}{vpp} cp={c['cp']} dp={c['dp']}, micro-batch "
            f"{c['micro_batch_size']}{', full recompute' if c['recompute'] else ''}")


def _check_overrides(model: ModelConfig, gpus: int, overrides: dict, fused_norms: bool) -> dict:
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
    if fixed.get("sequence_parallel") and not fused_norms:
        raise ValueError("sequence parallelism needs Transformer Engine or apex norms "
                         "(neither imports here)")
    # Layout.resolve words the structural errors (divisibility by heads, layers, world).
    Layout.resolve(model, gpus, tp=fixed.get("tp", 1), pp=fixed.get("pp", 1),
                   vpp=fixed.get("vpp") if "pp" in fixed else None, cp=fixed.get("cp", 1),
                   sequence_parallel=fixed.get("sequence_parallel") if "tp" in fixed else None,
                   fused_norms=fused_norms)
    return fixed


def _no_fit_message(model, gpus, budget, gpu_mem_gb, seq_length, loss, ref, logprob_chunk, fixed,
                    search) -> str:
    """Why nothing fits, with the minimum (or nearest) GPU count that would work."""
    what = (f"the model ({model.num_parameters / 1e9:.1f} B parameters, {loss}, seq {seq_length}"
            + "".join(f", {k}={v}" for k, v in fixed.items()) + ")")
    mem = f"GPUs of {gpu_mem_gb:g} GB (budget {budget:.1f} GB = {MEMORY_FRACTION:.0%})"
    works, leanest = set(), None
    for c in _layouts(model, None, fixed=fixed, lean=True, **search):
        c["memory"] = _memory(model, c, seq_length, loss, ref, logprob_chunk)
        if leanest is None or c["memory"].total < leanest["memory"].total:
            leanest = c
        if c["memory"].total <= budget:
            works.add(c["tp"] * c["pp"] * c["cp"] * c["dp"])
    if not works:
        if leanest is None:
            return f"no valid layout for {what}"
        return (f"{what} does not fit on {mem} at any GPU count: the leanest layout "
                f"({_describe(leanest)}) needs {leanest['memory'].total:.1f} GB per GPU; "
                "use GPUs with more memory or a shorter --seq-length")
    minimum = min(works)
    if gpus < minimum:
        example = plan(model, minimum, gpu_mem_gb=gpu_mem_gb, loss=loss, ref=ref,
                       logprob_chunk=logprob_chunk, overrides=fixed,
                       **search)
        return (f"{what} needs at least {minimum} {mem}; got --gpus {gpus} (on {minimum}: "
                f"tp={example.tp} pp={example.pp} cp={example.cp} dp={example.dp}, "
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
         logprob_chunk: int = LOGPROB_CHUNK,
         global_batch_size: int = 128, overrides: Optional[dict] = None,
         fused_norms: bool = True) -> Plan:
    """The fastest layout that fits (see the module docstring for the order of preference).

    ``overrides`` fixes any of tp, pp, vpp, cp, micro_batch_size, recompute, sequence_parallel
    (None values are ignored) and the rest is planned around them. ``fused_norms`` False (no TE
    or apex) turns sequence parallelism off. Raises ValueError when nothing fits, naming the
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
    if ref not in ("live", "precomputed"):
        raise ValueError(f"--ref {ref!r} must be 'live' or 'precomputed'")
    fixed = _check_overrides(model, gpus, dict(overrides or {}), fused_norms)
    budget = MEMORY_FRACTION * gpu_mem_gb
    search = dict(gpus_per_node=gpus_per_node, seq_length=seq_length,
                  global_batch_size=global_batch_size, fused_norms=fused_norms)
    candidates = list(_layouts(model, gpus, fixed=fixed, **search))
    for c in candidates:
        c["memory"] = _memory(model, c, seq_length, loss, ref, logprob_chunk)
    feasible = [c for c in candidates if c["memory"].total <= budget]
    if not feasible:
        raise ValueError(_no_fit_message(model, gpus, budget, gpu_mem_gb, seq_length, loss, ref,
                                         logprob_chunk, fixed, search))
    best = min(feasible, key=lambda c: _rank(c, seq_length))
    reasons = _reasons(model, best, candidates, fixed, gpus=gpus, gpus_per_node=gpus_per_node,
                       budget=budget, gpu_mem_gb=gpu_mem_gb, seq_length=seq_length, loss=loss,
                       ref=ref, global_batch_size=global_batch_size)
    layout = {k: v for k, v in best.items() if k != "memory"}
    return Plan(**layout, global_batch_size=global_batch_size, seq_length=seq_length, loss=loss,
                gpu_mem_gb=gpu_mem_gb, memory=best["memory"],
                stages=_stages(model, layout, seq_length, loss, ref, logprob_chunk),
                reasons=tuple(reasons))


def _leanest(candidates: list, keep) -> Optional[dict]:
    kept = [c for c in candidates if keep(c)]
    return min(kept, key=lambda c: c["memory"].total) if kept else None


def _reasons(model: ModelConfig, best: dict, candidates: list, fixed: dict, *, gpus: int,
             gpus_per_node: int, budget: float, gpu_mem_gb: float, seq_length: int, loss: str,
             ref: str, global_batch_size: int) -> list:
    """One line per choice of ``best``, saying why."""
    tp, pp, vpp, cp, dp = (best[k] for k in ("tp", "pp", "vpp", "cp", "dp"))
    mbs, nm = best["micro_batch_size"], best["num_microbatches"]
    rc, mem = best["recompute"], best["memory"]
    L, mp = model.num_layers, tp * pp * cp

    def tag(key):
        return " (fixed by override)" if key in fixed else ""

    def fits(c):
        return c["memory"].total <= budget

    out = []
    smaller = _leanest(candidates,
                       lambda c: c["tp"] * c["pp"] * c["cp"] < mp and c["recompute"] == rc)
    if smaller:
        out.append(f"TP x PP x CP = {mp} GPUs per model replica is the smallest split that fits: "
                   f"the leanest smaller one ({_describe(smaller)}) needs "
                   f"{smaller['memory'].total:.1f} GB > {budget:.1f} GB")
    else:
        out.append(f"TP x PP x CP = {mp} GPUs per model replica: the smallest valid split"
                   + (" under the overrides" if fixed else ""))
    out.append(f"TP={tp}{tag('tp')}: inside one node of {gpus_per_node} GPUs, divides the "
               f"{model.num_attention_heads} attention heads and {model.num_query_groups} KV heads")
    out.append(f"PP={pp}{tag('pp')}: " + (f"{L // pp} of the {L} layers per stage" if pp > 1
                                          else "no pipeline, every GPU holds all layers"))
    if pp > 1:
        plain = (pp - 1) / nm
        if vpp:
            out.append(f"VPP={vpp}{tag('vpp')}: {L // (pp * vpp)} layers per model chunk; "
                       f"interleaving cuts the pipeline bubble from {plain:.1%} to "
                       f"{plain / vpp:.1%}")
        else:
            alt = [c for c in candidates if c["vpp"] and fits(c) and all(
                c[k] == best[k] for k in ("tp", "pp", "cp", "micro_batch_size", "recompute"))]
            why = ("interleaving would save too little for its extra point-to-point hops"
                   if alt else "no interleaved schedule fits (memory or micro-batch count)")
            out.append(f"VPP off{tag('vpp')}: pipeline bubble {plain:.1%}; {why}")
    if cp > 1:
        out.append(f"CP={cp}{tag('cp')}: each rank holds {seq_length // cp} of the {seq_length} "
                   "tokens of a sequence" + (" (long sequence)" if seq_length >= LONG_SEQUENCE
                                             else "; without it the activations do not fit"))
    else:
        out.append(f"CP=1{tag('cp')}: " + ("the activations fit without splitting sequences"
                                           if seq_length < LONG_SEQUENCE else
                                           "no context-parallel split fits or helps here"))
    out.append(f"DP={dp} = {gpus} GPUs / {mp}; the distributed optimizer shards fp32 master "
               f"weights and Adam moments over DP x CP = {dp * cp} ranks")
    if best["sequence_parallel"]:
        out.append("sequence parallel on: TP > 1, so norm inputs and the other activations "
                   "TP alone replicates are split over TP as well")
    else:
        out.append("sequence parallel off" + (tag("sequence_parallel") or (
            ": TP = 1" if tp == 1 else ": needs Transformer Engine or apex norms")))
    out.append(f"micro-batch {mbs} pair(s) = {2 * mbs} sequences{tag('micro_batch_size')}; "
               f"{nm} micro-batches x DP {dp} x {mbs} = {global_batch_size} pairs per step")
    if rc and "recompute" not in fixed:
        lean = _leanest(candidates, lambda c: not c["recompute"])
        out.append("full activation recompute of every layer: nothing fits without it"
                   + (f" (the leanest layout without it needs {lean['memory'].total:.1f} GB)"
                      if lean else ""))
    else:
        out.append(("full activation recompute" if rc else "activation recompute off")
                   + (tag("recompute") or ": everything fits without it"))
    if loss in REFERENCE_LOSSES:
        out.append(f"{loss} with a live reference model: its frozen bf16 copy takes "
                   f"{mem.reference:.1f} GB per GPU" if ref == "live" else
                   f"{loss} with reference log-probs precomputed by `megasimpo score`: "
                   "no reference weights on the GPUs")
    where = "first" if mem.stage == 0 else "last"
    out.append(f"predicted peak {mem.total:.1f} GB per GPU" + (
        f" on the {where} pipeline stage" if pp > 1 else "")
        + f", within the {budget:.1f} GB budget ({MEMORY_FRACTION:.0%} of {gpu_mem_gb:g} GB)")
    if seq_length > model.max_position_embeddings:
        out.append(f"note: --seq-length {seq_length} exceeds the model's "
                   f"max_position_embeddings {model.max_position_embeddings}")
    return out
