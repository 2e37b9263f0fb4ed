"""examples/ranking_accuracy.py: the task and judge (pure functions) and a reduced end-to-end run
(--quick) that checks the files and their shapes, not the outcome of the study."""

import json
import os
import sys

import numpy as np
import pytest
from fixtures import load_script
from multirank import run_study


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "ranking_accuracy.py")


def _study():
    return load_script("examples/ranking_accuracy.py")


def test_injected_pairs_follow_the_rules():
    ra = _study()

    def make(seed):
        rng = np.random.default_rng(seed)
        return ra.injected_pairs(ra.task_prompts(600, rng, set()), rng)

    pairs = make(0)
    assert pairs == make(0)  # deterministic from the seed
    diffs = []
    for prompt, chosen, rejected in pairs:
        assert prompt[0] == ra.BOS and prompt[-1] == ra.SEP
        op, digits = ra.parse_prompt(prompt)
        assert 0 <= op < len(ra.OPS) and 3 <= len(digits) <= 6
        assert chosen[-1] == rejected[-1] == ra.EOS
        assert ra.is_correct(prompt, chosen) and not ra.is_correct(prompt, rejected)
        assert ra.judge(prompt, chosen) == 0 and ra.judge(prompt, rejected) == -1  # one error
        for resp in (chosen, rejected):
            words = resp[len(ra.answer_of(resp)):-1]
            assert len(words) <= ra.MAX_COMMENTARY
            assert all(ra.WORDS[0] <= t < ra.WORDS[1] for t in words)
        diffs.append(len(chosen) - len(rejected))
    diffs = np.array(diffs)
    assert (diffs > 0).any() and (diffs < 0).any()  # lengths differ in both directions
    assert 0.55 < np.mean(diffs > 0) < 0.8  # the verbosity bias: chosen longer more often


def test_held_out_prompts_are_excluded_and_unique():
    ra = _study()
    rng, held_out = np.random.default_rng(1), set()
    dev = ra.task_prompts(300, rng, held_out, unique=True)
    assert len({tuple(p) for p in dev}) == 300 and len(held_out) == 300
    train = ra.task_prompts(3000, rng, held_out)
    assert not {tuple(p) for p in train} & held_out


def test_answer_rules_and_judge():
    ra = _study()
    assert ra.answer(ra.OPS.index("copy"), [1, 2, 9]) == [1, 2, 9]
    assert ra.answer(ra.OPS.index("shift"), [1, 2, 9]) == [2, 3, 0]
    assert ra.answer(ra.OPS.index("reverse"), [1, 2, 9]) == [9, 2, 1]
    assert ra.answer_of([ra.DIGIT0 + 3, ra.DIGIT0, 40, ra.DIGIT0 + 1, ra.EOS]) == [3, 0]
    assert ra.edit_distance([1, 2, 3], [1, 3]) == 1 and ra.edit_distance([], [4, 5]) == 2
    assert ra.edit_distance([1, 2, 3], [3, 2, 1]) == 2
    prompt = [ra.BOS, ra.OP0, ra.DIGIT0 + 1, ra.DIGIT0 + 2, ra.DIGIT0 + 3, ra.SEP]  # copy 1 2 3
    right = [ra.DIGIT0 + 1, ra.DIGIT0 + 2, ra.DIGIT0 + 3, 50, ra.EOS]
    near = [ra.DIGIT0 + 1, ra.DIGIT0 + 2, ra.EOS]
    far = [60, 61, ra.EOS]
    unfinished = [ra.DIGIT0 + 9] * 5
    pairs = ra.judged_pairs([prompt] * 3, [[near, right, far], [near, near], [unfinished, far]])
    assert pairs == [(prompt, right, far)]  # best vs worst; ties and unfinished samples skipped


def test_run_jobs_runs_children_with_logs_and_names_a_failure(tmp_path):
    # The studies' tests run their jobs in the rank pool (multirank.run_jobs); the real runner's
    # child processes are checked here.
    ra = _study()
    show = "import os, sys; print(os.environ['OMP_NUM_THREADS'], os.getcwd(), sys.argv[1:])"
    ra.run_jobs({"a": [sys.executable, "-c", show, "x"]}, str(tmp_path / "logs"), 2)
    assert (tmp_path / "logs" / "a.log").read_text() == f"1 {REPO} ['x']\n"
    fail = "import sys; print('about to fail'); sys.exit(3)"
    with pytest.raises(RuntimeError, match=r"(?s)b failed \(exit 3\): .*about to fail"):
        ra.run_jobs({"a": [sys.executable, "-c", "pass"], "b": [sys.executable, "-c", fail]},
                    str(tmp_path / "logs"), 2)
    assert (tmp_path / "logs" / "b.log").read_text() == "about to fail\n"


@pytest.mark.timeout(900)
def test_quick_study_writes_results(tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    p = run_study("examples/ranking_accuracy.py", ["--out", out, "--quick", "--seed", "3"],
                  tmp_path, monkeypatch, capsys)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["seed"] == 3 and res["timings_s"]["total"] > 0
    for variant in (res, res["on_policy"]):  # injected pairs at the top level, as issue #5 asks
        assert variant["data"]["num_train"] >= 32 and variant["data"]["num_test"] >= 1
        for name in ("sft", "simpo", "dpo"):
            r = variant[name]
            for key in ("train_rank_acc", "eval_rank_acc", "train_sum_rank_acc",
                        "eval_sum_rank_acc", "eval_avg_logp_chosen", "eval_avg_logp_rejected"):
                assert isinstance(r[key], float) and np.isfinite(r[key]), (name, key)
            assert 0.0 <= r["train_rank_acc"] <= 1.0 and 0.0 <= r["eval_rank_acc"] <= 1.0
            for mode in ("greedy", "sampled"):
                gen = r["gen"][mode]
                assert 0.0 <= gen["answer_acc"] <= 1.0
                assert 1.0 <= gen["length"] <= res["config"]["scale"]["max_new_tokens"]
        assert variant["sft"]["train_reward_acc"] is None  # the reference has no reward
        for name in ("simpo", "dpo"):
            r = variant[name]
            assert 0.0 <= r["train_reward_acc"] <= 1.0 and 0.0 <= r["eval_reward_acc"] <= 1.0
            assert r["beta"] > 0 and r["lr"] > 0
            rows = variant["grid"][name]
            assert len(rows) == 1 and rows[0]["selected"] and rows[0]["name"] == r["run"]
            scores = (out / "scores" / f"{r['run']}.jsonl").read_text().splitlines()
            data = variant["data"]
            assert len(scores) == data["num_train"] + data["num_dev"] + data["num_test"]
        # SimPO's reward is beta * average log-prob: its reward accuracy is its ranking accuracy
        assert variant["simpo"]["train_reward_acc"] == variant["simpo"]["train_rank_acc"]
    assert res["data"]["num_train"] == 64
    png = out / "ranking_accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert table.count("\n| SFT |") == 2 and table.count("\n| SimPO |") == 2
    assert "### injected pairs" in table and "### on_policy pairs" in table
    assert table.strip() in p.stdout  # the saved tables are exactly the printed ones
