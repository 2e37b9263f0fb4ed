"""Comparison of several runs (issue #16 item 6): one cell per run, the best cell per loss, and the
SimPO-vs-DPO decision by a fixed rule.

``megasimpo.compare_render`` turns the result into markdown, JSON and a PNG; ``tools/review_run.py
RUN_A RUN_B ...`` and ``examples/ablation_2x2.py`` call it.

A cell is one run, identified by its loss (``run.loss.name``) and LoRA rank (``run.lora.rank``, 0 =
full fine-tuning) from RUN_DIR/config.yaml. Its numbers come from RUN_DIR/metrics.jsonl:

- ``train_margin``: mean ``rewards/margins`` over the last ``TRAIN_WINDOW`` (20%) of the logged
  training steps (the late window of ``megasimpo.review``). Each training row is measured on that
  step's batch just before its update, so the train/held-out gap only measures over-fitting once
  the run has seen its training pairs before (more than one epoch).
- ``held_out_margin``, ``reward_acc``, ``rank_acc``: the last held-out evaluation
  (``eval_rewards/margins``, ``eval_rewards/accuracies``, ``eval_rank_accuracy``).
- ``pairs_won``: held-out pairs whose chosen response has the higher average log-probability,
  ``round(eval_rank_accuracy * eval_pairs)`` (``derived.eval_pairs`` of config.yaml). This is the
  one outcome defined the same way for every loss, so it is what the rule compares across losses.
  ``reward_won`` counts pairs by each loss's own reward (for SimPO the same ranking; for DPO the
  log-ratio against the reference) and is reported, not compared across losses.
- ``gap = train_margin - held_out_margin`` (over-optimisation signal) and ``rel_gap = gap /
  train_margin``. Margins are on different scales per loss (SimPO: beta * the difference of
  length-normalised log-probs; DPO: beta * the difference of summed log-ratios to the reference),
  so only ``rel_gap`` is compared across losses. It is undefined (None) when ``train_margin <= 0``.
- Reported, not used by the rule: the course of the held-out pairs won (``curve``: (step, pairs)
  per evaluation; ``start_pairs_won`` at step 0, ``peak_pairs_won`` and its earliest step) and the
  flags ``megasimpo.review`` raises on the run (over-optimisation, likelihood displacement). A
  cell whose final count is well below its peak was past its best when it stopped.

The rule (``decide``):

1. Best cell of a loss: the most held-out pairs won. Among cells that win the same number, start
   from the highest rank; a lower rank replaces the current choice when its ``train_margin`` is
   lower (same loss, so the same scale): the lower rank holds the held-out result while fitting the
   training pairs less. Then the next lower rank is checked against the new choice.
2. Switch to SimPO only if SimPO's best cell wins at least ``MIN_EXTRA_PAIRS`` (1) more held-out
   pairs than DPO's best cell AND has the smaller ``rel_gap`` (both defined). Otherwise stay with
   DPO; equal pairs won is reported as a tie (and DPO stays).

Pure Python + numpy; no torch import.
"""

import dataclasses
import os
from typing import Optional

from megasimpo.review import (TRAIN_WINDOW, _num, load_config, load_rows, review, split_rows,
                              train_trend)

MIN_EXTRA_PAIRS = 1  # SimPO must win at least this many more held-out pairs than DPO
BASELINE, CANDIDATE = "dpo", "simpo"


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run's comparable numbers (module docstring)."""

    name: str  # the run directory's base name
    run_dir: str
    loss: str
    rank: int  # LoRA rank, 0 = full fine-tuning
    alpha: Optional[float]
    beta: Optional[float]
    train_steps: int
    eval_pairs: int
    pairs_won: int
    reward_won: Optional[int]
    rank_acc: float
    reward_acc: Optional[float]
    train_margin: float
    held_out_margin: float
    curve: tuple = ()  # ((step, pairs won), ...) over the held-out evaluations
    flags: tuple = ()  # megasimpo.review's flags, "name (rule or source)"

    @property
    def start_pairs_won(self) -> Optional[int]:
        """Pairs won at the step-0 evaluation (before any update), None without one."""
        return self.curve[0][1] if self.curve and self.curve[0][0] == 0 else None

    @property
    def peak(self) -> tuple:
        """``(step, pairs won)`` of the evaluation winning the most pairs (the earliest of ties)."""
        return max(self.curve, key=lambda sp: (sp[1], -sp[0]))

    @property
    def label(self) -> str:
        """``simpo r=16`` (``full`` for rank 0)."""
        return f"{self.loss} " + (f"r={self.rank}" if self.rank else "full")

    @property
    def gap(self) -> float:
        """Train minus held-out margin, in this loss's own units."""
        return self.train_margin - self.held_out_margin

    @property
    def rel_gap(self) -> Optional[float]:
        """``gap / train_margin``, the scale-free gap; None when ``train_margin <= 0``."""
        return self.gap / self.train_margin if self.train_margin > 0 else None

    def to_dict(self) -> dict:
        """The cell as plain data, with label, gap and rel_gap."""
        return {**dataclasses.asdict(self), "label": self.label, "gap": self.gap,
                "rel_gap": self.rel_gap, "start_pairs_won": self.start_pairs_won,
                "peak_step": self.peak[0], "peak_pairs_won": self.peak[1]}


def _section(cfg: dict, *keys):
    for k in keys:
        cfg = cfg.get(k) if isinstance(cfg, dict) else None
    return cfg


def cell_from_run(run_dir: str) -> Cell:
    """The cell of one run; ValueError naming the file and what is missing."""
    rows = load_rows(run_dir)
    cfg_path = os.path.join(run_dir, "config.yaml")
    cfg = load_config(run_dir)
    if cfg is None:
        raise ValueError(f"{cfg_path}: no such file (needed for the run's loss and LoRA rank)")
    loss, rank = _section(cfg, "run", "loss", "name"), _section(cfg, "run", "lora", "rank")
    eval_pairs = _section(cfg, "derived", "eval_pairs")
    if not isinstance(loss, str):
        raise ValueError(f"{cfg_path}: no run.loss.name")
    rank = 0 if rank is None else rank  # runs from before LoRA: full fine-tuning
    if not isinstance(eval_pairs, int) or eval_pairs <= 0:
        raise ValueError(f"{cfg_path}: derived.eval_pairs is {eval_pairs!r}; the run needs "
                         "held-out data (train with --eval-data PREFIX)")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    train_rows, eval_rows, _ = split_rows(rows)
    margins = train_trend(train_rows, "rewards/margins")
    if margins is None:
        raise ValueError(f"{metrics}: no training rows with rewards/margins")
    last = eval_rows[-1] if eval_rows else {}
    rank_acc, held = _num(last.get("eval_rank_accuracy")), _num(last.get("eval_rewards/margins"))
    if rank_acc is None or held is None:
        raise ValueError(f"{metrics}: the last held-out row has no eval_rank_accuracy and "
                         "eval_rewards/margins (train with --eval-data PREFIX)")
    reward_acc = _num(last.get("eval_rewards/accuracies"))
    curve = tuple((r["step"], round(_num(r["eval_rank_accuracy"]) * eval_pairs)) for r in eval_rows
                  if _num(r.get("eval_rank_accuracy")) is not None)
    flags = tuple(f"{f['name']} ({f.get('rule') or f['source']})" for f in review(run_dir)["flags"])
    return Cell(name=os.path.basename(os.path.normpath(run_dir)), run_dir=os.path.abspath(run_dir),
                loss=loss, rank=int(rank), alpha=_section(cfg, "run", "lora", "alpha"),
                beta=_section(cfg, "run", "loss", "beta"), train_steps=train_rows[-1]["step"],
                eval_pairs=eval_pairs, pairs_won=round(rank_acc * eval_pairs),
                reward_won=None if reward_acc is None else round(reward_acc * eval_pairs),
                rank_acc=rank_acc, reward_acc=reward_acc, train_margin=margins["late"],
                held_out_margin=held, curve=curve, flags=flags)


def best_cell(cells: list) -> Cell:
    """Rule 1 of the module docstring over the cells of one loss."""
    if len({c.loss for c in cells}) != 1:
        raise ValueError(f"best_cell takes the cells of one loss, got {sorted({c.loss for c in cells})}")
    most = max(c.pairs_won for c in cells)
    tied = sorted((c for c in cells if c.pairs_won == most), key=lambda c: -c.rank)
    best = tied[0]
    for c in tied[1:]:
        if c.rank < best.rank and c.train_margin < best.train_margin:
            best = c
    return best


def _fmt_gap(v: Optional[float]) -> str:
    return "undefined (train margin <= 0)" if v is None else f"{v:.3f}"


def decide(cells: list) -> dict:
    """The best cell per loss and the decision (rule 2); plain data with the reasons in words."""
    if not cells:
        raise ValueError("no runs to compare")
    by_loss = {}
    for c in cells:
        by_loss.setdefault(c.loss, []).append(c)
    best = {loss: best_cell(cs) for loss, cs in by_loss.items()}
    out = {"best": {loss: {"label": c.label, "run_dir": c.run_dir} for loss, c in best.items()},
           "min_extra_pairs": MIN_EXTRA_PAIRS,
           "train_window": TRAIN_WINDOW}
    reasons = []
    for loss, cs in by_loss.items():
        b, ranks = best[loss], sorted({c.rank for c in cs}, reverse=True)
        if len(cs) > 1:
            top = max(c.pairs_won for c in cs)
            others = [c.label for c in cs if c.pairs_won == top and c is not b]
            if not others:
                why = f"wins the most held-out pairs ({top}/{b.eval_pairs})"
            else:
                why = f"ties at {top}/{b.eval_pairs} pairs won with {', '.join(others)}" + (
                    "; the lower rank holds it with a lower training margin"
                    if b.rank < max(c.rank for c in cs if c.pairs_won == top)
                    else "; no lower rank had a lower training margin")
            reasons.append(f"best {loss} cell: {b.label} (ranks {ranks}): {why}")
    if BASELINE not in best or CANDIDATE not in best:
        out.update(decision="none", chosen=None,
                   summary=f"no decision: the rule needs at least one {CANDIDATE} and one "
                           f"{BASELINE} run (got {sorted(best)})")
        out["reasons"] = reasons
        return out
    s, d = best[CANDIDATE], best[BASELINE]
    more = s.pairs_won - d.pairs_won
    wins = more >= MIN_EXTRA_PAIRS
    gap_ok = s.rel_gap is not None and d.rel_gap is not None and s.rel_gap < d.rel_gap
    reasons.append(f"held-out pairs won: {s.label} {s.pairs_won} vs {d.label} {d.pairs_won} "
                   f"({more:+d}; the rule needs >= +{MIN_EXTRA_PAIRS}): "
                   + ("met" if wins else "not met"))
    reasons.append(f"relative margin gap (train - held-out) / train: {s.label} "
                   f"{_fmt_gap(s.rel_gap)} vs {d.label} {_fmt_gap(d.rel_gap)} (SimPO's must be "
                   "smaller): " + ("met" if gap_ok else "not met"))
    if wins and gap_ok:
        decision, chosen = "switch_to_simpo", s
    else:
        decision, chosen = ("tie" if more == 0 else "stay_with_dpo"), d
    summary = {"switch_to_simpo": f"switch to SimPO ({s.label})",
               "stay_with_dpo": f"stay with DPO ({d.label})",
               "tie": f"tie on held-out pairs won: stay with DPO ({d.label})"}[decision]
    out.update(decision=decision, chosen={"label": chosen.label, "run_dir": chosen.run_dir},
               summary=summary, reasons=reasons)
    return out


def compare(run_dirs: list) -> dict:
    """Cells and decision of a set of runs, as what comparison.json holds."""
    cells = [cell_from_run(r) for r in run_dirs]
    return {"cells": [c.to_dict() for c in cells], "decision": decide(cells)}
