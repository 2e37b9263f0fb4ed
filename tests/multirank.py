"""Run a test's function on N gloo ranks (CPU), or a program's ``main`` as if launched, in the
session's long-lived rank processes (``rank_pool.py``: reused from test to test, a failing or
hanging rank fails its test alone).

``run_ranks(fn, world_size, *args)``: ``fn(rank, world_size, *args)`` on every rank, with
``RANK``/``WORLD_SIZE``/``MASTER_*`` set, the CPU redirect on and a gloo default group started;
its return values (picklable) come back in rank order. ``fn`` must be a module-level function.

``run_main(target, argv, world_size=1)``: the program ``target`` (a module run as ``python -m``,
or a script path relative to the repository) with ``argv``, as ``python`` (one rank) or
``torchrun --nproc-per-node N`` would start it, in-process in the pool's ranks: a
``CompletedProcess`` with the first failing rank's exit code (else 0) and every rank's stdout
and stderr, rank 0 first. Tests that must cross a process
boundary (the torchrun launcher itself, signals, kill -9, locks between processes) keep
``subprocess``.
"""

import os
import runpy
import socket
import subprocess
import sys
import warnings

import rank_pool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(fn, world_size, args, mode, timeout, slot=0):
    answers = rank_pool.pool(world_size, slot).run(fn, args, mode, timeout, free_port())
    import pickle

    results = []
    for rank, (value, out, err, left, patched) in enumerate(answers):
        if mode == "ranks":  # shown with the test's own output when it fails
            for stream, text in ((sys.stdout, out), (sys.stderr, err)):
                if text:
                    stream.write(f"--- rank {rank} of {world_size}:\n{text}")
        if left:
            warnings.warn(f"{getattr(fn, '__qualname__', fn)} left behind in rank {rank}: "
                          f"{', '.join(left)} (undone)", stacklevel=3)
        if patched:
            warnings.warn(f"{getattr(fn, '__qualname__', fn)} left in rank {rank}: "
                          f"{', '.join(patched[:5])} (a replaced function: restore it in a "
                          "finally); the ranks were retired, the next test starts new ones",
                          stacklevel=3)
        results.append((pickle.loads(value), out, err))
    return results


def run_ranks(fn, world_size: int, *args, timeout: float = 600.0):
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; returns results by rank."""
    return [value for value, _, _ in _run(fn, world_size, args, "ranks", timeout)]


def _program(target, argv):
    """What ``python -m TARGET ARGV`` / ``python SCRIPT ARGV`` / ``python -c CODE ARGV`` runs
    (called in a rank)."""
    if target == "-c":
        sys.argv = ["-c", *argv[1:]]
        exec(compile(argv[0], "<string>", "exec"), {"__name__": "__main__"})
    elif target.endswith(".py"):
        path = target if os.path.isabs(target) else os.path.join(REPO, target)
        sys.argv = [path, *argv]
        sys.path.insert(0, os.path.dirname(path))
        runpy.run_path(path, run_name="__main__")
    else:
        sys.argv = [target, *argv]
        runpy.run_module(target, run_name="__main__", alter_sys=True)


def run_main(target: str, argv, world_size: int = 1, timeout: float = 600.0,
             env: dict | None = None, cwd: str | None = None,
             slot: int = 0) -> subprocess.CompletedProcess:
    """``target`` with ``argv`` as a launched program (module docstring), in ``cwd`` (default:
    this process's) with ``env`` added to the environment."""
    argv = [str(a) for a in argv]
    results = _run(_launched, world_size, (target, argv, env or {}, cwd or os.getcwd()), "main",
                   timeout, slot)
    # As torchrun: the run fails if any rank does, and every rank's output reaches the streams.
    code = next((c for c, _, _ in results if c), 0)
    out, err = ("".join(r[i] for r in results) for i in (1, 2))
    return subprocess.CompletedProcess([target, *argv], code, out, err)


def _launched(target, argv, env, cwd):
    os.environ.update(env)
    os.chdir(cwd)
    _program(target, argv)


def run_argv(argv, slot: int = 0, **kw) -> subprocess.CompletedProcess:
    """A child's command line ``[sys.executable, -m MOD | SCRIPT | -c CODE, ARGS...]`` run by
    :func:`run_main` instead of a new interpreter."""
    argv = [str(a) for a in argv]
    if argv[0] != sys.executable or len(argv) < 2:
        raise ValueError(f"not a python command line: {argv}")
    if argv[1] in ("-m", "-c"):
        target, args = (argv[2], argv[3:]) if argv[1] == "-m" else ("-c", argv[2:])
    else:
        target, args = argv[1], argv[2:]
    return run_main(target, args, slot=slot, **kw)


def run_jobs(jobs: dict, log_dir: str, workers: int) -> None:
    """``examples/ranking_accuracy.run_jobs`` (the studies' job runner) with each child run in a
    pool rank: same logs (LOG_DIR/name.log), same environment, same error on a failure. The
    real runner's process handling has its own test (tests/test_ranking_accuracy.py)."""
    import queue
    from concurrent.futures import ThreadPoolExecutor

    os.makedirs(log_dir, exist_ok=True)
    slots = queue.Queue()
    for slot in range(workers):
        slots.put(slot)

    def one(name):
        slot = slots.get()
        try:
            p = run_argv(jobs[name], slot=slot, cwd=REPO,
                         env={"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
        finally:
            slots.put(slot)
        with open(os.path.join(log_dir, name + ".log"), "w") as f:
            f.write(p.stdout + p.stderr)
        if p.returncode:
            raise RuntimeError(f"{name} failed (exit {p.returncode}): {' '.join(map(str, jobs[name]))}\n"
                               + "\n".join((p.stdout + p.stderr).splitlines()[-25:]))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, list(jobs)))



def run_study(relpath: str, argv, cwd, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """``python RELPATH ARGV`` for a study in ``examples/``: its ``main`` in this process, in
    ``cwd``, with the training jobs it starts as child processes run by :func:`run_jobs`
    instead; the exit code and the captured output as from the program."""
    from fixtures import load_script

    module = load_script(relpath)
    ra = module if hasattr(module, "run_jobs") else module.ra
    monkeypatch.setattr(ra, "run_jobs", run_jobs)
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        code = module.main([str(a) for a in argv]) or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return subprocess.CompletedProcess([relpath, *argv], code, out.out, out.err)
