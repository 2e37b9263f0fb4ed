"""Rendering and writing of a run comparison (``megasimpo.compare_runs``): NAME.md, .json, .png.

matplotlib draws on an Agg canvas without touching pyplot's global state and is imported only when
the plot is made.
"""

import json
import os
from typing import Optional

from megasimpo import atomic
from megasimpo.compare_runs import MIN_EXTRA_PAIRS, TRAIN_WINDOW, compare

SCALES_NOTE = (
    "Margins are in each loss's own units and are not comparable across losses: SimPO's are beta x "
    "the difference of length-normalised (average) log-probs, DPO's beta x the difference of summed "
    "log-ratios to the reference (with LoRA and `--ref live`, the same model with its adapters off). "
    "Across losses the rule compares only held-out pairs won (same definition for every loss) and "
    "the relative gap (train - held-out) / train.")


def _f(v, digits=3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def render_markdown(result: dict, title: str = "Run comparison") -> str:
    """Table of cells, the decision with its reasons, and how the numbers are defined."""
    cells, d = result["cells"], result["decision"]
    lines = [f"# {title}", "",
             "| cell | run | steps | train margin | held-out margin | gap | relative gap "
             "| held-out reward acc | held-out rank acc | pairs won (avg log-prob) "
             "| pairs won (own reward) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        best = " **(best)**" if d["best"][c["loss"]]["run_dir"] == c["run_dir"] and \
            sum(x["loss"] == c["loss"] for x in cells) > 1 else ""
        won = f"{c['pairs_won']}/{c['eval_pairs']}"
        rwon = "–" if c["reward_won"] is None else f"{c['reward_won']}/{c['eval_pairs']}"
        lines.append(f"| {c['label']}{best} | `{c['name']}` | {c['train_steps']} "
                     f"| {_f(c['train_margin'])} | {_f(c['held_out_margin'])} | {_f(c['gap'])} "
                     f"| {_f(c['rel_gap'])} | {_f(c['reward_acc'])} | {_f(c['rank_acc'])} "
                     f"| {won} | {rwon} |")
    lines += ["", f"**Decision: {d['summary']}.**", ""] + [f"- {r}" for r in d["reasons"]]
    lines += ["", "## Over the run", "",
              "Held-out pairs won (avg log-prob) at the step-0 evaluation, at the best evaluation "
              "and at the last one, and the flags `tools/review_run.py RUN_DIR` raises on each run "
              "(reported, not used by the rule).", "",
              "| cell | start | best (step) | final | final - best | review flags |",
              "|---|---:|---:|---:|---:|---|"]
    for c in cells:
        start = "–" if c["start_pairs_won"] is None else str(c["start_pairs_won"])
        lines.append(f"| {c['label']} | {start} | {c['peak_pairs_won']} ({c['peak_step']}) "
                     f"| {c['pairs_won']} | {c['pairs_won'] - c['peak_pairs_won']:+d} "
                     f"| {', '.join(c['flags']) or 'none'} |")
    lines += ["", "## How the numbers are defined", "",
              f"- train margin: mean `rewards/margins` over the last {TRAIN_WINDOW:.0%} of logged "
              "training steps (each measured on its batch before that step's update); held-out "
              "margin and accuracies: the last held-out evaluation.",
              "- pairs won (avg log-prob): held-out pairs whose chosen response has the higher "
              "average log-probability (`eval_rank_accuracy` x held-out pairs); pairs won (own "
              "reward): by the loss's reward (`eval_rewards/accuracies`), reported only.",
              "- gap = train margin - held-out margin (over-optimisation signal); relative gap = "
              "gap / train margin (undefined when the train margin is <= 0).",
              f"- {SCALES_NOTE}",
              "- Rule: the best cell of a loss wins the most held-out pairs; among equal counts a "
              "lower rank replaces a higher one when its training margin is lower. Switch to "
              f"SimPO only if its best cell wins >= {MIN_EXTRA_PAIRS} more held-out pair(s) than "
              "DPO's best AND has the smaller relative gap; otherwise DPO stays (equal counts: "
              "tie). Code: `megasimpo/compare_runs.py`."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> str:
    """Per cell: pairs won, relative gap, and train vs held-out margins (own units, per loss)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = result["cells"]
    labels = [c["label"] for c in cells]
    colors = ["C0" if c["loss"] == "simpo" else "C3" if c["loss"] == "dpo" else "C7" for c in cells]
    fig = Figure(figsize=(13, 8.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    x = list(range(len(cells)))
    ax = axes[0]
    ax.bar(x, [c["pairs_won"] for c in cells], color=colors)
    for i, c in enumerate(cells):
        ax.text(i, c["pairs_won"], f"{c['pairs_won']}/{c['eval_pairs']}", ha="center", va="bottom")
    ax.set(title="held-out pairs won (chosen has higher avg log-prob)", xticks=x)
    ax.set_xticklabels(labels, rotation=15)
    ax = axes[1]
    ax.bar(x, [c["rel_gap"] if c["rel_gap"] is not None else 0.0 for c in cells], color=colors)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(title="relative margin gap (train - held-out) / train", xticks=x)
    ax.set_xticklabels(labels, rotation=15)
    ax = axes[2]
    ax.bar([i - 0.2 for i in x], [c["train_margin"] for c in cells], 0.4, label="train (late)",
           color=colors, alpha=0.5)
    ax.bar([i + 0.2 for i in x], [c["held_out_margin"] for c in cells], 0.4, label="held-out (last)",
           color=colors)
    ax.set(title="margins (each loss in its own units)", xticks=x)
    ax.set_xticklabels(labels, rotation=15)
    ax.legend(fontsize=8)
    ax = axes[3]
    for c, color, style in zip(cells, colors, ["-", "--", ":", "-."] * len(cells)):
        steps, won = zip(*c["curve"])
        ax.plot(steps, won, style, color=color, marker="o", ms=3, label=c["label"])
    ax.set(title="held-out pairs won over the run", xlabel="step")
    ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"decision: {result['decision']['summary']}")
    fig.tight_layout()
    return atomic.save_figure(fig, path)


def write_comparison(run_dirs: list, out_dir: str, name: str = "comparison",
                     title: str = "Run comparison", preamble: Optional[str] = None):
    """Writes OUT/NAME.md, NAME.json and NAME.png (each through a temporary file and a rename).

    ``preamble`` (markdown) goes after the title. Returns ``(result dict, markdown str)``;
    ValueError naming the file for a run that cannot be compared.
    """
    result = compare(run_dirs)
    os.makedirs(out_dir, exist_ok=True)
    result["files"] = {k: os.path.join(out_dir, f"{name}.{k}") for k in ("md", "json", "png")}
    plot(result, result["files"]["png"])
    md = render_markdown(result, title)
    if preamble:
        head, rest = md.split("\n", 1)
        md = head + "\n\n" + preamble.strip() + "\n" + rest
    md += f"\n![comparison]({os.path.basename(result['files']['png'])})\n"
    atomic.write_text(result["files"]["md"], md)
    atomic.write_text(result["files"]["json"], json.dumps(result, indent=1))
    return result, md
