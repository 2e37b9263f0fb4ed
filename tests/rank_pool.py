"""Long-lived gloo ranks, reused from test to test (one pool per world size).

Starting a rank costs seconds (a fresh interpreter imports torch, Megatron-Core and megasimpo);
the work of most multi-rank tests costs less. So each world size gets one pool of rank
processes, spawned on first use and kept for the session, and every test's function runs in it
as a *task*:

- The parent sends each rank ``(fn, args)`` (pickled by reference: ``fn`` is a module-level
  function of a test module, found through the ``sys.path`` the parent sends along), a fresh
  MASTER_PORT and the task's mode: ``"ranks"`` starts a gloo default group first and calls
  ``fn(rank, world_size, *args)``; ``"main"`` calls ``fn(*args)`` with the environment a launcher
  would give (torchrun's variables on several ranks, none on one) and turns ``SystemExit`` and an
  uncaught exception into an exit code, as the interpreter would.
- Each rank runs the task with its stdout and stderr going to files of its own, then puts itself
  back to its starting state (``rank_state.teardown``) and answers with the result, its output
  and whatever the task left behind.
- A failure never outlives its test. When a rank raises, dies or does not answer in time (its
  peers may be waiting for it in a collective), the other ranks get ``GRACE`` seconds to answer,
  every unanswered rank's Python stack is dumped (``faulthandler`` on SIGUSR2), the whole pool is
  killed, and the test fails with each rank's traceback or stack and the tail of its output. The
  next test gets a fresh pool. A parent interrupted while waiting (pytest-timeout, Ctrl-C) kills
  the pool as well.

DeepSpeed's ``DistributedTest`` (``reuse_dist_env``) and Megatron-LM's single ``torchrun`` of
pytest were the models; unlike them, a hang here fails one test, not the session.
"""

import atexit
import faulthandler
import gc
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import wait

import torch.multiprocessing as mp

GRACE = 5.0  # seconds the other ranks get to answer once one has failed
OUTPUT_TAIL = 4000  # characters of a failed rank's output shown with its error
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankFailure(AssertionError):
    """A task failed in at least one rank: the message has every rank's story."""


def _serve(rank: int, world_size: int, conn, workdir: str) -> None:
    """The rank process: start once, then run tasks until told to stop."""
    _exit_with_parent()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1")
    # The imports every task would pay for, paid once; their notices are kept in the workdir
    # (shown if the rank dies while starting).
    with _Captured([os.path.join(workdir, f"start-{name}{rank}.txt") for name in ("out", "err")]):
        import torch
        import torch.distributed  # noqa: F401

        import megatron.core  # noqa: F401
        import megatron.core.optimizer  # noqa: F401
        from megasimpo.parallel import cpu

        import rank_state

        torch.set_num_threads(1)
        cpu.enable()
        # A one-time patch megasimpo applies on its first optimizer load: applied now, so it is
        # part of the starting picture and not taken for a test's monkeypatch.
        from types import SimpleNamespace

        from megasimpo.parallel import compat, processes

        compat.prepare_optimizer_for_load(SimpleNamespace(chained_optimizers=[]))
        processes.install()
    stacks = open(os.path.join(workdir, f"stack{rank}.txt"), "w")
    faulthandler.register(signal.SIGUSR2, file=stacks, all_threads=True)
    base, attributes = rank_state.Baseline(), rank_state.Attributes()
    gc.collect()
    gc.freeze()  # the imports: never garbage, never looked through again (rank_state.teardown)
    conn.send("ready")
    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(_run_task(rank, world_size, task, workdir, base, attributes))


def _exit_with_parent() -> None:
    """Never outlive the pytest process (even after its kill -9). Not prctl's parent-death
    signal: that fires when the parent *thread* ends, and pools are also started from threads."""
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _run_task(rank, world_size, task, workdir, base, attributes):
    sys_path, port, payload, mode = task
    sys.path[:] = sys_path + [p for p in sys.path if p not in sys_path]
    os.environ["MASTER_PORT"] = str(port)
    if mode == "main" and world_size == 1:  # `python -m ...`: no launcher variables at all
        for name in _LAUNCHER_VARS:
            os.environ.pop(name, None)
    paths = [os.path.join(workdir, f"{name}{rank}.txt") for name in ("out", "err")]
    status, value = "error", None
    with _Captured(paths):
        try:
            fn, args = pickle.loads(payload)
            if mode == "ranks":
                import torch.distributed as dist

                dist.init_process_group("gloo", rank=rank, world_size=world_size)
                value = pickle.dumps(fn(rank, world_size, *args))
            else:
                value = pickle.dumps(_main_exit_code(fn, args))
            status = "ok"
        except BaseException:
            value = traceback.format_exc()
    try:  # outside the capture: the task's output is the task's alone
        import rank_state

        left, patched = rank_state.teardown(base, attributes)
    except BaseException:
        status, value = "error", f"teardown failed:\n{traceback.format_exc()}"
        left, patched = [], ["(unknown: teardown failed)"]
    out, err = (_read(p) for p in paths)
    return status, value, out, err, left, patched


def _main_exit_code(fn, args) -> int:
    """``fn(*args)`` as an interpreter runs a program: its exit code."""
    try:
        fn(*args)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


class _Captured:
    """fds 1 and 2 (and so sys.stdout/stderr, child processes, C code) into two files."""

    def __init__(self, paths):
        self.paths = paths

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = [os.dup(1), os.dup(2)]
        for fd, path in zip((1, 2), self.paths):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)


def _read(path) -> str:
    with open(path, errors="replace") as f:
        return f.read()


class Pool:
    """``world_size`` rank processes serving tasks (module docstring)."""

    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.workdir = tempfile.mkdtemp(prefix=f"rankpool{world_size}-")
        self.conns, self.procs = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(rank, world_size, child, self.workdir),
                               name=f"rank{rank}of{world_size}")
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self.ready = False

    def run(self, fn, args, mode: str, timeout: float, port: int):
        """Runs one task on every rank; returns [(value, out, err, left, patched)] by rank or
        raises :class:`RankFailure`. After a failure, or a task that left a function replaced
        (``patched``), the pool is killed (:attr:`alive` is False) and the next task gets a new one."""
        payload = pickle.dumps((fn, args))
        done = False
        try:
            self._await_ready(timeout)
            for conn in self.conns:
                conn.send((list(sys.path), port, payload, mode))
            answers, problems = self._collect(timeout)
            if problems:
                raise RankFailure(self._story(problems, answers))
            results = [answers[r][1:] for r in range(self.world_size)]
            done = not any(patched for *_, patched in results)  # else retired: never reused
            return results
        finally:
            if not done:
                self.kill()

    def _await_ready(self, timeout):
        if self.ready:
            return
        deadline = time.monotonic() + timeout
        for rank, conn in enumerate(self.conns):
            try:
                if not conn.poll(max(0.0, deadline - time.monotonic())):
                    raise RankFailure(f"rank {rank} of {self.world_size} did not start in "
                                      f"{timeout:.0f}s")
                conn.recv()
            except (EOFError, OSError):
                raise RankFailure(f"rank {rank} of {self.world_size} died while starting (exit code "
                                  f"{self.procs[rank].exitcode}); its stderr:\n"
                                  f"{_tail(self.workdir, f'start-err{rank}.txt')}") from None
        self.ready = True

    def _collect(self, timeout):
        """Every rank's answer, or what went wrong with the ranks that gave none."""
        deadline = time.monotonic() + timeout
        answers, problems = {}, {}
        pending = set(range(self.world_size))
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            waitables = {self.conns[r]: r for r in pending}
            waitables.update({self.procs[r].sentinel: r for r in pending})
            for ready in wait(list(waitables), timeout=left):
                rank = waitables[ready]
                if rank not in pending:
                    continue
                answer = self._receive(rank) if ready is self.conns[rank] else None
                if answer is not None:
                    answers[rank] = answer
                    if answer[0] == "error":
                        problems[rank] = answer[1]
                elif ready is self.procs[rank].sentinel or not self.procs[rank].is_alive():
                    self.procs[rank].join(1)
                    problems[rank] = f"died with exit code {self.procs[rank].exitcode} (no answer)"
                else:
                    continue
                pending.discard(rank)
                if problems:
                    deadline = min(deadline, time.monotonic() + GRACE)
        for rank in sorted(pending):
            why = ("still running after its peer failed" if problems
                   else f"no answer after {timeout:.0f}s (hung)")
            problems[rank] = f"{why}; its stack:\n{self._stack(rank)}"
        return answers, problems

    def _receive(self, rank):
        """The rank's answer, or None when its end of the pipe is gone (it died)."""
        try:
            return self.conns[rank].recv() if self.conns[rank].poll() else None
        except (EOFError, OSError):
            self.procs[rank].join(1)
            return None

    def _stack(self, rank) -> str:
        path = os.path.join(self.workdir, f"stack{rank}.txt")
        try:
            os.kill(self.procs[rank].pid, signal.SIGUSR2)
            time.sleep(0.5)
            with open(path, errors="replace") as f:
                return f.read()[-OUTPUT_TAIL:] or "(empty)"
        except OSError as e:
            return f"(no stack: {e})"

    def _story(self, problems, answers) -> str:
        lines = [f"{len(problems)} of {self.world_size} rank(s) failed:"]
        for rank in sorted(problems):
            lines.append(f"--- rank {rank}: {problems[rank]}")
            out, err = (answers[rank][2:4] if rank in answers
                        else (_tail(self.workdir, f"out{rank}.txt"), _tail(self.workdir, f"err{rank}.txt")))
            for name, text in (("stdout", out), ("stderr", err)):
                if text and text.strip():
                    lines.append(f"--- rank {rank} {name} (tail):\n{text[-OUTPUT_TAIL:]}")
        return "\n".join(lines)

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self) -> None:
        """Stops the ranks politely (end of session), killing any that do not stop."""
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(5)
        self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        for conn in self.conns:
            conn.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _tail(workdir, name) -> str:
    try:
        return _read(os.path.join(workdir, name))[-OUTPUT_TAIL:]
    except OSError:
        return ""


_pools: dict[tuple[int, int], Pool] = {}


def pool(world_size: int, slot: int = 0) -> Pool:
    """This session's pool of ``world_size`` ranks (a fresh one after a failure); ``slot``
    numbers independent pools of one size, for tasks run side by side from threads."""
    current = _pools.get((world_size, slot))
    if current is None or not current.alive:
        current = _pools[(world_size, slot)] = Pool(world_size)
    return current


@atexit.register
def close_all() -> None:
    """Stops every pool (also registered with atexit, before multiprocessing joins children)."""
    while _pools:
        _pools.popitem()[1].close()
