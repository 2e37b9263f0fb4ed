"""``megasimpo plan``: the layout and per-GPU memory the planner picks, as a table or JSON.

    python -m megasimpo plan (--hf-config FILE | --load CKPT) --gpus N [--gpus-per-node 8]
        [--gpu-mem-gb 80] [--seq-length N] [--loss simpo|dpo] [--ep N] [--etp N]
        [--moe-dispatcher alltoall|allgather] [--lora-rank R [--lora-alpha A]
        [--lora-targets T ...]] [--json] [--simulate [--rank R]]

Nothing is started: no GPU, no process group. Impossible requests print
``megasimpo plan: error: ...`` (with the minimum GPU count that would work) and return 2.
"""

import argparse
import dataclasses
import json
import sys

from megasimpo import lora_targets, planner
from megasimpo.config import (LOGPROB_CHUNK, LORA_TARGETS, LOSSES, REFERENCE_SOURCES, LoraConfig,
                              ModelConfig)
from megasimpo.memory_model import OVERHEAD_GB, lora_on

PARTS = (("weights", "weights (bf16)"), ("grads", "gradients (fp32, trainable)"),
         ("optimizer", "optimizer (fp32 master + Adam, / DP*CP)"),
         ("reference", "reference model (bf16, live DPO)"),
         ("activations", "activations (in-flight micro-batches)"),
         ("logits", "logits / log-prob buffers"), ("overhead", "CUDA context, NCCL, slack"),
         ("imbalance", "MoE routing imbalance headroom"))


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers ``plan`` on the ``megasimpo`` sub-command parsers."""
    p = subparsers.add_parser("plan", help="print the parallel layout and per-GPU memory plan",
                              description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-config", help="HF config.json (or the HF model directory)")
    src.add_argument("--load", help="megasimpo checkpoint directory")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs (world size)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (TP stays inside)")
    p.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory of one GPU, GB (1e9 B)")
    p.add_argument("--seq-length", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--loss", choices=LOSSES, default="simpo",
                   help="the preference loss (default simpo)")
    p.add_argument("--ref", choices=REFERENCE_SOURCES, default="live",
                   help="reference log-probs of dpo/ipo/rdpo/dpo_norm: live frozen model or `score` files")
    p.add_argument("--global-batch-size", type=int, default=128, help="pairs per optimizer step")
    for name in ("tp", "pp", "vpp", "cp", "micro-batch-size", "first-stage-layers",
                 "last-stage-layers"):
        p.add_argument(f"--{name}", type=int, help="fix this part of the layout, plan the rest")
    p.add_argument("--ep", type=int, help="fix the expert-parallel size of an MoE model (default: "
                   "planned; it must divide the experts)")
    p.add_argument("--etp", type=int, help="fix the expert tensor-parallel size (default 1)")
    p.add_argument("--moe-dispatcher", choices=("alltoall", "allgather"), default=None,
                   help="MoE token dispatcher (default alltoall)")
    p.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=None,
                   help="force full activation recompute on/off")
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="sequence parallelism on/off (default: on when tp > 1)")
    p.add_argument("--logprob-chunk", type=int, default=LOGPROB_CHUNK,
                   help="tokens per fused output-layer chunk, as train's (0: full logits)")
    p.add_argument("--attention-backend", choices=("te", "sdpa", "unfused"), default="te",
                   help="core attention the cluster will run (train's auto: te where Transformer "
                        "Engine imports on a GPU, else sdpa); unfused keeps s x s scores")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="plan for LoRA adapters of this rank on a frozen base (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--lora-targets", nargs="+", default=list(LORA_TARGETS),
                   help="projections that get adapters (default: " + " ".join(LORA_TARGETS) + ")")
    p.add_argument("--simulate", action="store_true",
                   help="also run one real training step of the heaviest ranks on fake tensors "
                        "in a fake world of --gpus ranks and report their measured memory")
    p.add_argument("--rank", type=int, action="append",
                   help="with --simulate: the global rank(s) to simulate (default: rank 0 of "
                        "the first and of the last pipeline stage)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def load_model_config(args) -> ModelConfig:
    """The ModelConfig named by ``--hf-config`` or ``--load``."""
    if args.hf_config:
        return ModelConfig.from_hf(args.hf_config)
    from megasimpo.checkpoint import model_config  # imports torch: only when needed

    return model_config(args.load)


def lora_config(args) -> LoraConfig:
    """The LoraConfig of the ``--lora-*`` flags (rank 0: off); ValueError naming a bad value."""
    return LoraConfig(rank=getattr(args, "lora_rank", 0) or 0,
                      alpha=getattr(args, "lora_alpha", None),
                      targets=tuple(getattr(args, "lora_targets", None) or LORA_TARGETS))


def make_plan(args, model: ModelConfig, exclude: tuple = ()) -> planner.Plan:
    """Runs the planner with the flags of ``args`` (never one of the ``exclude`` layouts)."""
    overrides = {k: getattr(args, k, None) for k in planner.OVERRIDABLE}
    lora = lora_config(args)
    if lora.enabled:  # the MoE default; MLP targets of an MoE model: refused by name
        lora = dataclasses.replace(lora, targets=lora_targets.for_model(lora.targets, model)[0])
        lora_targets.check_model(lora.targets, model)
    return planner.plan(model, args.gpus, gpus_per_node=args.gpus_per_node,
                        gpu_mem_gb=args.gpu_mem_gb, seq_length=args.seq_length, loss=args.loss,
                        ref=args.ref, global_batch_size=args.global_batch_size,
                        logprob_chunk=args.logprob_chunk, attention_backend=args.attention_backend,
                        overrides=overrides, exclude=exclude, lora=lora)


def format_plan(plan: planner.Plan, model: ModelConfig, gpus_per_node: int) -> str:
    """The human-readable table: model, layout, batch, memory per GPU, reasons."""
    m, lay = model, plan.layout
    lines = [
        f"model   {m.architecture}: {m.num_layers} layers, hidden {m.hidden_size}, "
        f"ffn {m.ffn_hidden_size}, {m.num_attention_heads} heads / {m.num_query_groups} KV heads, "
        f"vocab {m.vocab_size}, {parameter_count(m.num_parameters)} parameters"
        + (f"; {m.num_experts} experts of width {m.moe_ffn_hidden_size}, top-"
           f"{m.experts_per_token}" if m.num_experts else ""),
        f"train   {_trainable(plan)}",
        f"world   {plan.world_size} GPUs ({gpus_per_node} per node, {plan.gpu_mem_gb:g} GB each), "
        f"seq {plan.seq_length}, loss {plan.loss}, attention {plan.attention_backend}",
        f"layout  TP={lay.tp}  PP={lay.pp}  VPP={lay.vpp or '-'}  CP={lay.cp}  DP={lay.dp}  "
        f"SP={'on' if lay.sequence_parallel else 'off'}  "
        f"recompute={'full' if plan.recompute else 'off'}"
        + (f"  EP={lay.ep}  ETP={lay.expert_tp}  dispatcher {lay.moe_dispatcher}"
           if m.num_experts else "")
        + (f"  layers/stage {'+'.join(map(str, lay.stage_layers(m.num_layers)))}"
           if lay.first_stage_layers else ""),
        f"batch   {plan.micro_batch_size} pair(s) per micro-batch x {plan.num_microbatches} "
        f"micro-batches x DP {lay.dp} = {plan.global_batch_size} pairs per step; "
        f"pipeline bubble {plan.bubble:.1%}",
        "",
    ]
    stages = plan.stages or (plan.memory,)
    names = ["first stage" if s.stage == 0 else "last stage" if s.stage == lay.pp - 1
             else f"stage {s.stage}" for s in stages] if len(stages) > 1 else ["per GPU"]
    width = max(len(label) for _, label in PARTS)
    lines.append(f"{'memory, GB per GPU':<{width + 2}}" + "".join(f"{n:>13}" for n in names))
    for key, label in PARTS:
        if key == "imbalance" and not m.num_experts:
            continue
        lines.append(f"  {label:<{width}}" + "".join(f"{getattr(s, key):13.2f}" for s in stages))
    budget = planner.MEMORY_FRACTION * plan.gpu_mem_gb
    lines.append(f"  {'total':<{width}}" + "".join(f"{s.total:13.2f}" for s in stages))
    lines.append(f"  {'budget':<{width}}{budget:13.2f}   ({planner.MEMORY_FRACTION:.0%} of "
                 f"{plan.gpu_mem_gb:g} GB; peak {plan.memory.total:.2f} GB)")
    lines.append("")
    lines.append("why")
    lines.extend(f"  - {r}" for r in plan.reasons)
    return "\n".join(lines)


def parameter_count(n: int) -> str:
    """``n`` parameters as people write them: 8.03 B, 124.44 M, 0.35 M."""
    return f"{n / 1e9:.2f} B" if n >= 0.9995e9 else f"{n / 1e6:.2f} M"


def _trainable(plan: planner.Plan) -> str:
    """Trainable against total parameters, and what is trained."""
    n, total = plan.trainable_parameters, plan.total_parameters
    what = (f"LoRA r={plan.lora.rank} alpha {plan.lora.alpha:g} on {' '.join(plan.lora.targets)}, "
            "base frozen" if lora_on(plan.lora) else "full fine-tuning")
    return f"{n:,} trainable of {total:,} parameters ({n / max(total, 1):.2%}): {what}"


def run(args) -> int:
    """Prints the plan for the parsed ``args``; returns the exit status (0, or 2 on errors)."""
    try:
        model = load_model_config(args)
        result = make_plan(args, model)
    except (ValueError, OSError) as e:
        print(f"megasimpo plan: error: {e}", file=sys.stderr)
        return 2
    out = dict(result.to_dict(), gpus=result.world_size, gpus_per_node=args.gpus_per_node)
    sims = []
    if args.simulate:
        from megasimpo.simulate import simulate

        try:
            sims = simulate(result, model, ranks=args.rank, gpus_per_node=args.gpus_per_node,
                            ref=args.ref)
        except ValueError as e:
            print(f"megasimpo plan: error: {e}", file=sys.stderr)
            return 2
        heaviest = max(sims, key=lambda r: r["total"])
        out["simulated_memory_gb"] = simulated_gb(heaviest)
        out["simulated_memory_gb_by_rank"] = {str(r["rank"]): simulated_gb(r) for r in sims}
    if args.json:
        print(json.dumps(out))
    else:
        print(format_plan(result, model, args.gpus_per_node))
        if sims:
            print(format_simulation(result, sims))
    refusal = sims and refuse(args, model, result, out["simulated_memory_gb"])
    if refusal:
        print(f"megasimpo plan: error: {refusal}", file=sys.stderr)
        return 3
    return 0


def refuse(args, model: ModelConfig, result: planner.Plan, simulated: dict) -> str:
    """Why a simulated plan does not fit, with the next layout to try; "" when it fits."""
    peak, budget = simulated["total"], planner.MEMORY_FRACTION * result.gpu_mem_gb
    lay = result.layout
    if peak <= budget:
        return ""
    why = (f"the simulated peak {peak:.1f} GB (rank {simulated['rank']}, with the "
           f"{OVERHEAD_GB:g} GB fixed overhead) exceeds the {budget:.1f} GB budget of this plan "
           f"(tp={lay.tp} pp={lay.pp} vpp={lay.vpp or 1} cp={lay.cp} "
           f"dp={lay.dp}, micro-batch {result.micro_batch_size}"
           f"{', full recompute' if result.recompute else ''})")
    try:
        nxt = make_plan(args, model, exclude=(result,))
    except ValueError:
        return why + "; no other layout fits either"
    flags = (f"--tp {nxt.layout.tp} --pp {nxt.layout.pp} --vpp {nxt.layout.vpp or 1} "
             f"--cp {nxt.layout.cp} " + (f"--ep {nxt.layout.ep} " if model.num_experts else "")
             + f"--micro-batch-size {nxt.micro_batch_size}"
             + (" --recompute" if nxt.recompute else " --no-recompute"))
    return why + f"; the next layout is {flags} ({nxt.memory.total:.1f} GB predicted): simulate it"


SIM_PARTS = ("weights", "grads", "optimizer", "reference", "activations", "logits")


def simulated_gb(report: dict) -> dict:
    """A simulation report in the plan's categories, GB (pipeline buffers count as
    activations)."""
    d = {k: round(report[k], 6) for k in SIM_PARTS}
    d["activations"] = round(report["activations"] + report["pipeline"] + report["other"], 6)
    # The fixed overhead is the memory model's constant (a fake tensor has no CUDA context), so
    # "total" compares with the plan's memory_gb total; "tensors" is what was measured.
    d.update(overhead=OVERHEAD_GB, total=round(report["total"] + OVERHEAD_GB, 6),
             tensors=round(report["total"], 6), rank=report["rank"], stage=report["stage"])
    return d


def format_simulation(plan: planner.Plan, sims: list) -> str:
    """Simulated (measured on fake tensors) against predicted memory, per simulated rank."""
    by_stage = {m.stage: m for m in (plan.stages or (plan.memory,))}
    lines = ["", "simulated (one real step on fake tensors) vs memory model, GB"]
    if plan.memory.imbalance:
        lines.append("  MoE: simulated under uniform routing (every expert gets tokens x top-k / "
                     "experts); compared with the model without its imbalance headroom")
    for r in sims:
        sim, model = simulated_gb(r), by_stage.get(r["stage"], plan.memory)
        lines.append(f"  rank {r['rank']} (pipeline stage {r['stage']})"
                     f"{'simulated':>22}{'model':>10}{'sim/model':>11}")
        for key in SIM_PARTS:
            pred = getattr(model, key)
            ratio = f"{sim[key] / pred:11.2f}" if pred else f"{'-':>11}"
            lines.append(f"    {key:<36}{sim[key]:10.2f}{pred:10.2f}{ratio}")
        tensors = model.total - model.overhead - model.imbalance
        lines.append(f"    {'total, tensors':<36}{sim['tensors']:10.2f}{tensors:10.2f}"
                     f"{sim['tensors'] / tensors:11.2f}")
        predicted = model.total - model.imbalance  # uniform routing, as simulated
        lines.append(f"    {'total, + fixed overhead':<36}{sim['total']:10.2f}"
                     f"{predicted:10.2f}{sim['total'] / predicted:11.2f}")
    return "\n".join(lines)
