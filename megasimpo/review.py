"""Review of a training run from RUN_DIR/metrics.jsonl: trends, flags, the report data.

This module reads the run and computes what review.json holds; ``megasimpo.review_render``
turns that into review.md and review.png and writes all three (``write_review``).

Training metrics are noisy (each step sees different pairs), so a training trend compares the mean
of the first and the last ``TRAIN_WINDOW`` of the logged steps and counts only when the change is
beyond ``NUM_SE`` standard errors of that difference and beyond ``REL_TOL`` of the values' size.
Held-out metrics come from full passes over one fixed set, so their changes are not sampling noise:
the first and the last evaluation are compared with ``REL_TOL`` alone (``ACC_TOL``, absolute, for
accuracies). Flag rules (each flag carries the numbers that triggered it):

- ``over_optimisation`` / ``held_out_accuracy_flat``: training margins rising while held-out reward
  accuracy gained no more than ``ACC_TOL`` from its baseline evaluation to the last one.
- ``over_optimisation`` / ``held_out_loss_rising``: training loss falling while the last held-out
  loss is above the lowest earlier held-out loss by more than ``REL_TOL`` of it.
- ``likelihood_displacement`` (train and/or held-out): chosen and rejected rewards both falling.

Pure Python + numpy (matplotlib only for the PNG, in ``review_render``). No torch import, so a run
can be reviewed on any machine.
"""

import math
import os
from typing import Optional

import numpy as np

from megasimpo.jsonl import read_jsonl

TRAIN_WINDOW = 0.2  # share of the logged training rows in the early and in the late window
NUM_SE = 2.0  # a training change must exceed this many standard errors of the difference of means
REL_TOL = 0.01  # ... and 1% of the larger of the two values' magnitudes (held-out: this alone)
ACC_TOL = 0.02  # held-out accuracy gaining <= 2 points counts as flat
ZERO_REWARD = 1e-6  # |reward| below this at the first eval: reference-relative rewards at init

# Table order; nll_loss only exists for some losses, rank_accuracy only in newer runs.
QUALITY_KEYS = ("loss", "nll_loss", "rewards/margins", "rewards/accuracies", "rank_accuracy",
                "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
                "lengths/chosen", "lengths/rejected")
TRAIN_ONLY_KEYS = ("grad_norm", "lr")
THROUGHPUT_KEYS = ("tokens_per_sec", "tflops_per_gpu", "mfu", "mem_peak_gb", "step_time_s")
# What logps/* means per loss (megasimpo/losses.py): summed over response tokens or averaged.
SUMMED_LOGPS_LOSSES = ("dpo", "ipo", "cpo", "rdpo", "dpo_norm")
AVERAGED_LOGPS_LOSSES = ("simpo", "orpo", "sft", "alphapo")  # sft logs a_w, a_l as SimPO does


# ----- reading ------------------------------------------------------------------------------------

def load_rows(run_dir: str) -> list:
    """The rows of RUN_DIR/metrics.jsonl, checked; ValueError naming ``file:line`` for a bad line."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file (is {run_dir!r} a run directory?)")
    rows = []
    for lineno, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{path}:{lineno}: 'step' must be an integer >= 0, got {step!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: empty, no metric rows")
    return rows


def load_config(run_dir: str) -> Optional[dict]:
    """RUN_DIR/config.yaml as a dict, or None when the run has none."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    import yaml

    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    return cfg if isinstance(cfg, dict) else None


def _num(v) -> Optional[float]:
    """A finite float, or None for a missing / null / non-numeric / non-finite value."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def split_rows(rows: list):
    """``(train_rows, eval_rows, notes)``, each sorted by step, the last row of a step winning.

    A resumed run appends to metrics.jsonl, so a step may appear twice; the later row is the one
    the run continued from.
    """
    train, evals, notes = {}, {}, []
    dup_train = dup_eval = 0
    for row in rows:
        if "loss" in row and row["step"] >= 1:
            dup_train += row["step"] in train
            train[row["step"]] = row
        if any(k.startswith("eval_") for k in row):
            dup_eval += row["step"] in evals
            evals[row["step"]] = row
    if dup_train or dup_eval:
        notes.append(f"{dup_train} training and {dup_eval} held-out steps appear more than once "
                     "(a resumed run?); the last row of each step is used")
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)], notes


def series(rows: list, key: str):
    """``(steps, values)`` of the rows where ``key`` holds a number."""
    pairs = [(r["step"], _num(r.get(key))) for r in rows]
    pairs = [(s, v) for s, v in pairs if v is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


# ----- trends -------------------------------------------------------------------------------------

def _direction(delta: float, threshold: float) -> str:
    return "rising" if delta > threshold else "falling" if delta < -threshold else "flat"


def train_trend(rows: list, key: str) -> Optional[dict]:
    """Early-vs-late window means of a training metric, or None when it is not logged.

    Window k = ceil(TRAIN_WINDOW * n) rows (at least 1); with fewer than 2 rows the trend is "n/a".
    The standard error is sqrt(var_early / k + var_late / k) (sample variances; 0 when k == 1).
    """
    steps, vals = series(rows, key)
    if not vals:
        return None
    n = len(vals)
    k = max(1, math.ceil(TRAIN_WINDOW * n))
    early, late = np.array(vals[:k]), np.array(vals[-k:])
    se = math.sqrt((early.var(ddof=1) + late.var(ddof=1)) / k) if k > 1 else 0.0
    e, la = float(early.mean()), float(late.mean())
    threshold = max(NUM_SE * se, REL_TOL * max(abs(e), abs(la)))
    return {"early": e, "late": la, "delta": la - e, "se": se, "threshold": threshold,
            "early_steps": [steps[0], steps[k - 1]], "late_steps": [steps[-k], steps[-1]],
            "num_rows": n, "trend": _direction(la - e, threshold) if n >= 2 else "n/a"}


def eval_trend(rows: list, key: str) -> Optional[dict]:
    """First-vs-last held-out value (plus min/max and their steps), or None when not logged."""
    steps, vals = series(rows, key)
    if not vals:
        return None
    first, last = vals[0], vals[-1]
    i_min, i_max = int(np.argmin(vals)), int(np.argmax(vals))
    threshold = REL_TOL * max(abs(first), abs(last))
    return {"first": first, "last": last, "delta": last - first, "threshold": threshold,
            "first_step": steps[0], "last_step": steps[-1], "min": vals[i_min],
            "min_step": steps[i_min], "max": vals[i_max], "max_step": steps[i_max],
            "num_evals": len(vals),
            "trend": _direction(last - first, threshold) if len(vals) >= 2 else "n/a"}


def _accuracy_baseline(evals: list) -> list:
    """The eval rows from the first one whose reward accuracy means something.

    At step 0 a reference-relative loss (DPO, IPO, R-DPO) has policy == reference, so every reward
    is 0 and ``chosen > rejected`` is false for all pairs: reward accuracy 0 is not a baseline.
    """
    if len(evals) >= 2 and all(
            _num(evals[0].get(f"eval_rewards/{k}")) is not None
            and abs(evals[0][f"eval_rewards/{k}"]) < ZERO_REWARD
            for k in ("chosen", "rejected", "margins")):
        return evals[1:]
    return evals


# ----- flags --------------------------------------------------------------------------------------

def _when(t: dict) -> str:
    """Where a trend's two values come from: train windows or held-out steps."""
    if "early_steps" in t:
        return (f"steps {t['early_steps'][0]}-{t['early_steps'][1]} vs "
                f"{t['late_steps'][0]}-{t['late_steps'][1]}")
    return f"step {t['first_step']} -> {t['last_step']}"


def _displacement_flag(source: str, chosen: dict, rejected: dict, logps: Optional[dict]) -> Optional[dict]:
    if not (chosen and rejected and chosen["trend"] == "falling" and rejected["trend"] == "falling"):
        return None
    a, b = ("early", "late") if source == "train" else ("first", "last")
    numbers = {"rewards/chosen": [chosen[a], chosen[b]], "rewards/rejected": [rejected[a], rejected[b]]}
    msg = (f"{source}: chosen and rejected rewards both fall ({_when(chosen)}: chosen {chosen[a]:.4g} -> "
           f"{chosen[b]:.4g}, rejected {rejected[a]:.4g} -> {rejected[b]:.4g}): the margin grows by "
           "pushing both likelihoods down, not by raising the chosen one (likelihood displacement)")
    if logps:
        numbers["logps/chosen"] = [logps[a], logps[b]]
        msg += f"; logps/chosen {logps[a]:.4g} -> {logps[b]:.4g} ({_when(logps)})"
    return {"name": "likelihood_displacement", "source": source, "message": msg, "numbers": numbers}


def compute_flags(train: dict, held_out: Optional[dict], acc: Optional[dict], eval_rows: list) -> list:
    """The flags (module docstring rules) from the train/held-out trend dicts and the eval rows."""
    flags = []
    margins, loss = train.get("rewards/margins"), train.get("loss")
    if held_out is not None:
        if margins and margins["trend"] == "rising" and acc and acc["num_evals"] >= 2 \
                and acc["delta"] <= ACC_TOL:
            flags.append({
                "name": "over_optimisation", "source": "train vs held-out",
                "rule": "held_out_accuracy_flat",
                "message": (f"training margins rise {margins['early']:.4g} -> {margins['late']:.4g} "
                            f"({_when(margins)}) while held-out "
                            f"reward accuracy goes {acc['first']:.4g} -> {acc['last']:.4g} "
                            f"(step {acc['first_step']} -> {acc['last_step']}, gain {acc['delta']:+.4g} "
                            f"<= {ACC_TOL})"),
                "numbers": {"train_margins": [margins["early"], margins["late"]],
                            "held_out_accuracy": [acc["first"], acc["last"]],
                            "held_out_accuracy_steps": [acc["first_step"], acc["last_step"]],
                            "held_out_accuracy_gain": acc["delta"]}})
        ev_loss = held_out.get("eval_loss")
        if loss and loss["trend"] == "falling" and ev_loss and ev_loss["num_evals"] >= 2:
            steps, vals = series(eval_rows, "eval_loss")
            i = int(np.argmin(vals[:-1]))
            rise = vals[-1] - vals[i]
            if rise > REL_TOL * abs(vals[i]):
                flags.append({
                    "name": "over_optimisation", "source": "train vs held-out",
                    "rule": "held_out_loss_rising",
                    "message": (f"held-out loss rises from its minimum {vals[i]:.4g} (step {steps[i]}) "
                                f"to {vals[-1]:.4g} (step {steps[-1]}, +{rise / abs(vals[i] or 1):.1%}) "
                                f"while training loss falls {loss['early']:.4g} -> {loss['late']:.4g}"),
                    "numbers": {"held_out_loss_min": vals[i], "held_out_loss_min_step": steps[i],
                                "held_out_loss_last": vals[-1], "held_out_loss_last_step": steps[-1],
                                "train_loss": [loss["early"], loss["late"]]}})
    f = _displacement_flag("train", train.get("rewards/chosen"), train.get("rewards/rejected"),
                           train.get("logps/chosen"))
    flags += [f] if f else []
    if held_out is not None:
        f = _displacement_flag("held-out", held_out.get("eval_rewards/chosen"),
                               held_out.get("eval_rewards/rejected"), held_out.get("eval_logps/chosen"))
        flags += [f] if f else []
    return flags


# ----- the review ---------------------------------------------------------------------------------

def _logps_note(loss_name: Optional[str], train: dict) -> str:
    if loss_name in AVERAGED_LOGPS_LOSSES:
        unit = f"per-token averages ({loss_name} logs average log-probs)"
    elif loss_name in SUMMED_LOGPS_LOSSES:
        unit = (f"sums over response tokens ({loss_name}); logps_per_token/* divides the batch means "
                "by the batch mean lengths")
    else:
        unit = "of unknown unit (no loss name in config.yaml)"
    parts = [f"logps/* are {unit}."]
    for key in ("logps/chosen", "logps/rejected", "logps_per_token/chosen", "logps_per_token/rejected"):
        t = train.get(key)
        if t:
            parts.append(f"{key} {t['early']:.4g} -> {t['late']:.4g} ({t['trend']}).")
    return " ".join(parts)


def _per_token_rows(rows: list, prefix: str = "") -> None:
    """Adds logps_per_token/* = logps/* / lengths/* (batch means) to rows, in place."""
    for r in rows:
        for side in ("chosen", "rejected"):
            s, n = _num(r.get(f"{prefix}logps/{side}")), _num(r.get(f"{prefix}lengths/{side}"))
            if s is not None and n:
                r[f"{prefix}logps_per_token/{side}"] = s / n


def review(run_dir: str) -> dict:
    """The full review of one run as plain data: what review.json holds, plus ``_series``.

    ``_series`` is ``(train_rows, eval_rows)`` for the plot; ``write_review`` pops it.
    """
    rows = load_rows(run_dir)
    cfg = load_config(run_dir) or {}
    run_cfg = cfg.get("run") if isinstance(cfg.get("run"), dict) else {}
    loss_cfg = run_cfg.get("loss") if isinstance(run_cfg.get("loss"), dict) else {}
    loss_name = loss_cfg.get("name")
    train_rows, eval_rows, notes = split_rows(rows)
    extra = ()
    if loss_name in SUMMED_LOGPS_LOSSES:
        train_rows, eval_rows = [dict(r) for r in train_rows], [dict(r) for r in eval_rows]
        _per_token_rows(train_rows)
        _per_token_rows(eval_rows, "eval_")
        extra = ("logps_per_token/chosen", "logps_per_token/rejected")
    skipped = []
    train = {}
    for key in QUALITY_KEYS + extra + TRAIN_ONLY_KEYS + THROUGHPUT_KEYS:
        t = train_trend(train_rows, key)
        if t:
            train[key] = t
    if not train_rows:
        skipped.append("training checks skipped: no training rows (rows with 'loss' and step >= 1)")
    elif len(train_rows) < 2:
        skipped.append("training trends skipped: only 1 training row")

    held_out = acc = None
    if not eval_rows:
        skipped.append("held-out checks skipped: no eval_* rows in metrics.jsonl "
                       "(train with --eval-data PREFIX --eval-interval N)")
    else:
        held_out = {}
        for key in QUALITY_KEYS + extra:
            t = eval_trend(eval_rows, "eval_" + key)
            if t:
                held_out["eval_" + key] = t
        acc = eval_trend(_accuracy_baseline(eval_rows), "eval_rewards/accuracies")
        if acc and acc["first_step"] != held_out["eval_rewards/accuracies"]["first_step"]:
            notes.append(f"held-out reward accuracy baseline is step {acc['first_step']}: at step "
                         f"{eval_rows[0]['step']} every reward is 0 (policy == reference)")
        if len(eval_rows) < 2:
            skipped.append(f"held-out trend checks skipped: {len(eval_rows)} held-out evaluation "
                           "(need >= 2)")
        elif acc is not None and acc["num_evals"] < 2:
            skipped.append("held-out accuracy check skipped: no evaluation after the accuracy baseline")
    flags = compute_flags(train, held_out, acc, eval_rows)

    lc, lr_ = train.get("lengths/chosen"), train.get("lengths/rejected")
    length_note = ("lengths/* are response lengths of the sampled dataset pairs, not of generations"
                   + (f" (mean chosen {np.mean(series(train_rows, 'lengths/chosen')[1]):.1f} vs "
                      f"rejected {np.mean(series(train_rows, 'lengths/rejected')[1]):.1f} tokens)"
                      if lc and lr_ else "")
                   + "; metrics.jsonl logs no generation lengths, so output-length drift cannot be "
                   "measured from it (generate and measure, e.g. length-controlled AlpacaEval).")
    return {
        "run_dir": os.path.abspath(run_dir),
        "loss": {"name": loss_name, "beta": loss_cfg.get("beta")} if loss_cfg else None,
        "num_rows": len(rows), "num_train_rows": len(train_rows), "num_eval_rows": len(eval_rows),
        "train_steps": [train_rows[0]["step"], train_rows[-1]["step"]] if train_rows else None,
        "eval_steps": [r["step"] for r in eval_rows],
        "rules": {"train_window": TRAIN_WINDOW, "num_se": NUM_SE, "rel_tol": REL_TOL,
                  "acc_tol": ACC_TOL},
        "train": train, "held_out": held_out, "held_out_accuracy": acc,
        "margin_gap_last": (train["rewards/margins"]["late"] - held_out["eval_rewards/margins"]["last"]
                            if held_out and "rewards/margins" in train
                            and "eval_rewards/margins" in held_out else None),
        "flags": flags, "skipped": skipped, "notes": notes,
        "logps_note": _logps_note(loss_name, train), "length_note": length_note,
        "_series": (train_rows, eval_rows),
    }
