"""Peak memory per GPU at scale, by simulation (``plan --simulate``) against the memory model.

    python bench/bench_memory.py [--quick] [--out bench/results/memory.json] [--plot PNG]
        [--hf-config config.json --gpus N --seqs 2048,4096]

Rows: Llama-3-8B on 8 GPUs at sequence 2k, 4k, 8k, 16k and 32k, Llama-3-70B on 64 and
Llama-3.1-405B on 256 at 4k, each for SimPO, DPO with a live reference and DPO with precomputed
reference log-probs, 80 GB GPUs. Each row is planned (the planner's layout), then its heaviest
ranks (first and last pipeline stage) run one real training step on fake tensors
(``megasimpo/simulate.py``). A layout with context parallelism is planned but not simulated (the
local spec's attention has no CP; TE's does), and a size with no layout says so. ``--quick``: the
8B rows up to 8k only. Prints a markdown table; writes the JSON and a PNG of peak GB per GPU
against the 80 GB line. These are simulations on a CPU, not GPU measurements.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megasimpo import atomic, planner  # noqa: E402
from megasimpo.config import LossConfig, ModelConfig  # noqa: E402
from megasimpo.memory_model import OVERHEAD_GB  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                       "configs")
SIZES = {"8b": ("llama3_8b.json", 8), "70b": ("llama3_70b.json", 64),
         "405b": ("llama3_405b.json", 256)}
LOSSES = (("simpo", "live"), ("dpo", "live"), ("dpo", "precomputed"))
GPU_GB = 80.0


def rows(quick: bool) -> list:
    """(size, seq_length) pairs in sweep order."""
    seqs = (2048, 4096, 8192) if quick else (2048, 4096, 8192, 16384, 32768)
    out = [("8b", s) for s in seqs]
    return out if quick else out + [("70b", 4096), ("405b", 4096)]


def run_row(size: str, seq: int, loss: str, ref: str) -> dict:
    """One planned and (when it can be) simulated row."""
    from megasimpo.simulate import simulate

    config, gpus = SIZES[size]
    model = ModelConfig.from_hf(config if os.path.isabs(config) else os.path.join(CONFIGS, config))
    row = {"model": size, "gpus": gpus, "seq_length": seq, "loss": loss, "ref": ref}
    try:
        plan = planner.plan(model, gpus, gpu_mem_gb=GPU_GB, seq_length=seq, loss=loss, ref=ref)
    except ValueError as e:
        return dict(row, status=f"no layout: {e}")
    row.update(layout=f"tp{plan.layout.tp} pp{plan.layout.pp} cp{plan.layout.cp} dp{plan.layout.dp}"
                      + (" recompute" if plan.recompute else ""),
               model_gb=round(plan.memory.total, 2))
    if plan.layout.cp > 1:
        return dict(row, status="planned only: CP needs TE attention to simulate")
    t0 = time.time()
    sims = simulate(plan, model, loss=LossConfig(name=loss), ref=ref)
    peak = max(sims, key=lambda r: r["total"])
    return dict(row, status="simulated", simulated_gb=round(peak["total"] + OVERHEAD_GB, 2),
                simulated_tensors_gb=round(peak["total"], 2), peak_rank=peak["rank"],
                activations_gb=round(peak["activations"], 2), seconds=round(time.time() - t0))


def table(results: list) -> str:
    """Markdown: one line per row."""
    lines = ["| model, GPUs | seq | loss | layout | model GB | simulated GB | status |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        loss = r["loss"] + (" (precomputed)" if r["ref"] == "precomputed" and r["loss"] != "simpo"
                            else " (live)" if r["loss"] != "simpo" else "")
        lines.append(f"| {r['model']}, {r['gpus']} | {r['seq_length']} | {loss} | "
                     f"{r.get('layout', '-')} | {r.get('model_gb', '-')} | "
                     f"{r.get('simulated_gb', '-')} | {r['status'].split(':')[0]} |")
    return "\n".join(lines)


def plot(results: list, path: str) -> None:
    """Peak GB per GPU (simulated, with the fixed overhead) per row, the 80 GB line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for loss, ref in LOSSES:
        pts = [(f"{r['model']}\n{r['seq_length'] // 1024}k", r["simulated_gb"]) for r in results
               if r["loss"] == loss and r["ref"] == ref and "simulated_gb" in r]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=loss if loss == "simpo" else f"{loss}, {ref} reference")
    ax.axhline(GPU_GB, color="red", linestyle="--", label=f"{GPU_GB:g} GB")
    ax.axhline(planner.MEMORY_FRACTION * GPU_GB, color="grey", linestyle=":",
               label=f"plan budget ({planner.MEMORY_FRACTION:.0%})")
    ax.set_ylabel("simulated peak GB per GPU (+ fixed overhead)")
    ax.set_title("Peak memory per GPU by simulation (planner's layout per row; CPU, fake tensors)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic.save_figure(fig, path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8B rows up to 8k only")
    p.add_argument("--out", default="bench/results/memory.json")
    p.add_argument("--plot", default="docs/memory_scaling.png")
    p.add_argument("--hf-config", help="sweep this model instead (with --gpus and --seqs)")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--seqs", default="2048,4096", help="with --hf-config: sequence lengths")
    args = p.parse_args(argv)
    sweep = rows(args.quick)
    if args.hf_config:
        SIZES["custom"] = (os.path.abspath(args.hf_config), args.gpus)
        sweep = [("custom", int(s)) for s in args.seqs.split(",")]
    results = []
    for size, seq in sweep:
        for loss, ref in LOSSES:
            results.append(run_row(size, seq, loss, ref))
            print(json.dumps(results[-1]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".partial", "w") as f:
        json.dump({"kind": "simulation (CPU, fake tensors)", "gpu_gb": GPU_GB,
                   "overhead_gb": OVERHEAD_GB, "rows": results}, f, indent=1)
    os.replace(args.out + ".partial", args.out)
    if args.plot:
        plot(results, args.plot)
    print(table(results))


if __name__ == "__main__":
    main()
