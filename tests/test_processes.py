"""Process hygiene of a torchrun job (megasimpo/parallel/processes.py, docs/checkpoints.md
"Stopping a job"): nothing a rank starts outlives a kill -9 of it, and SIGTERM to the launcher
(what SLURM sends) ends with a committed checkpoint and the documented exit codes.

Real torchrun jobs and processes on purpose (subprocess, not the rank pool of tests/multirank.py):
signals, kill -9 and what survives them are about process boundaries."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest


SESSION_TIMEOUT = 120  # seconds a whole torchrun run may take here before the test gives up


@pytest.fixture(scope="module")
def inputs(shared_inputs):
    return shared_inputs()


def _cmd(ckpt, data, out, *flags):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "megasimpo", "train", "--load", ckpt, "--data", data, "--out", str(out),
            "--steps", "100000", "--global-batch-size", "8", "--micro-batch-size", "2",
            "--seed", "3", *flags]


def _start(cmd, logs):
    """torchrun in a session of its own, output to files (a full pipe would stall the ranks)."""
    out, err = open(logs / "stdout.log", "w"), open(logs / "stderr.log", "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    out.close()
    err.close()
    return proc


def _log(logs, name="stderr.log"):
    return (logs / name).read_text()[-3000:]


def _wait_for_checkpoint(proc, out, logs, seen=None):
    """Polls until RUN_DIR/checkpoints/latest exists; ``seen`` collects every descendant."""
    deadline = time.monotonic() + SESSION_TIMEOUT
    while not (out / "checkpoints" / "latest").exists():
        assert proc.poll() is None, _log(logs)
        assert time.monotonic() < deadline, "no checkpoint in time"
        if seen is not None:
            _collect(proc, seen)
        time.sleep(0.1)


def _collect(proc, seen: dict) -> None:
    try:
        for p in psutil.Process(proc.pid).children(recursive=True):
            seen.setdefault(p.pid, p)
    except psutil.NoSuchProcess:
        pass


def _describe(p) -> str:
    try:
        return f"pid {p.pid} (parent {p.ppid()}, {p.memory_info().rss >> 20} MB): " \
               f"{' '.join(p.cmdline())[:160]}"
    except psutil.Error:
        return f"pid {p.pid}"


def _cleanup(proc, seen: dict) -> None:
    """Kills whatever of this run is left, so a failing test leaks nothing."""
    for p in seen.values():
        try:
            if p.is_running():
                p.kill()
        except psutil.Error:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=30)


@pytest.mark.parametrize("victim", ["rank0", "torchrun"])
def test_no_process_survives_kill9(inputs, tmp_path, victim):
    """rank0: Megatron's torch_dist save forks writer processes and (0.16.1) starts a
    spawn-context Manager, which starts multiprocessing's resource tracker; after a kill -9 of
    the rank those used to live on (re-parented to init, ~325 MB for the Manager, the tracker
    ignores SIGTERM). torchrun: the ranks used to train on, re-parented to init; now they get
    SIGTERM and stop with a checkpoint."""
    ckpt, data, _ = inputs
    out = tmp_path / "run"
    proc = _start(_cmd(ckpt, data, out, "--save-interval", "1"), tmp_path)
    seen = {}
    try:
        _wait_for_checkpoint(proc, out, tmp_path, seen)
        end = time.monotonic() + 3  # more saves (one a step): catch their short-lived writers
        while time.monotonic() < end:
            _collect(proc, seen)
            time.sleep(0.05)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2, [_describe(w) for w in workers]
        # Rank 0 writes the checkpoint's shards and common state (rank 1's are replicas).
        rank0 = next(w for w in workers if w.environ().get("RANK") == "0")
        _collect(proc, seen)
        (rank0 if victim == "rank0" else psutil.Process(proc.pid)).kill()
        proc.wait(timeout=SESSION_TIMEOUT)
        assert proc.returncode != 0  # a rank died (torchrun reports it), or torchrun did
        alive = [p for p in seen.values() if p.is_running()]
        _, alive = psutil.wait_procs(alive, timeout=10 if victim == "rank0" else 60)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, "outlived the job:\n" + "\n".join(_describe(p) for p in alive)
        if victim == "torchrun":  # the ranks stopped through the trainer's SIGTERM path
            assert "stopping after step" in _log(tmp_path, "stdout.log"), _log(tmp_path)
    finally:
        _cleanup(proc, seen)


def _forks_a_sleeper(install: bool) -> subprocess.Popen:
    """In a fresh process: (maybe) install the hooks, fork a sleeping multiprocessing child from
    the main thread, report its pid, then wait to be killed."""
    code = f"""
import multiprocessing, sys, time
if {install!r}:
    from megasimpo.parallel import processes
    processes.install()
child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
child.start()
print(child.pid, flush=True)
time.sleep(60)
"""
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("install", [False, True])
def test_forked_child_dies_with_its_parent(install):
    """The mechanism alone: a child forked after ``processes.install()`` gets SIGKILL when its
    parent is killed -9; without it the child is re-parented and sleeps on."""
    parent = _forks_a_sleeper(install)
    child = None
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        parent.kill()
        parent.wait(timeout=10)
        gone, _ = psutil.wait_procs([child], timeout=5)
        assert bool(gone) == install
    finally:
        if child is not None and child.is_running():
            child.kill()


def test_sigterm_to_torchrun_checkpoints_and_exits_as_documented(inputs, tmp_path):
    """SIGTERM to the launcher only (as SLURM signals it): torchrun forwards it to every worker's
    process group, the workers finish the step, save and exit 0 through the trainer's own path,
    and torchrun itself exits 1 (torch re-raises its SignalException), as the docs say."""
    ckpt, data, _ = inputs
    out = tmp_path / "run"
    # --save-interval: the run has saved before the signal, so any helper a save leaves behind
    # (0.16.1's Manager used to be one, in the rank's process group) is there to be hit by it.
    proc = _start(_cmd(ckpt, data, out, "--save-interval", "2"), tmp_path)
    seen = {}
    try:
        _wait_for_checkpoint(proc, out, tmp_path, seen)
        _collect(proc, seen)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=SESSION_TIMEOUT)
        stdout, stderr = _log(tmp_path, "stdout.log"), _log(tmp_path)
        assert "stopping after step" in stdout, stderr
        assert proc.returncode == 1, stderr  # torch.distributed.elastic's SignalException
        assert "SignalException" in stderr
        stopped = int(stdout.split("stopping after step ")[1].split()[0])
        latest = (out / "checkpoints" / "latest").read_text().strip()
        assert latest == f"step_{stopped:07d}", (latest, stopped)
        assert (out / "checkpoints" / latest / "megasimpo.json").exists()
        assert not any(n.endswith(".partial") for n in os.listdir(out / "checkpoints"))
    finally:
        _cleanup(proc, seen)
    # Complete and resumable: the same command resumes there (and stops one step later).
    again = subprocess.run(_cmd(ckpt, data, out, "--save-interval", "2", "--exit-interval",
                                str(stopped + 1)), capture_output=True, text=True,
                           timeout=SESSION_TIMEOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"after step {stopped}" in again.stdout
    assert f"stopping after step {stopped + 1}" in again.stdout
