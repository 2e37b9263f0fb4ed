"""Rendering and writing of a run review (``megasimpo.review``): review.md, .json and .png.

Takes the report dict ``review.review`` returns (this module depends on it, never the reverse);
matplotlib draws on an Agg canvas without touching pyplot's global state and is imported only when
a plot is made.
"""

import json
import os
from typing import Optional

from megasimpo import atomic
from megasimpo.review import (ACC_TOL, NUM_SE, QUALITY_KEYS, REL_TOL, THROUGHPUT_KEYS,
                              TRAIN_ONLY_KEYS, TRAIN_WINDOW, review, series)


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, int):
        return str(v)
    return f"{v:.3e}" if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3) else f"{v:.4g}"


def render_markdown(rep: dict) -> str:
    """The short markdown report: header, early/late table, flags, notes."""
    loss = rep["loss"] or {}
    head = [f"# Run review: {rep['run_dir']}", ""]
    desc = f"loss **{loss.get('name') or 'unknown'}**"
    desc += f" (beta {loss['beta']})" if loss.get("beta") else ""
    ts = rep["train_steps"]
    desc += (f" · {rep['num_train_rows']} training rows" + (f" (steps {ts[0]}–{ts[1]})" if ts else "")
             + f" · {rep['num_eval_rows']} held-out evaluations")
    if rep["eval_steps"]:
        es = rep["eval_steps"]
        desc += f" (steps {', '.join(map(str, es)) if len(es) <= 8 else f'{es[0]}, {es[1]}, …, {es[-1]}'})"
    head += [desc, ""]
    tr, ho = rep["train"], rep["held_out"] or {}
    w = tr.get("loss") or next(iter(tr.values()), None)
    early = f"train early (steps {w['early_steps'][0]}–{w['early_steps'][1]})" if w else "train early"
    late = f"train late (steps {w['late_steps'][0]}–{w['late_steps'][1]})" if w else "train late"
    e0 = ho.get("eval_loss") or next(iter(ho.values()), None)
    first = f"held-out first (step {e0['first_step']})" if e0 else "held-out first"
    last = f"held-out last (step {e0['last_step']})" if e0 else "held-out last"
    table = ["## Early vs late", "", f"| metric | {early} | {late} | trend | {first} | {last} | trend |",
             "|---|---:|---:|---|---:|---:|---|"]
    keys = [k for k in QUALITY_KEYS + ("logps_per_token/chosen", "logps_per_token/rejected")
            + TRAIN_ONLY_KEYS if k in tr or "eval_" + k in ho]
    for k in keys:
        t, h = tr.get(k), ho.get("eval_" + k)
        first_cell = _fmt(h and h["first"])
        if k == "rewards/accuracies" and rep["held_out_accuracy"]:
            h = rep["held_out_accuracy"]  # from its baseline eval, which may not be the first
            first_cell = _fmt(h["first"]) + (f" (step {h['first_step']})" if e0 and
                                              h["first_step"] != e0["first_step"] else "")
        table.append(f"| {k} | {_fmt(t and t['early'])} | {_fmt(t and t['late'])} "
                     f"| {t['trend'] if t else '–'} | {first_cell} | {_fmt(h and h['last'])} "
                     f"| {h['trend'] if h else '–'} |")
    if rep["margin_gap_last"] is not None:
        table += ["", f"Margin gap (late train − last held-out): {_fmt(rep['margin_gap_last'])}."]
    perf = [f"{k} {_fmt(tr[k]['late'])}" for k in THROUGHPUT_KEYS if k in tr]
    if perf:
        table += ["", "Throughput (late-window means): " + ", ".join(perf) + "."]
    flags = ["", "## Flags", ""]
    flags += [f"- **{f['name']}** ({f.get('rule', f['source'])}): {f['message']}" for f in rep["flags"]] \
        or ["- none"]
    notes = ["", "## Notes", ""] + [f"- {s}" for s in rep["skipped"] + rep["notes"]]
    notes += [f"- {rep['logps_note']}", f"- {rep['length_note']}",
              f"- Rules: train windows = first/last {TRAIN_WINDOW:.0%} of logged steps, a change counts "
              f"beyond {NUM_SE:g} standard errors and {REL_TOL:.0%}; held-out first vs last beyond "
              f"{REL_TOL:.0%} (accuracy flat = gain <= {ACC_TOL})."]
    return "\n".join(head + table + flags + notes) + "\n"


# ----- plots --------------------------------------------------------------------------------------

def plot(train_rows: list, eval_rows: list, path: str) -> str:
    """review.png: loss, margins, accuracies, rewards, grad_norm, lr (train lines, held-out dots)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 8))
    FigureCanvasAgg(fig)  # Agg canvas without touching pyplot's global backend
    axes = fig.subplots(2, 3).ravel()
    panels = [
        ("loss", [("loss", train_rows, "train"), ("eval_loss", eval_rows, "held-out")]),
        ("reward margin", [("rewards/margins", train_rows, "train"),
                           ("eval_rewards/margins", eval_rows, "held-out")]),
        ("accuracy", [("rewards/accuracies", train_rows, "train reward acc"),
                      ("eval_rewards/accuracies", eval_rows, "held-out reward acc"),
                      ("eval_rank_accuracy", eval_rows, "held-out rank acc")]),
        ("rewards", [("rewards/chosen", train_rows, "train chosen", "tab:green"),
                     ("rewards/rejected", train_rows, "train rejected", "tab:red"),
                     ("eval_rewards/chosen", eval_rows, "held-out chosen", "darkgreen"),
                     ("eval_rewards/rejected", eval_rows, "held-out rejected", "darkred")]),
        ("grad norm", [("grad_norm", train_rows, "train")]),
        ("learning rate", [("lr", train_rows, "train")]),
    ]
    for ax, (title, lines) in zip(axes, panels):
        drawn = 0
        for key, rows, label, *color in lines:
            steps, vals = series(rows, key)
            if not vals:
                continue
            held_out = key.startswith("eval_")
            ax.plot(steps, vals, "o-" if held_out else "-", label=label, color=(color or [None])[0],
                    alpha=1.0 if held_out else 0.6, markersize=4)
            drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        elif len(lines) > 1:
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return atomic.save_figure(fig, path)


def write_review(run_dir: str, out_dir: Optional[str] = None):
    """Writes OUT/review.md, review.json and review.png (OUT defaults to RUN_DIR/review), each
    through a temporary file and a rename.

    Returns ``(report dict, markdown str)``; ValueError for a missing, empty or malformed metrics file.
    """
    rep = review(run_dir)
    train_rows, eval_rows = rep.pop("_series")
    out_dir = out_dir or os.path.join(run_dir, "review")
    os.makedirs(out_dir, exist_ok=True)
    rep["files"] = {n: os.path.join(out_dir, f"review.{n}") for n in ("md", "json", "png")}
    plot(train_rows, eval_rows, rep["files"]["png"])
    md = render_markdown(rep) + f"\nPlot: {rep['files']['png']}\n"
    atomic.write_text(rep["files"]["md"], md)
    atomic.write_text(rep["files"]["json"], json.dumps(rep, indent=1))
    return rep, md
