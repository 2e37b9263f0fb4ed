"""tools/review_run.py and megasimpo/review.py on synthetic metrics.jsonl files (pure, no torch)."""

import json
import math
import os

import numpy as np
import pytest

from multirank import run_main

from megasimpo.review import ACC_TOL, review
from megasimpo.review_render import write_review
from fixtures import load_script


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "review_run.py")


def _tool_main(argv):
    return load_script("tools/review_run.py").main(argv)


def _write_run(run_dir, train_fn, eval_fn=None, num_steps=100, eval_every=20, loss="simpo",
               seed=0, eval_at_zero=True):
    """metrics.jsonl in the trainer's shape: optional step-0 eval row, eval merged into train rows.

    train_fn(t, rng) / eval_fn(t) give the metric values at training progress t in [0, 1].
    """
    rng = np.random.default_rng(seed)
    os.makedirs(run_dir, exist_ok=True)
    rows = []
    if eval_fn and eval_at_zero:
        rows.append({"step": 0, **{f"eval_{k}": v for k, v in eval_fn(0.0).items()}})
    for step in range(1, num_steps + 1):
        t = step / num_steps
        m = train_fn(t, rng)
        row = {"step": step, **m, "rewards/margins": m["rewards/chosen"] - m["rewards/rejected"],
               "logps/chosen": m["rewards/chosen"] / 2.0, "logps/rejected": m["rewards/rejected"] / 2.0,
               "lengths/chosen": 180.0 + rng.normal(0, 5), "lengths/rejected": 150.0 + rng.normal(0, 5),
               "lr": 1e-6 * min(1.0, 10 * t), "grad_norm": 1.0 + rng.normal(0, 0.1),
               "tokens_per_sec": 5000.0, "tflops_per_gpu": 1.5, "mfu": None, "mem_peak_gb": 3.2,
               "step_time_s": 0.8}
        if step % 10 == 0:  # a key some rows lack
            row["nll_loss"] = 1.2 - 0.1 * t
        if eval_fn and step % eval_every == 0:
            row.update({f"eval_{k}": v for k, v in eval_fn(t).items()})
        rows.append(row)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(f"run:\n  loss:\n    name: {loss}\n    beta: 2.5\n")
    return str(run_dir)


def _train_rising(t, rng):
    """Training margins rise (rejected falls faster than chosen rises), loss falls, acc rises."""
    chosen = -2.0 + 0.5 * t + rng.normal(0, 0.1)
    rejected = -2.2 - 2.0 * t + rng.normal(0, 0.1)
    margin = chosen - rejected
    return {"loss": math.log1p(math.exp(-margin)) + rng.normal(0, 0.02),
            "rewards/chosen": chosen, "rewards/rejected": rejected,
            "rewards/accuracies": min(1.0, 0.55 + 0.4 * t + rng.normal(0, 0.03)),
            "rank_accuracy": 0.55 + 0.3 * t}


def _eval_healthy(t):
    chosen, rejected = -2.0 + 0.3 * t, -2.1 - 1.2 * t
    return {"loss": 0.69 - 0.25 * t, "rewards/chosen": chosen, "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected, "rewards/accuracies": 0.56 + 0.2 * t,
            "rank_accuracy": 0.56 + 0.2 * t, "logps/chosen": chosen / 2, "logps/rejected": rejected / 2}


# Over-optimised held-out curve: accuracy flat then falling, loss dips then rises.
_OVER_ACC = {0.0: 0.60, 0.2: 0.61, 0.4: 0.60, 0.6: 0.59, 0.8: 0.58, 1.0: 0.57}
_OVER_LOSS = {0.0: 0.69, 0.2: 0.67, 0.4: 0.68, 0.6: 0.71, 0.8: 0.74, 1.0: 0.78}


def _eval_over(t):
    t = round(t, 1)
    return {**_eval_healthy(t), "loss": _OVER_LOSS[t], "rewards/accuracies": _OVER_ACC[t],
            "rewards/margins": 0.1 - 0.02 * t}


def _names(rep, name):
    return [f for f in rep["flags"] if f["name"] == name]


def test_healthy_run_has_no_flags(tmp_path):
    rep = review(_write_run(tmp_path / "run", _train_rising, _eval_healthy))
    assert rep["flags"] == [], rep["flags"]
    assert rep["train"]["rewards/margins"]["trend"] == "rising"
    assert rep["held_out"]["eval_rewards/margins"]["trend"] == "rising"
    assert rep["held_out_accuracy"]["first"] == pytest.approx(0.56)
    assert rep["held_out_accuracy"]["last"] == pytest.approx(0.76)
    assert rep["eval_steps"] == [0, 20, 40, 60, 80, 100]
    # The windows are the first and last 20 of 100 steps.
    assert rep["train"]["loss"]["early_steps"] == [1, 20]
    assert rep["train"]["loss"]["late_steps"] == [81, 100]


def test_over_optimised_run_is_flagged_with_numbers(tmp_path):
    rep = review(_write_run(tmp_path / "run", _train_rising, _eval_over))
    flags = {f["rule"]: f for f in _names(rep, "over_optimisation")}
    assert set(flags) == {"held_out_accuracy_flat", "held_out_loss_rising"}, rep["flags"]
    acc = flags["held_out_accuracy_flat"]["numbers"]
    assert acc["held_out_accuracy"] == pytest.approx([0.60, 0.57])
    assert acc["held_out_accuracy_steps"] == [0, 100]
    assert acc["held_out_accuracy_gain"] == pytest.approx(-0.03)
    early, late = acc["train_margins"]
    assert late - early > 1.5  # margins rise 0.2 + 2.5 t: ~2 between the window means
    loss = flags["held_out_loss_rising"]["numbers"]
    assert (loss["held_out_loss_min"], loss["held_out_loss_min_step"]) == (pytest.approx(0.67), 20)
    assert (loss["held_out_loss_last"], loss["held_out_loss_last_step"]) == (pytest.approx(0.78), 100)
    assert loss["train_loss"][1] < loss["train_loss"][0]
    assert not _names(rep, "likelihood_displacement")
    _, md = write_review(str(tmp_path / "run"))
    assert "**over_optimisation** (held_out_accuracy_flat)" in md and "0.6 -> 0.57" in md


def test_accuracy_gain_at_the_tolerance_counts_as_flat_and_above_does_not(tmp_path):
    def evals(gain):
        return lambda t: {**_eval_healthy(t), "rewards/accuracies": 0.6 + gain * t}

    flat = review(_write_run(tmp_path / "a", _train_rising, evals(ACC_TOL - 1e-9)))
    up = review(_write_run(tmp_path / "b", _train_rising, evals(ACC_TOL + 0.01)))
    assert [f["rule"] for f in _names(flat, "over_optimisation")] == ["held_out_accuracy_flat"]
    assert not _names(up, "over_optimisation")


def test_both_rewards_falling_is_likelihood_displacement(tmp_path):
    def train(t, rng):
        chosen, rejected = -1.0 - 2.0 * t + rng.normal(0, 0.1), -1.2 - 3.5 * t + rng.normal(0, 0.1)
        return {"loss": math.log1p(math.exp(-(chosen - rejected))), "rewards/chosen": chosen,
                "rewards/rejected": rejected, "rewards/accuracies": 0.6 + 0.3 * t, "rank_accuracy": 0.6}

    def evals(t):
        chosen, rejected = -1.0 - 1.5 * t, -1.2 - 2.5 * t
        return {**_eval_healthy(t), "rewards/chosen": chosen, "rewards/rejected": rejected,
                "rewards/margins": chosen - rejected, "logps/chosen": chosen / 2}

    rep = review(_write_run(tmp_path / "run", train, evals))
    flags = {f["source"]: f for f in _names(rep, "likelihood_displacement")}
    assert set(flags) == {"train", "held-out"}, rep["flags"]
    c0, c1 = flags["train"]["numbers"]["rewards/chosen"]
    r0, r1 = flags["train"]["numbers"]["rewards/rejected"]
    assert c1 < c0 - 1.0 and r1 < r0 - 2.0 and (c1 - r1) > (c0 - r0)
    assert flags["held-out"]["numbers"]["rewards/chosen"] == pytest.approx([-1.0, -2.5])
    assert flags["held-out"]["numbers"]["logps/chosen"] == pytest.approx([-0.5, -1.25])
    # The healthy run's chosen reward rises: no displacement there.
    assert not _names(review(_write_run(tmp_path / "ok", _train_rising, _eval_healthy)),
                      "likelihood_displacement")


def test_no_eval_rows_skips_held_out_checks(tmp_path):
    run = _write_run(tmp_path / "run", _train_rising, None)
    rep, md = write_review(run)
    assert rep["held_out"] is None and rep["eval_steps"] == []
    assert not _names(rep, "over_optimisation")
    assert any("held-out checks skipped" in s for s in rep["skipped"])
    assert "held-out checks skipped" in md
    assert os.path.getsize(os.path.join(run, "review", "review.png")) > 1000


def test_dpo_step0_zero_rewards_are_not_the_accuracy_baseline(tmp_path):
    # DPO at step 0: policy == reference, every reward 0, reward accuracy 0 (ties). Measured from
    # step 0 the accuracy "gains" 0.59; from the first real eval (step 20) it falls 0.61 -> 0.59.
    def evals(t):
        t = round(t, 1)
        if t == 0.0:
            return {"loss": math.log(2), "rewards/chosen": 0.0, "rewards/rejected": 0.0,
                    "rewards/margins": 0.0, "rewards/accuracies": 0.0, "rank_accuracy": 0.55}
        return {**_eval_healthy(t), "rewards/accuracies": 0.61 - 0.025 * (t - 0.2)}

    rep = review(_write_run(tmp_path / "run", _train_rising, evals, loss="dpo"))
    acc = [f for f in _names(rep, "over_optimisation") if f["rule"] == "held_out_accuracy_flat"]
    assert acc and acc[0]["numbers"]["held_out_accuracy_steps"] == [20, 100], rep["flags"]
    assert any("baseline is step 20" in n for n in rep["notes"])
    # Summed-logps loss: per-token log-probs are derived from logps / lengths.
    assert "logps_per_token/chosen" in rep["train"]


def test_resumed_run_duplicate_steps_last_row_wins(tmp_path):
    run = _write_run(tmp_path / "run", _train_rising, _eval_healthy)
    path = os.path.join(run, "metrics.jsonl")
    lines = _read_lines(path)
    with open(path, "a") as f:  # steps 99-100 repeated after a resume, with other values
        for line in lines[-2:]:
            row = json.loads(line)
            row["loss"] = 0.123
            f.write(json.dumps(row) + "\n")
    rep = review(run)
    assert rep["num_train_rows"] == 100
    assert any("more than once" in n for n in rep["notes"])


def _read_lines(path):
    with open(path) as f:
        return f.read().splitlines()


def _write_lines(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def test_bad_input_errors_name_the_file_and_line(tmp_path, capsys):
    run = _write_run(tmp_path / "run", _train_rising, _eval_healthy)
    path = os.path.join(run, "metrics.jsonl")
    lines = _read_lines(path)
    lines[2] = '{"step": 3, "loss": 0.5,'  # truncated write
    _write_lines(path, lines)
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: not valid JSON"):
        review(run)
    assert _tool_main([run]) == 2
    err = capsys.readouterr().err
    assert err.startswith("review_run: error: ") and f"{path}:3:" in err

    lines[2] = '{"loss": 0.5}'  # no step
    _write_lines(path, lines)
    assert _tool_main([run]) == 2
    assert f"{path}:3: 'step' must be an integer" in capsys.readouterr().err

    _write_lines(path, ["", ""])
    assert _tool_main([run]) == 2
    assert "empty" in capsys.readouterr().err
    assert _tool_main([str(tmp_path / "nowhere")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_writes_markdown_json_and_png(tmp_path):
    run = _write_run(tmp_path / "run", _train_rising, _eval_over)
    out = tmp_path / "out"
    p = run_main(TOOL, [run, "--out", str(out)], timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("# Run review:") and "## Flags" in p.stdout
    assert (out / "review.md").read_text() == p.stdout
    data = json.loads((out / "review.json").read_text())
    assert {f["rule"] for f in data["flags"]} == {"held_out_accuracy_flat", "held_out_loss_rising"}
    assert data["train"]["rewards/margins"]["trend"] == "rising"
    png = (out / "review.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out / "review.png") as im:
        im.verify()
        assert im.size == (1500, 800)


def test_sft_logps_have_a_unit():
    from megasimpo.review import _logps_note

    note = _logps_note("sft", {})
    assert "per-token averages" in note and "unknown" not in note
