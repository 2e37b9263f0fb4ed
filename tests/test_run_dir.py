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
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON metrics row"):
        run_dir.truncate_metrics(str(tmp_path), 1)


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
