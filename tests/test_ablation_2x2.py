"""examples/ablation_2x2.py: its flag checks, and the reduced end-to-end run (--quick: four LoRA
cells of 3 steps from a random init) that checks the pipeline and the files, not the outcome."""

import json
import os
import re
import sys

import pytest

from fixtures import load_script
from multirank import run_main, run_study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "ablation_2x2.py")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))


def _script(*args, cwd, timeout=60):
    return run_main(SCRIPT, args, cwd=str(cwd), timeout=timeout)


@pytest.mark.parametrize("flags,message", [
    (["--load", "x"], r"--load, --data and --eval-data go together \(missing --data, --eval-data\)"),
    (["--load", "nowhere", "--data", "d", "--eval-data", "e"],
     r"--load nowhere: not a megasimpo checkpoint"),
    (["--ranks", "8", "8"], r"--ranks 8 8: give distinct LoRA ranks >= 1"),
    (["--steps", "0"], r"--steps 0 must be >= 1"),
    (["--lr", "-1"], r"--lr -1.0 must be positive"),
])
def test_bad_flags_are_named(tmp_path, flags, message):
    p = _script("--out", tmp_path / "abl", *flags, cwd=tmp_path)
    assert p.returncode == 2
    assert re.search(message, p.stderr), p.stderr
    assert not (tmp_path / "abl").exists()


@pytest.mark.parametrize("flags,message", [
    (["--", "--lora-rank", "4"], r"--lora-rank after --: the script sets it per cell"),
    (["--", "--loss=ipo"], r"--loss=ipo after --: the script sets it per cell"),
    (["--", "--micro-batch-size", "2"], r"--micro-batch-size after --: use --micro-batch-size before --"),
    (["--nproc-per-node", "0"], r"--nproc-per-node 0 must be >= 1"),
])
def test_train_flags_after_the_separator_cannot_redefine_a_cell(tmp_path, flags, message):
    p = _script("--out", tmp_path / "abl", *flags, cwd=tmp_path)
    assert p.returncode == 2 and re.search(message, p.stderr), p.stderr


def test_cells_on_several_ranks_take_the_shared_train_flags(tmp_path, monkeypatch):
    """--nproc-per-node N launches each cell under torch.distributed.run; flags after -- end
    every cell's command; relative inputs become absolute (the cells run from the repository)."""
    abl = load_script("examples/ablation_2x2.py")
    calls = []
    monkeypatch.setattr(abl.ra, "run_jobs",
                        lambda jobs, log_dir, workers: calls.append((jobs, workers)))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "megasimpo.json").write_text("{}")
    for prefix in ("train", "eval"):
        for ext in (".bin", ".idx"):
            (tmp_path / (prefix + ext)).write_text("")
    monkeypatch.chdir(tmp_path)
    # No cell ran, so the comparison finds no metrics: exit 1 after the jobs were built.
    assert abl.main(["--load", "ckpt", "--data", "train", "--eval-data", "eval", "--out", "abl",
                     "--nproc-per-node", "8", "--", "--tp", "8", "--seq-length", "2048"]) == 1
    (jobs, workers), = calls
    assert workers == 1 and sorted(jobs) == ["dpo_r16", "dpo_r8", "simpo_r16", "simpo_r8"]
    argv = jobs["dpo_r8"]
    assert argv[:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node=8", "-m", "megasimpo"]
    assert argv[-4:] == ["--tp", "8", "--seq-length", "2048"]
    flags = dict(zip(argv[8::2], argv[9::2]))
    assert flags["--load"] == str(tmp_path / "ckpt") and flags["--ref"] == "live"
    assert (flags["--loss"], flags["--lora-rank"], flags["--lora-alpha"]) == ("dpo", "8", "16")
    assert "--ref" not in jobs["simpo_r16"]


@pytest.mark.timeout(600)
def test_quick_ablation_runs_four_cells_and_decides(tmp_path, monkeypatch, capsys):
    out = tmp_path / "abl"
    p = run_study("examples/ablation_2x2.py", ["--out", out, "--quick"], tmp_path, monkeypatch,
                  capsys)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["ablation.json", "ablation.md", "ablation.png", "base",
                                       "data", "logs", "runs"]
    result = json.loads((out / "ablation.json").read_text())
    cells = {c["name"]: c for c in result["cells"]}
    assert sorted(cells) == ["dpo_r16", "dpo_r8", "simpo_r16", "simpo_r8"]
    for name, c in cells.items():
        loss, rank = name.split("_r")
        assert (c["loss"], c["rank"], c["alpha"], c["train_steps"]) == (loss, int(rank), 2 * int(rank), 3)
        assert c["eval_pairs"] == 32 and 0 <= c["pairs_won"] <= 32
        assert c["curve"][0][0] == 0 and c["curve"][-1] == [3, c["pairs_won"]]
    # Every cell starts from the same model, so the step-0 evaluation wins the same pairs.
    assert len({c["start_pairs_won"] for c in cells.values()}) == 1
    assert result["decision"]["decision"] in ("switch_to_simpo", "stay_with_dpo", "tie")
    md = (out / "ablation.md").read_text()
    assert p.stdout.endswith(md) and md.startswith("# Ablation: SimPO vs DPO x LoRA rank\n\nCommand:")
    assert f"ablation_2x2.py --out {out} --quick\n" in md and "**Decision: " in md
    assert (out / "ablation.png").stat().st_size > 10_000

    # The same cells through tools/review_run.py give the same comparison.
    runs = [str(out / "runs" / n) for n in ("simpo_r16", "simpo_r8", "dpo_r16", "dpo_r8")]
    p = run_main("tools/review_run.py", runs, timeout=120)
    assert p.returncode == 0, p.stderr
    again = json.loads((out / "runs" / "comparison" / "comparison.json").read_text())
    assert again["cells"] == result["cells"] and again["decision"] == result["decision"]

    # A second ablation into the same directory needs --force.
    p = _script("--out", out, "--quick", cwd=tmp_path)
    assert p.returncode == 2 and "runs exists (an earlier ablation); pass --force" in p.stderr
