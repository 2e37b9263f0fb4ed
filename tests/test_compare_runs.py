"""megasimpo/compare_runs.py and `tools/review_run.py RUN_A RUN_B ...` on hand-made run directories
(pure, no torch): each cell's numbers by hand, the decision rule at its boundaries, the refusals."""

import json
import os

import pytest

from megasimpo.compare_runs import best_cell, cell_from_run, compare, decide
from fixtures import load_script

EVAL_PAIRS = 200


def _tool_main(argv):
    return load_script("tools/review_run.py").main(argv)


def _run(path, loss, rank, train_margins, evals, eval_pairs=EVAL_PAIRS):
    """A run directory as the trainer writes it, reduced to what the comparison reads.

    ``train_margins``: rewards/margins of steps 1..n; ``evals``: {step: (rank_acc, reward_acc,
    held-out margin)}, merged into the training row of that step (step 0: a row of its own)."""
    os.makedirs(path, exist_ok=True)
    rows = [{"step": 0}] if 0 in evals else []
    rows += [{"step": s, "loss": 0.5, "rewards/margins": m} for s, m in enumerate(train_margins, 1)]
    for row in rows:
        if row["step"] in evals:
            acc, racc, margin = evals[row["step"]]
            row.update({"eval_rank_accuracy": acc, "eval_rewards/accuracies": racc,
                        "eval_rewards/margins": margin, "eval_loss": 0.6})
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    lora = f"  lora:\n    rank: {rank}\n    alpha: {2 * rank}\n" if rank else ""
    with open(os.path.join(path, "config.yaml"), "w") as f:
        f.write(f"run:\n  loss:\n    name: {loss}\n    beta: 2.0\n{lora}"
                f"derived:\n  eval_pairs: {eval_pairs}\n")
    return str(path)


def _cell(tmp_path, name, loss, rank, train_margin, acc, held_margin=0.5):
    """A cell whose late training margin is ``train_margin`` and final rank accuracy ``acc``."""
    return cell_from_run(_run(tmp_path / name, loss, rank, [train_margin] * 10,
                              {0: (0.5, 0.5, 0.0), 10: (acc, acc, held_margin)}))


def test_cell_numbers_by_hand(tmp_path):
    # 10 training rows: the late window is the last ceil(0.2 * 10) = 2 rows, margins 3.0 and 5.0.
    margins = [0.1 * i for i in range(8)] + [3.0, 5.0]
    run = _run(tmp_path / "dpo_r8", "dpo", 8, margins,
               {0: (0.5, 0.5, 0.0), 4: (0.61, 0.55, 1.0), 8: (0.61, 0.6, 1.5), 10: (0.6, 0.51, 1.5)})
    c = cell_from_run(run)
    assert (c.name, c.loss, c.rank, c.alpha, c.beta, c.train_steps) == ("dpo_r8", "dpo", 8, 16, 2.0, 10)
    assert c.train_margin == pytest.approx(4.0)
    assert (c.held_out_margin, c.rank_acc, c.reward_acc) == (1.5, 0.6, 0.51)
    assert (c.pairs_won, c.reward_won) == (120, 102)  # 0.6 x 200, 0.51 x 200
    assert c.gap == pytest.approx(2.5) and c.rel_gap == pytest.approx(2.5 / 4.0)
    assert c.curve == ((0, 100), (4, 122), (8, 122), (10, 120))
    assert c.start_pairs_won == 100 and c.peak == (4, 122)  # the earliest of the tied peaks
    d = c.to_dict()
    assert (d["label"], d["peak_step"], d["peak_pairs_won"], d["start_pairs_won"]) == \
        ("dpo r=8", 4, 122, 100)
    assert "over_optimisation (held_out_accuracy_flat)" in c.flags  # margins rise, accuracy +0.01


def test_full_fine_tuning_run_is_rank_zero_and_negative_margin_has_no_relative_gap(tmp_path):
    c = _cell(tmp_path, "simpo_full", "simpo", 0, -0.5, 0.7)
    assert c.rank == 0 and c.label == "simpo full" and c.alpha is None
    assert c.rel_gap is None and c.gap == pytest.approx(-1.0)


def test_best_cell_prefers_the_lower_rank_only_with_a_lower_training_margin(tmp_path):
    r16 = _cell(tmp_path, "a", "simpo", 16, 2.0, 0.7)
    r8_lower = _cell(tmp_path, "b", "simpo", 8, 1.5, 0.7)
    r8_higher = _cell(tmp_path, "c", "simpo", 8, 2.5, 0.7)
    r4_lower = _cell(tmp_path, "d", "simpo", 4, 1.0, 0.7)
    r4_fewer = _cell(tmp_path, "e", "simpo", 4, 0.1, 0.695)  # 139 pairs, not 140
    assert best_cell([r16, r8_lower]) is r8_lower
    assert best_cell([r8_lower, r16]) is r8_lower  # order of the runs does not matter
    assert best_cell([r16, r8_higher]) is r16
    assert best_cell([r16, r8_lower, r4_lower]) is r4_lower  # each step down checked in turn
    assert best_cell([r16, r8_higher, r4_lower]) is r4_lower
    assert best_cell([r16, r4_fewer]) is r16  # more pairs won comes first
    with pytest.raises(ValueError, match="cells of one loss"):
        best_cell([r16, _cell(tmp_path, "f", "dpo", 16, 1.0, 0.7)])


@pytest.mark.parametrize("simpo_acc,simpo_margin,held,decision", [
    # SimPO train margin 2.0, held-out 1.5: relative gap 0.25, smaller than DPO's 0.8.
    (0.705, 2.0, 1.5, "switch_to_simpo"),  # 141 vs 140 pairs: +1, the minimum
    (0.70, 2.0, 1.5, "tie"),  # 140 vs 140: DPO stays
    (0.69, 2.0, 1.5, "stay_with_dpo"),  # 138: fewer pairs
    (0.80, 0.6, -1.0, "stay_with_dpo"),  # 160 pairs, but relative gap 1.6 / 0.6 = 2.67 > 0.8
    (0.80, 2.0, 1.6, "switch_to_simpo"),  # the same pairs with a small gap
    (0.80, -1.0, -1.2, "stay_with_dpo"),  # training margin <= 0: relative gap undefined
])
def test_decision_rule_boundaries(tmp_path, simpo_acc, simpo_margin, held, decision):
    # DPO: 140/200 pairs, train margin 2.5, held-out 0.5: relative gap 0.8.
    dpo = _cell(tmp_path, "dpo", "dpo", 16, 2.5, 0.70, held_margin=0.5)
    simpo = _cell(tmp_path, "simpo", "simpo", 16, simpo_margin, simpo_acc, held_margin=held)
    d = decide([simpo, dpo])
    assert d["decision"] == decision
    chosen = simpo if decision == "switch_to_simpo" else dpo
    assert d["chosen"] == {"label": chosen.label, "run_dir": chosen.run_dir}
    assert d["best"] == {"simpo": {"label": "simpo r=16", "run_dir": simpo.run_dir},
                         "dpo": {"label": "dpo r=16", "run_dir": dpo.run_dir}}
    assert any(r.startswith("held-out pairs won: simpo r=16") for r in d["reasons"])


def test_decision_needs_both_losses(tmp_path):
    d = decide([_cell(tmp_path, "a", "simpo", 16, 2.0, 0.7), _cell(tmp_path, "b", "simpo", 8, 1.0, 0.7)])
    assert d["decision"] == "none" and d["chosen"] is None and "at least one simpo and one dpo" in \
        d["summary"]
    with pytest.raises(ValueError, match="no runs"):
        decide([])


def test_unusable_runs_are_refused_naming_the_file(tmp_path):
    run = _run(tmp_path / "r", "dpo", 8, [1.0] * 5, {5: (0.6, 0.6, 0.1)})
    os.remove(os.path.join(run, "config.yaml"))
    with pytest.raises(ValueError, match=r"r/config\.yaml: no such file"):
        cell_from_run(run)
    run = _run(tmp_path / "no_eval_data", "dpo", 8, [1.0] * 5, {5: (0.6, 0.6, 0.1)}, eval_pairs=0)
    with pytest.raises(ValueError, match=r"config\.yaml: derived\.eval_pairs is 0.*--eval-data"):
        cell_from_run(run)
    run = _run(tmp_path / "no_evals", "dpo", 8, [1.0] * 5, {})
    with pytest.raises(ValueError, match=r"metrics\.jsonl: the last held-out row has no"):
        cell_from_run(run)


def test_review_run_compares_several_runs(tmp_path, capsys):
    runs = [_run(tmp_path / "runs" / f"{loss}_r{r}", loss, r, [m] * 10,
                 {0: (0.5, 0.5, 0.0), 5: (acc + 0.05, acc, 1.0), 10: (acc, acc, held)})
            for loss, r, m, acc, held in [("simpo", 16, 2.0, 0.75, 1.5), ("simpo", 8, 1.8, 0.75, 1.5),
                                          ("dpo", 16, 2.5, 0.70, 0.5), ("dpo", 8, 2.0, 0.69, 0.5)]]
    assert _tool_main(runs) == 0
    out = capsys.readouterr()
    out_dir = tmp_path / "runs" / "comparison"  # beside the runs by default
    assert "decision: switch_to_simpo" in out.err
    md = (out_dir / "comparison.md").read_text()
    assert md == out.out and "**Decision: switch to SimPO (simpo r=8).**" in md
    assert "| simpo r=8 | 100 | 160 (5) | 150 | -10 |" in md  # start, best (step), final, drop
    result = json.loads((out_dir / "comparison.json").read_text())
    assert [c["label"] for c in result["cells"]] == ["simpo r=16", "simpo r=8", "dpo r=16", "dpo r=8"]
    assert result == {**json.loads(json.dumps(compare(runs))), "files": result["files"]}
    assert (out_dir / "comparison.png").stat().st_size > 10_000
    assert sorted(os.listdir(out_dir)) == ["comparison.json", "comparison.md", "comparison.png"]


def test_review_run_refuses_the_same_run_twice_and_an_unusable_run(tmp_path, capsys):
    run = _run(tmp_path / "a", "dpo", 8, [1.0] * 5, {5: (0.6, 0.6, 0.1)})
    assert _tool_main([run, str(tmp_path / "." / "a")]) == 2
    assert "is the same run directory as" in capsys.readouterr().err
    other = _run(tmp_path / "b", "simpo", 8, [1.0] * 5, {})
    assert _tool_main([run, other, "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("review_run: error: ") and os.path.join(other, "metrics.jsonl") in err
    assert not (tmp_path / "cmp").exists()  # nothing written for a refused comparison
