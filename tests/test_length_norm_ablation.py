"""examples/length_norm_ablation.py: its metrics by hand, and a reduced end-to-end run (--quick)
that checks the files and their shapes, not the outcome of the study."""

import json
import os

import numpy as np
import pytest
from fixtures import load_script
from multirank import run_study


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "length_norm_ablation.py")


def _study():
    return load_script("examples/length_norm_ablation.py")


def test_spearman_with_ties_by_hand():
    lna = _study()
    # x ranks 0, 1, 2, 3; y = [1, 1, 2, 5] ranks 0.5, 0.5, 2, 3 (the tie shares its mean rank).
    rx, ry = np.array([0, 1, 2, 3.0]), np.array([0.5, 0.5, 2, 3])
    expected = ((rx - rx.mean()) * (ry - ry.mean())).sum() / np.sqrt(
        ((rx - rx.mean()) ** 2).sum() * ((ry - ry.mean()) ** 2).sum())
    assert lna.spearman([10, 20, 30, 40], [1, 1, 2, 5]) == pytest.approx(expected)
    assert lna.spearman([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)
    assert lna.spearman([3, 1, 2], [-3, -1, -2]) == pytest.approx(-1.0)
    assert lna.spearman([1, 2, 3], [4, 4, 4]) is None


def test_reward_margins_and_length_split_by_hand():
    lna = _study()
    # rows: chosen_logps, rejected_logps, chosen_tokens, rejected_tokens
    s = np.array([[-10.0, -6.0, 20, 4], [-3.0, -12.0, 3, 12]])
    ref = np.array([[-12.0, -7.0, 20, 4], [-2.0, -10.0, 3, 12]])
    # SimPO: -0.5 - -1.5 = 1; -1 - -1 = 0.  DPO: 2 - 1 = 1; -1 - -2 = 1.
    # DPO-norm: 2/20 - 1/4 = -0.15; -1/3 - -2/12 = -1/6.
    assert lna.reward_margin(s, ref, "simpo").tolist() == pytest.approx([1.0, 0.0])
    assert lna.reward_margin(s, ref, "dpo").tolist() == pytest.approx([1.0, 1.0])
    assert lna.reward_margin(s, ref, "dpo_norm").tolist() == pytest.approx([-0.15, -1 / 6])
    m = lna.pair_metrics(s, ref, "dpo")
    assert m["reward_acc"] == 1.0 and m["rank_acc"] == 0.5  # a tie (0) is not a win
    assert m["reward_acc_chosen_longer"] == 1.0 and m["reward_acc_chosen_shorter"] == 1.0
    m = lna.pair_metrics(s, ref, "dpo_norm")
    assert m["reward_acc"] == 0.0 and m["margin_length_spearman"] == pytest.approx(1.0)
    assert lna.pair_metrics(s, ref, "sft")["reward_acc"] is None


@pytest.mark.timeout(600)
def test_quick_ablation_writes_results(tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    p = run_study("examples/length_norm_ablation.py", ["--out", out, "--quick", "--seed", "2"],
                  tmp_path, monkeypatch, capsys)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["seed"] == 2 and res["timings_s"]["total"] > 0 and res["data"]["num_train"] == 64
    for name in ("sft", "simpo", "dpo", "dpo_norm"):
        r = res[name]
        for key in ("train_rank_acc", "eval_rank_acc", "eval_sum_rank_acc",
                    "eval_reward_acc_chosen_longer", "eval_reward_acc_chosen_shorter"):
            assert isinstance(r[key], float) and 0.0 <= r[key] <= 1.0, (name, key)
        assert -1.0 <= r["eval_margin_length_spearman"] <= 1.0
        for mode in ("greedy", "sampled"):
            assert 1.0 <= r["gen"][mode]["length"] <= res["config"]["scale"]["max_new_tokens"]
    assert res["sft"]["eval_reward_acc"] is None  # the reference has no reward
    for name in ("simpo", "dpo", "dpo_norm"):
        rows = res["grid"][name]
        assert len(rows) == 1 and rows[0]["selected"] and rows[0]["name"] == res[name]["run"]
        assert 0.0 <= res[name]["eval_reward_acc"] <= 1.0
        config = (out / "runs" / rows[0]["name"] / "config.yaml").read_text()
        assert f"name: {name}" in config
    # SimPO's reward is beta * average log-prob: its reward accuracy is its ranking accuracy
    assert res["simpo"]["eval_reward_acc"] == res["simpo"]["eval_rank_acc"]
    table = (out / "results.md").read_text()
    assert table.count("\n| DPO-norm |") == 2 and table.count("\n| SFT |") == 1
    assert table.strip() in p.stdout  # the saved tables are exactly the printed ones
