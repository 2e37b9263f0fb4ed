"""The run directory's rules without a process group: paths, lock, resume comparison, metrics,
status, directory replacement, YAML types (megasimpo/run_dir.py, megasimpo/atomic.py, cli)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from megasimpo import atomic, run_dir
from megasimpo.cli import train_config
from megasimpo.config import TrainConfig


def _cfg(tmp_path, **kw):
    return TrainConfig(load=str(tmp_path / "ckpt"), data=(str(tmp_path / "d"),),
                       out=str(tmp_path / "run"), **kw)


@pytest.mark.parametrize("out,load,bad", [("run", "run", True), ("run", "run/final_model", True),
                                          ("run", "run2/final_model", False),
                                          ("run/sub", "run", False)])
def test_out_must_not_be_or_contain_load(tmp_path, out, load, bad):
    out, load = str(tmp_path / out), str(tmp_path / load)
    if bad:
        with pytest.raises(ValueError, match="must neither be nor contain --load"):
            atomic.check_out_not_over_input(out, load)
    else:
        atomic.check_out_not_over_input(out, load)


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    import psutil

    lock = run_dir.RunLock(str(tmp_path))
    lock.acquire()
    lock.release()
    assert not os.path.exists(lock.path)
    # A real second process: the lock is about which process holds it.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {"host": socket.gethostname(), "pid": other.pid, "since": "then",
                  "process_start": psutil.Process(other.pid).create_time()}
        with open(lock.path, "w") as f:
            json.dump(holder, f)
        with pytest.raises(ValueError, match=f"in use by another run \\(pid {other.pid}"):
            run_dir.RunLock(str(tmp_path)).acquire()
        with open(lock.path, "w") as f:  # another host cannot be checked: refused, with the fix
            json.dump(dict(holder, host="elsewhere"), f)
        with pytest.raises(ValueError, match="delete .*megasimpo.lock"):
            run_dir.RunLock(str(tmp_path)).acquire()
    finally:
        other.kill()
        other.wait()
    with open(lock.path, "w") as f:  # its process is gone: stale, taken over
        json.dump(dict(holder, host=socket.gethostname()), f)
    taker = run_dir.RunLock(str(tmp_path))
    taker.acquire()
    assert json.load(open(lock.path))["pid"] == os.getpid()
    taker.release()


def test_resume_comparison_safe_and_unsafe_fields(tmp_path):
    old = run_dir.run_record(_cfg(tmp_path, steps=10, lr=1e-6))
    assert run_dir.resume_decision("CK", old, old, False) == []
    notes = run_dir.resume_decision("CK", old, run_dir.run_record(
        _cfg(tmp_path, steps=20, lr=1e-6, tp=2, log_interval=5)), False)
    assert "steps: 10 -> 20" in notes[0] and "tp: None -> 2" in notes[0]
    assert "LR schedule" in notes[1]
    new = run_dir.run_record(_cfg(tmp_path, steps=10, lr=2e-6, seed=7))
    with pytest.raises(ValueError, match=r"lr: 1e-06 -> 2e-06; seed: 1234 -> 7.*--resume-anyway"):
        run_dir.resume_decision("CK", old, new, False)
    assert "--resume-anyway" in run_dir.resume_decision("CK", old, new, True)[0]
    # The loss is part of the run; another working directory spelling the same files is not.
    dpo = run_dir.run_record(dataclass_replace(_cfg(tmp_path, steps=10, lr=1e-6), "dpo"))
    with pytest.raises(ValueError, match="loss.name: 'simpo' -> 'dpo'"):
        run_dir.resume_decision("CK", old, dpo, False)
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        relative = run_dir.run_record(TrainConfig(load="ckpt", data=("d",), out="run",
                                                  steps=10, lr=1e-6))
    finally:
        os.chdir(cwd)
    assert run_dir.resume_decision("CK", old, relative, False) == []
    # A record from a version without a field counts as that field's default.
    older = {k: v for k, v in old.items() if k != "pack"}
    assert run_dir.resume_decision("CK", older, old, False) == []


def dataclass_replace(cfg, loss):
    import dataclasses

    from megasimpo.config import LossConfig

    return dataclasses.replace(cfg, loss=LossConfig(name=loss))


def test_metrics_truncation_drops_a_torn_row_and_names_a_corrupt_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0} for s in (0, 1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    run_dir.truncate_metrics(str(tmp_path), 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2]
    run_dir.truncate_metrics(str(tmp_path), 0)  # a start from step 0 redoes everything
    assert path.read_text() == ""
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON metrics row") as e:
        run_dir.truncate_metrics(str(tmp_path), 1)
    assert "column 1)" in str(e.value) and "line 1" not in str(e.value)  # the file's line, not json's


def test_finished_run_is_not_trained_again_without_force(tmp_path):
    run_dir.check_not_finished(str(tmp_path), False)
    run_dir.write_status(str(tmp_path), "finished", step=5, steps=5)
    with pytest.raises(ValueError, match="finished run at step 5.*--force"):
        run_dir.check_not_finished(str(tmp_path), False)
    run_dir.check_not_finished(str(tmp_path), True)
    assert run_dir.read_status(str(tmp_path))["state"] == "finished"


def test_replace_dir_keeps_the_old_version_until_the_new_one_is_in_place(tmp_path):
    target, partial = tmp_path / "final_model", tmp_path / "final_model.partial"
    target.mkdir()
    (target / "w").write_text("old")
    partial.mkdir()
    (partial / "w").write_text("new")
    # A crash after moving the old version aside: recover() puts it back.
    os.replace(target, str(target) + ".old")
    atomic.recover(str(target))
    assert (target / "w").read_text() == "old"
    atomic.replace_dir(str(partial), str(target))
    assert (target / "w").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["final_model"]


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic.write_text(str(tmp_path / "f"), "x")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "f").st_mode & 0o777 == 0o640


def test_a_figure_is_written_whole_or_not_at_all(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    FigureCanvasAgg(fig)
    fig.subplots().plot([0, 1], [1, 0])
    path = str(tmp_path / "plot.png")
    atomic.save_figure(fig, path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"  # the PNG signature, not text
    with open(path, "rb") as f:
        whole = f.read()

    class FailsMidway:  # writes part of its bytes (to a file or an open file), then fails
        def savefig(self, target, **kw):
            f = open(target, "wb") if isinstance(target, str) else target
            f.write(b"\x89PNG partial")
            f.flush()
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic.save_figure(FailsMidway(), path)
    with open(path, "rb") as f:  # the old figure is intact and no temporary is left
        assert f.read() == whole
    assert os.listdir(tmp_path) == ["plot.png"]


def test_yaml_values_are_typed(tmp_path):
    config = tmp_path / "c.yaml"
    base = {"load": "ckpt", "data": ["d"], "out": "run"}
    config.write_text("lr: 1e-3\nbeta: 2\nsteps: 4\n")  # PyYAML: 1e-3 is the string '1e-3'
    cfg = train_config({"config": str(config), **base})
    assert cfg.lr == 1e-3 and cfg.loss.beta == 2.0 and cfg.steps == 4
    for text, msg in (("steps: 1e3\n", "steps: expected an integer, got '1e3'"),
                      ("lr: fast\n", "lr: expected a number, got 'fast'"),
                      ("pack: 'yes'\n", "pack: expected true or false"),
                      ("seed: 1.5\n", "seed: expected an integer")):
        config.write_text(text)
        with pytest.raises(ValueError, match=f"{config}: {msg}"):
            train_config({"config": str(config), **base})


def test_options_a_loss_ignores_are_refused():
    with pytest.raises(ValueError, match=r"--ref precomputed has no effect for --loss simpo"):
        TrainConfig(load="m", data=("d",), out="o", ref="precomputed")
    from megasimpo.config import LossConfig

    with pytest.raises(ValueError, match=r"--ref-logps has no effect for --loss orpo"):
        TrainConfig(load="m", data=("d",), out="o", loss=LossConfig(name="orpo"),
                    ref_logps=("s.jsonl",))
    TrainConfig(load="m", data=("d",), out="o", loss=LossConfig(name="dpo"), ref="precomputed",
                ref_logps=("s.jsonl",))
    with pytest.raises(ValueError, match=r"--eval-data e.idx: give the dataset prefix without "
                                         r"\.idx \(--eval-data e\)"):
        TrainConfig(load="m", data=("d",), out="o", eval_data=("e.idx",))


def test_a_batch_that_drops_many_pairs_says_so():
    from megasimpo.data.loader import BatchLayout, PairSampler

    def note(pairs, mbs, nmb, dp):
        return PairSampler(pairs, BatchLayout(micro_batch_size=mbs, num_microbatches=nmb,
                                              dp_rank=0, dp_size=dp), 0).dropped_note()

    # The case: 216 pairs at the default global batch 128 is 1 step and 88 dropped.
    assert note(216, 1, 128, 1) == (
        "--global-batch-size 128 drops 88 of the 216 training pairs (41%) in every epoch (1 "
        "step(s) per epoch); --global-batch-size 108 drops 0 (or add pairs)")
    assert "--global-batch-size 16 drops 8" in note(216, 4, 8, 4)  # a multiple of mbs x dp
    assert note(64, 2, 4, 1) == "" and note(1090, 1, 128, 1) == ""  # 0 and 66 of 1090 (6%)


def _run_with_probes(rank, world, ckpt, data, out):
    """``megasimpo train`` in this rank, reading status.json before every step (what a requeue
    script would find if the run died there) and capturing the console."""
    import contextlib
    import io
    from unittest import mock

    from megasimpo import cli
    from megasimpo.trainer import Trainer

    seen, real = [], Trainer.train_step

    def probe(self, step):
        seen.append(run_dir.read_status(out))
        return real(self, step)

    console = io.StringIO()
    with mock.patch.object(Trainer, "train_step", probe), contextlib.redirect_stdout(console):
        cli.main(["train", "--load", ckpt, "--data", data, "--out", out, "--steps", "3",
                  "--global-batch-size", "24", "--micro-batch-size", "4", "--save-interval", "1",
                  "--precision", "fp32"])
    return seen, console.getvalue()


def test_a_run_reports_each_commit_its_progress_and_its_final_model(shared_inputs, tmp_path):
    """status.json names every committed checkpoint while the run goes on (kill -9 after a
    commit leaves it saying so); off a terminal the console gets plain lines and a last line
    naming final_model; the batch that drops a quarter of the pairs says so; TensorBoard tags
    are TRL's."""
    from multirank import run_ranks

    ckpt, data, _ = shared_inputs()
    out = str(tmp_path / "run")
    seen, console = run_ranks(_run_with_probes, 1, ckpt, data, out)[0]
    assert [(s["step"], s["state"]) for s in seen] == [(0, "running"), (1, "running"),
                                                       (2, "running")]
    assert seen[0]["checkpoint"] is None
    assert seen[1]["checkpoint"] == os.path.join(out, "checkpoints", "step_0000001")
    assert seen[2]["checkpoint"] == os.path.join(out, "checkpoints", "step_0000002")
    # 64 pairs in global batches of 24: 2 steps per epoch, 16 pairs (25%) dropped each epoch
    assert ("--global-batch-size 24 drops 16 of the 64 training pairs (25%) in every epoch"
            in console), console
    assert "--global-batch-size 20 drops 4" in console
    lines = [line for line in console.splitlines() if "megasimpo train: step " in line]
    assert [line.split()[3] for line in lines] == ["1/3", "2/3", "3/3"], console
    for part in ("loss ", "acc ", "tokens/s ", "MFU -", "ETA 0:"):
        assert part in lines[-1], lines[-1]
    final = os.path.join(out, "final_model")
    assert console.splitlines()[-1].startswith(f"megasimpo train: finished 3 steps; final model: "
                                               f"{final} ")
    assert "\r" not in console
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/rewards/chosen", "train/rewards/accuracies"} <= tags, tags
    assert not any(t == "loss" or t.startswith("rewards/") for t in tags)
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert "loss" in rows[0] and "rewards/chosen" in rows[0]  # metrics.jsonl keeps TRL's names
