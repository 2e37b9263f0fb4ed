"""Process hygiene: whatever a rank starts dies with it, and a stop signal cannot break a save.

Megatron-Core 0.16.1's ``torch_dist`` save (``dist_checkpointing.save`` with its default
``TorchDistSaveShardedStrategy``, even when synchronous) runs
``FileSystemWriterAsync.write_preloaded_data_multiproc``, which

- forks one writer process per bucket (``thread_count``, 2) for every save
  (``mp.get_context("fork")``, strategies/filesystem_async.py), waiting for them on a
  ``JoinableQueue`` with no timeout;
- puts the results on ``_get_write_results_queue()``: a queue served by a ``spawn``-context
  ``Manager()`` process (~325 MB: it re-imports the main module), started at the first save
  and kept for the life of the rank; launching it also starts multiprocessing's resource
  tracker, which ignores SIGINT and SIGTERM.

None of them is tied to the rank: after a kill -9 of the rank the Manager and the tracker are
re-parented to init and live on, and a writer goes on writing its shard. The Manager, the
tracker and the writers are also in the rank's process group, so a SIGTERM to that group
(torchrun's shutdown, SLURM's preemption) kills the Manager and any writer mid-save, and the
rank's own checkpoint-and-stop save then waits forever for a writer that is gone.

``sync_save_strategy()`` is the default strategy with three changes, all confined to our
(synchronous) saves:

- the results queue is an in-process ``queue.Queue``: in a synchronous save it is written and
  read by the rank itself (the writers report on their own fork queue), so no Manager and no
  resource tracker are started;
- SIGTERM and SIGUSR1 are blocked in the saving thread while it saves, so the writers it forks
  inherit them blocked and finish; the rank still gets the signal (other threads, or on unblock)
  and stops after the save, as the trainer does anyway;
- every child forked from a main thread gets a parent-death signal (SIGKILL; Linux prctl), so a
  writer dies with its rank.

``install()`` sets up the last one for every fork of this process (idempotent; a no-op off
Linux). The death signal fires when the *forking thread* exits, so it is only set for forks made
by the main thread (a fork from a short-lived worker thread would otherwise be killed with it).

The ranks themselves are torchrun's children in sessions of their own: after a kill -9 of
torchrun they used to train on, re-parented to init. ``setup_rank()`` (called by the Trainer)
also gives a rank started by torchrun a parent-death signal, SIGTERM, so it stops the way a
SLURM preemption stops it: the step finishes, all ranks agree, a checkpoint, exit 0.
"""

import contextlib
import os
import queue
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what the trainer treats as "stop"

_installed = False
_fork_parent = None  # (pid, forked from the main thread), recorded just before each fork
_libc = None  # resolved in the parent: a fork child must not import or dlopen


def _prctl():
    global _libc
    if _libc is None:
        import ctypes

        _libc = (ctypes.CDLL(None, use_errno=True), ctypes.get_errno)
    return _libc


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Asks the kernel to send ``sig`` to this process when its parent (thread) dies; False
    where there is no such mechanism (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    libc, get_errno = _prctl()
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    return True


def _before_fork() -> None:
    global _fork_parent
    _fork_parent = (os.getpid(), threading.current_thread() is threading.main_thread())


def _after_fork_in_child() -> None:
    parent = _fork_parent
    if parent is None or not parent[1]:
        return
    try:
        set_parent_death_signal(signal.SIGKILL)
    except OSError:
        return
    if os.getppid() != parent[0]:  # the parent died before the death signal was armed
        os.kill(os.getpid(), signal.SIGKILL)


def install() -> None:
    """Every child this process forks from its main thread from now on dies with it
    (``os.fork``, multiprocessing's fork context; not ``subprocess``, which execs)."""
    global _installed
    if _installed or not sys.platform.startswith("linux"):
        return
    _prctl()
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _installed = True


def setup_rank() -> None:
    """For a training rank: its forked children die with it (``install``) and, when torchrun
    started it (``TORCHELASTIC_RUN_ID``), it gets SIGTERM when torchrun dies. torchrun starts
    its workers from its main thread, which lives as long as torchrun does."""
    install()
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        set_parent_death_signal(signal.SIGTERM)
    except OSError:
        return
    if parent == 1 or os.getppid() != parent:  # torchrun died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def _stop_signals_blocked():
    """SIGTERM/SIGUSR1 blocked in this thread (and so in the children it forks) meanwhile."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def _in_process_results_queue():
    """Megatron's write-results queue as a plain queue for the duration (no Manager process)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not hasattr(filesystem_async, "_results_queue"):  # another Megatron: leave it be
        yield
        return
    previous = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = previous


_strategy_class = None


def sync_save_strategy():
    """A ``dist_checkpointing.save`` sharded strategy: Megatron's default (``torch_dist``
    version 1, same files) whose synchronous save leaves no process behind (module docstring)."""
    global _strategy_class
    if _strategy_class is None:
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

        class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
            def save(self, sharded_state_dict, checkpoint_dir):
                install()
                with _stop_signals_blocked(), _in_process_results_queue():
                    return super().save(sharded_state_dict, checkpoint_dir)

        _strategy_class = SyncTorchDistSaveStrategy
    return _strategy_class("torch_dist", 1)
