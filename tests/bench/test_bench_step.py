"""bench/bench_step.py on CPU: three rows in child processes, the JSON contract, tagged merges."""

import json
import math
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "bench", "bench_step.py")
sys.path.insert(0, os.path.join(REPO, "bench"))

import bench_step  # noqa: E402
from multirank import run_main  # noqa: E402
import report  # noqa: E402

ROWS = ("simpo", "dpo_live_ref", "dpo_precomputed")


def _bench(args, timeout=300):
    # The script in a pool rank; the rows it measures still run in child processes of their own.
    return run_main(SCRIPT, ["--shape", "tiny", "--steps", "1", "--warmup", "1"] + args,
                    timeout=timeout, cwd=REPO, env={"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench_step") / "x.json")
    return out, _bench(["--out", out])


def _check_row(row):
    assert row["error"] is None, row["error"]
    for key in ("step_time_s", "tokens_per_sec", "mem_peak_gb", "tflops_per_gpu"):
        assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
    assert row["mfu"] is None and row["mem_reserved_peak_gb"] is None  # no GPU peak on CPU
    assert row["loss_finite"] and len(row["losses"]) == 2 and len(row["step_times_s"]) == 1
    assert row["layout"]["tp"] == 1 and row["layout"]["dp"] == 1
    assert row["micro_batch_size"] * row["num_microbatches"] == 2


def test_three_rows_on_cpu(first_run):
    out, p = first_run
    assert p.returncode == 0, p.stderr[-3000:]
    with open(out) as f:
        res = json.load(f)
    assert res["device"] == "cpu"
    for name in ROWS:
        _check_row(res[name])
        assert res["runs"]["tiny"][name] == res[name]  # the primary run fills the top level
    config = res["runs"]["tiny"]["config"]
    assert config["layers"] == 2 and config["seq_length"] == 64 and config["precision"] == "fp32"
    assert config["logprob_chunk"] == 1024 and config["megatron_core"] == "0.16.1"
    ratio = res["simpo_over_dpo_live_step_time"]
    assert ratio == pytest.approx(res["simpo"]["step_time_s"] / res["dpo_live_ref"]["step_time_s"])
    assert res["runs"]["tiny"]["reference_weights_gb"] > 0
    # The live reference adds one forward per step to the FLOP count: 4x instead of 3x forward.
    live, simpo = res["dpo_live_ref"], res["simpo"]
    assert (live["tflops_per_gpu"] * live["step_time_s"]
            == pytest.approx(4 / 3 * simpo["tflops_per_gpu"] * simpo["step_time_s"], rel=1e-6))
    table = p.stdout
    assert "| | step_time_s | tokens_per_sec | tflops_per_gpu | mfu | mem_peak_gb" in table
    for name in ROWS:
        assert f"| {name} |" in table
    assert "SimPO / DPO(live) step time:" in table


def test_tagged_run_merges_without_removing_rows(first_run):
    out, p = first_run
    assert p.returncode == 0, p.stderr[-3000:]
    with open(out) as f:
        before = json.load(f)
    p2 = _bench(["--out", out, "--tag", "plain", "--logprob-chunk", "0", "--rows", "simpo"])
    assert p2.returncode == 0, p2.stderr[-3000:]
    with open(out) as f:
        after = json.load(f)
    assert set(after["runs"]) == {"tiny", "tiny-plain"}
    plain = after["runs"]["tiny-plain"]
    _check_row(plain["simpo"])
    assert "dpo_live_ref" not in plain and plain["simpo_over_dpo_live_step_time"] is None
    assert plain["config"]["logprob_chunk"] == 0 and plain["config"]["tag"] == "plain"
    for name in ROWS:  # a tagged run leaves the primary rows alone
        assert after[name] == before[name] and after["runs"]["tiny"][name] == before[name]
    assert after["simpo_over_dpo_live_step_time"] == before["simpo_over_dpo_live_step_time"]


def test_failed_row_is_recorded_not_raised(tmp_path):
    row = bench_step.run_row("simpo", ["--shape", "tiny"], str(tmp_path), timeout=0.2)
    assert set(row) == set(bench_step.ROW_KEYS)
    assert row["error"].startswith("timed out") and row["step_time_s"] is None
    # A fixed key set lets a later good row replace the failed one in the merged file.
    path = str(tmp_path / "r.json")
    report.merge_results(path, {"simpo": row})
    good = dict(row, error=None, step_time_s=1.5)
    assert report.merge_results(path, {"simpo": good})["simpo"] == good


def test_uniform_scores_match_the_dataset(tmp_path):
    import synthetic

    from megasimpo.data.batches import ConcatPairs
    from megasimpo.score import read_scores, write_scores

    prefix = synthetic.write_dataset(str(tmp_path / "pairs"), 3, 32, 500, seed=1)
    data = ConcatPairs([prefix])
    scores = bench_step.uniform_scores(data.lengths(), 500)
    write_scores(str(tmp_path / "s.jsonl"), scores)
    ref = read_scores(str(tmp_path / "s.jsonl"), data)  # validates indices and token counts
    assert np.allclose(ref, -data.lengths()[:, 1:] * math.log(500))


def test_derived_and_table():
    rows = {"simpo": {"step_time_s": 1.0, "mem_peak_gb": 10.0},
            "dpo_live_ref": {"step_time_s": 2.0, "mem_peak_gb": 12.5}}
    d = bench_step.derived(rows, 2, 1_000_000_000)
    assert d == {"simpo_over_dpo_live_step_time": 0.5, "dpo_live_minus_simpo_mem_gb": 2.5,
                 "reference_weights_gb": 2.0}
    assert bench_step.derived({"simpo": rows["simpo"]}, 2, 1)["simpo_over_dpo_live_step_time"] is None
    table = report.markdown_table(rows, ["step_time_s", "mfu"])
    assert table.splitlines()[2] == "| simpo | 1 | - |"
