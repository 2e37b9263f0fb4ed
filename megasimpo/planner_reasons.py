"""The reasons of a ``planner.Plan``: one line per choice of the chosen layout, saying why.

Text only, from the candidates ``planner.plan`` scored; no search and no memory arithmetic here.
"""

from typing import Optional

from megasimpo.config import REFERENCE_LOSSES, LoraConfig, ModelConfig
from megasimpo.memory_model import lora_on, model_parameters
from megasimpo.pipeline_split import stage_layer_counts


def lora_reason(model: ModelConfig, lora: LoraConfig) -> str:
    """"LoRA r=16 on ...: N trainable of M parameters (x%)" and what the frozen base costs."""
    trainable, total = model_parameters(model, lora)
    return (f"LoRA r={lora.rank} on {', '.join(lora.targets)}: {trainable:,} trainable of "
            f"{total:,} parameters ({trainable / total:.2%}); the frozen base is bf16 weights "
            "only, gradients and optimizer state are the adapters'")


def split_reason(num_layers: int, pp: int, vpp, counts: tuple, fixed: dict, peak: int) -> str:
    """The uneven pipeline split in words: the counts, and why (fixed, or chosen by memory)."""
    middle = f" + {pp - 2} x {counts[1]}" if pp > 2 else ""
    why = ("fixed by override" if "first_stage_layers" in fixed or "last_stage_layers" in fixed
           else f"the {num_layers} layers do not divide by pp{' x vpp' if vpp else ''}; of the "
           "splits with no end stage fuller than a middle one, this has the least peak memory "
           "(the first stage carries the embedding and the deepest pipeline, the last the "
           "output layer)")
    return (f"layers {counts[0]} (first stage){middle} + {counts[-1]} (last stage), an uneven "
            f"split: {why}")


def describe(c: dict) -> str:
    """A candidate layout (a dict) in one phrase: tp, pp, vpp, cp, dp, micro-batch, recompute."""
    vpp = f" vpp={c['vpp']}" if c["vpp"] else ""
    if c.get("first_stage_layers") not in (None, "?"):
        vpp += f" layers {c['first_stage_layers']}/../{c['last_stage_layers']}"
    if c.get("ep", 1) > 1:
        vpp += f" ep={c['ep']}"
    return (f"tp={c['tp']} pp={c['pp']}{vpp} cp={c['cp']} dp={c['dp']}, micro-batch "
            f"{c['micro_batch_size']}{', full recompute' if c['recompute'] else ''}")

def expert_reason(model: ModelConfig, best: dict, candidates: list, fixed: dict, gpus: int,
                  gpus_per_node: int, budget: float) -> str:
    """EP (and ETP) of an MoE plan in words: the rule that chose it (``planner`` docstring)."""
    ep, etp, pp = best["ep"], best["etp"] or best["tp"], best["pp"]
    edp = gpus // (etp * ep * pp)
    if "ep" in fixed:
        why = "fixed by override"
    elif ep * etp > gpus_per_node:
        why = (f"no layout with the expert all-to-all inside one node of {gpus_per_node} GPUs "
               "fits, so the smallest EP across nodes that does")
    else:
        why = (f"the largest EP that divides the {model.num_experts} experts and keeps each "
               f"all-to-all inside a node of {gpus_per_node} GPUs at this TP x PP x CP (fewest "
               "expert weights, gradients and optimizer state per GPU)")
    return (f"EP={ep} ETP={etp}{' (fixed by override)' if 'etp' in fixed else ''}: "
            f"{model.num_experts // ep} of the {model.num_experts} experts per GPU, each "
            f"{model.moe_ffn_hidden_size // etp} wide; {why}; expert parameters are "
            f"data-parallel over {gpus} / (ETP x EP x PP) = {edp} ranks, which shard their "
            f"optimizer state; dropless routing: {best['memory'].imbalance:.1f} GB of headroom "
            "for uneven routing")


def leanest(candidates: list, keep) -> Optional[dict]:
    """The candidate of least memory among those ``keep`` accepts; None when there is none."""
    kept = [c for c in candidates if keep(c)]
    return min(kept, key=lambda c: c["memory"].total) if kept else None


def reasons(model: ModelConfig, best: dict, candidates: list, fixed: dict, *, gpus: int,
            gpus_per_node: int, budget: float, gpu_mem_gb: float, seq_length: int, loss: str,
            ref: str, global_batch_size: int, long_sequence: int,
            lora: Optional[LoraConfig] = None, cp_backend: Optional[str] = None) -> list:
    """One line per choice of ``best``, saying why (``long_sequence``: the planner's
    long_sequence, from which on CP is preferred; ``cp_backend``: the attention backend that
    ruled context parallelism out, if one did)."""
    tp, pp, vpp, cp, dp = (best[k] for k in ("tp", "pp", "vpp", "cp", "dp"))
    mbs, nm = best["micro_batch_size"], best["num_microbatches"]
    rc, mem = best["recompute"], best["memory"]
    L, mp = model.num_layers, tp * pp * cp

    def tag(key):
        return " (fixed by override)" if key in fixed else ""

    def fits(c):
        return c["memory"].total <= budget

    out = []
    def cross_node(c):  # EP across nodes ranks after EP inside one (planner docstring)
        return c.get("ep", 1) > 1 and c.get("ep", 1) * (c.get("etp") or c["tp"]) > gpus_per_node

    smaller = leanest(candidates, lambda c: c["tp"] * c["pp"] * c["cp"] < mp
                      and c["recompute"] == rc and cross_node(c) == cross_node(best))
    if smaller:
        out.append(f"TP x PP x CP = {mp} GPUs per model replica is the smallest split that fits: "
                   f"the leanest smaller one ({describe(smaller)}) needs "
                   f"{smaller['memory'].total:.1f} GB > {budget:.1f} GB")
    else:
        out.append(f"TP x PP x CP = {mp} GPUs per model replica: the smallest valid split"
                   + (" under the overrides" if fixed else ""))
    out.append(f"TP={tp}{tag('tp')}: inside one node of {gpus_per_node} GPUs, divides the "
               f"{model.num_attention_heads} attention heads and {model.num_query_groups} KV heads")
    counts = stage_layer_counts(L, pp, vpp, best.get("first_stage_layers"),
                                best.get("last_stage_layers"))
    out.append(f"PP={pp}{tag('pp')}: " + (
        "no pipeline, every GPU holds all layers" if pp == 1 else
        f"{L // pp} of the {L} layers per stage" if len(set(counts)) == 1 else
        split_reason(L, pp, vpp, counts, fixed, mem.stage)))
    if pp > 1:
        plain = (pp - 1) / nm
        if vpp:
            per_chunk = "/".join(str(c) for c in sorted({c // vpp for c in counts}))
            out.append(f"VPP={vpp}{tag('vpp')}: {per_chunk} layers per model chunk; "
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
                   "tokens of a sequence" + (" (long sequence)" if seq_length >= long_sequence
                                             else "; without it the activations do not fit"))
    elif cp_backend:
        out.append(f"CP=1: the {cp_backend} attention has no context parallelism")
    else:
        out.append(f"CP=1{tag('cp')}: " + ("the activations fit without splitting sequences"
                                           if seq_length < long_sequence else
                                           "no context-parallel split fits or helps here"))
    if model.num_experts:
        out.append(expert_reason(model, best, candidates, fixed, gpus, gpus_per_node, budget))
    out.append(f"DP={dp} = {gpus} GPUs / {mp}; the distributed optimizer shards fp32 master "
               f"weights and Adam moments{' of the adapters' if lora_on(lora) else ''} over "
               f"DP x CP = {dp * cp} ranks")
    if best["sequence_parallel"]:
        out.append("sequence parallel on: TP > 1, so norm inputs and the other activations "
                   "TP alone replicates are split over TP as well")
    else:
        out.append("sequence parallel off" + (tag("sequence_parallel") or ": TP = 1"))
    out.append(f"micro-batch {mbs} pair(s) = {2 * mbs} sequences{tag('micro_batch_size')}; "
               f"{nm} micro-batches x DP {dp} x {mbs} = {global_batch_size} pairs per step")
    if rc and "recompute" not in fixed:
        lean = leanest(candidates, lambda c: not c["recompute"])
        out.append("full activation recompute of every layer: nothing fits without it"
                   + (f" (the leanest layout without it needs {lean['memory'].total:.1f} GB)"
                      if lean else ""))
    else:
        out.append(("full activation recompute" if rc else "activation recompute off")
                   + (tag("recompute") or ": everything fits without it"))
    if lora_on(lora):
        out.append(lora_reason(model, lora))
    if loss in REFERENCE_LOSSES and ref == "live" and lora_on(lora):
        out.append(f"{loss} with a live reference model under LoRA: the frozen base with its "
                   "adapters switched off, no second copy of the weights")
    elif loss in REFERENCE_LOSSES:
        out.append(f"{loss} with a live reference model: its frozen bf16 copy takes "
                   f"{mem.reference:.1f} GB per GPU" if ref == "live" else
                   f"{loss} with reference log-probs precomputed by `megasimpo score`: "
                   "no reference weights on the GPUs")
    where = ("first" if mem.stage == 0 else "last" if mem.stage == pp - 1
             else f"middle ({mem.stage})")
    out.append(f"predicted peak {mem.total:.1f} GB per GPU" + (
        f" on the {where} pipeline stage" if pp > 1 else "")
        + f", within the {budget:.1f} GB budget ({budget / gpu_mem_gb:.0%} of {gpu_mem_gb:g} GB)")
    if seq_length > model.max_position_embeddings:
        out.append(f"note: --seq-length {seq_length} exceeds the model's "
                   f"max_position_embeddings {model.max_position_embeddings}")
    return out
