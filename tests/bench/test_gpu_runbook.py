"""bench/gpu/run_all.sh on CPU: the dry run (rows in priority order, what a device call carries,
each row's flags against its script's --help) and the budget skipping rows, with the rows'
commands faked (RUN_ALL_FAKE=1) so that nothing heavy runs; and bench/gpu/smoke.py without CUDA.
No test downloads anything (bench/gpu/fetch.sh is never run here). run_all.sh is bash: a subprocess;
smoke.py runs in a pool rank (tests/multirank.py)."""

import json
import os
import re
import shutil
import subprocess
import sys

from multirank import run_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_ALL = os.path.join(REPO, "bench", "gpu", "run_all.sh")
ROWS = ["smoke", "gputests", "step8b", "trl", "logprobs", "moe", "fp8", "step1b"]
CARRY = re.compile(r"carry: working tree ([\d.]+) MiB \+ \S+ ([\d.]+) MiB = ([\d.]+) MiB")
MIB = 1 << 20


def _run(args, tmp_path, script=RUN_ALL, **env):
    base = {k: v for k, v in os.environ.items()  # nothing from a device session leaks in
            if k not in ("ROWS", "RUN_ALL_FAKE", "RUN_ALL_T0", "RUN_ALL_WHEELS_DIR",
                         "MEGASIMPO_TE_OK")}
    env = dict(base, PYTHON=sys.executable, OUT=str(tmp_path / "out"), **env)
    return subprocess.run(["bash", script] + args, capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def _wheels(tmp_path, size):
    """A stand-in for .whl/: one file of ``size`` bytes (sparse: du -b counts its full size)."""
    d = tmp_path / "whl"
    d.mkdir()
    with open(d / "fake-0.0-py3-none-any.whl", "wb") as f:
        f.truncate(size)
    return str(d)


def _row_lines(stdout):
    return [line for line in stdout.splitlines() if re.match(r"(=== )?\d+\. ", line)]


def _carry(stdout):
    m = CARRY.search(stdout)
    assert m, stdout
    return tuple(float(x) for x in m.groups())


def test_dry_run_lists_rows_in_priority_order_and_a_carry_under_64_mib(tmp_path):
    r = _run(["--dry-run"], tmp_path, RUN_ALL_WHEELS_DIR=_wheels(tmp_path, 3 * MIB))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = _row_lines(r.stdout)
    assert [line.split()[1] for line in lines] == ROWS
    assert [int(line.split()[0].rstrip(".")) for line in lines] == list(range(1, len(ROWS) + 1))
    assert "would run" in lines[0] and "~ 45 s" in lines[0]  # each row shows its estimate
    tree, whl, total = _carry(r.stdout)
    assert 0 < tree < 64 and abs(whl - 3.0) < 0.05 and abs(total - (tree + whl)) < 0.15
    assert total < 64
    assert "WARNING" not in r.stdout
    assert "every row's script exists and its --help lists the row's flags" in r.stdout
    assert r.stdout.rstrip().endswith("dry run: OK")
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_dry_run_without_wheels_warns_and_counts_the_tree_only(tmp_path):
    r = _run(["--dry-run"], tmp_path, ROWS="smoke",
             RUN_ALL_WHEELS_DIR=str(tmp_path / "absent"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "run bench/gpu/fetch.sh first" in r.stdout
    tree, whl, total = _carry(r.stdout)
    assert whl == 0 and total == tree and 0 < tree < 64


def test_dry_run_fails_when_the_carry_is_over_64_mib(tmp_path):
    r = _run(["--dry-run"], tmp_path, ROWS="smoke", RUN_ALL_WHEELS_DIR=_wheels(tmp_path, 65 * MIB))
    assert r.returncode != 0
    assert "ERROR: the carry is over 64 MiB" in r.stdout and "dry run: FAILED" in r.stdout


def test_dry_run_fails_on_a_flag_the_script_does_not_take(tmp_path):
    # a copy of the layout with one row's flag misspelt: run_all.sh works from its own repo root
    gpu = tmp_path / "repo" / "bench" / "gpu"
    gpu.mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "bench", "gpu", "smoke.py"), gpu)
    with open(RUN_ALL) as f:
        text = f.read()
    assert "  bench/gpu/smoke.py\n" in text
    (gpu / "run_all.sh").write_text(text.replace("  bench/gpu/smoke.py\n",
                                                 "  bench/gpu/smoke.py --iterz 2\n"))
    r = _run(["--dry-run"], tmp_path, script=str(gpu / "run_all.sh"), ROWS="smoke",
             RUN_ALL_WHEELS_DIR=str(tmp_path / "absent"))
    assert r.returncode != 0
    assert "ERROR: smoke: bench/gpu/smoke.py --help has no --iterz" in r.stdout


def _fake(tmp_path, budget, **env):
    r = _run(["--budget", str(budget)], tmp_path, RUN_ALL_FAKE="1", **env)
    out = tmp_path / "out"
    with open(out / "rows.tsv") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    ran = sorted(p.name[:-4] for p in (out / "logs").iterdir())
    return r, {row[0]: row[1] for row in rows}, ran


def test_a_tiny_budget_skips_every_row_and_runs_none(tmp_path):
    r, status, ran = _fake(tmp_path, 1)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ran == [] and "FAKE-RUN" not in r.stdout
    assert status == {name: "skip-budget" for name in ROWS}
    assert all("SKIP: 1 s left" in line for line in _row_lines(r.stdout))


def test_the_budget_keeps_the_rows_that_fit_and_fp8_needs_te(tmp_path):
    # 200 s: smoke (45) and gputests (90) fit, step8b (180) and trl (120) not in the 65 s left,
    # logprobs (30) does, moe (150) and step1b (120) not; fp8 is skipped for want of TE whatever
    # the budget
    r, status, ran = _fake(tmp_path, 200, MEGASIMPO_TE_OK="0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert ran == sorted(["smoke", "gputests", "logprobs"])
    assert status == {"smoke": "ran", "gputests": "ran", "step8b": "skip-budget",
                      "trl": "skip-budget", "logprobs": "ran", "moe": "skip-budget",
                      "fp8": "skip-no-te", "step1b": "skip-budget"}
    assert "skipped: step8b trl moe fp8 step1b" in r.stdout
    assert os.path.exists(tmp_path / "out" / "run_all.log")


def test_rows_picks_a_subset_and_unknown_rows_are_refused(tmp_path):
    r, status, ran = _fake(tmp_path, 500, ROWS="logprobs smoke")
    assert r.returncode == 0, r.stdout + r.stderr
    assert list(status) == ["smoke", "logprobs"]  # priority order, not the order given
    r = _run(["--dry-run"], tmp_path, ROWS="smoke nonsense")
    assert r.returncode == 2 and "unknown row 'nonsense'" in r.stderr


def test_smoke_without_cuda_writes_its_report(tmp_path):
    out = tmp_path / "smoke.json"
    r = run_main("bench/gpu/smoke.py", ["--out", str(out)], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    assert report["env"]["torch"] and report["env"]["python"]
    if report["env"]["gpu"] is None:
        assert report["skipped"].startswith("no CUDA device")
