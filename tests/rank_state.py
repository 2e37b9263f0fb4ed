"""What one test may change inside a long-lived rank process, and how it is put back.

A rank of the pool (``rank_pool.py``) runs one test's function after another. Before its first
task it records a :class:`Baseline`; after every task :func:`teardown` tears down what the task
set up and puts the process back to that baseline, so the next test starts as it would have in a
fresh process:

- Megatron's model-parallel state (groups, global memory buffer), its RNG tracker and the
  micro-batch calculator; the default process group;
- the CPU redirect of ``megasimpo.parallel.cpu`` (still installed, exactly once, on top of the
  torch-function-mode stack: a mode a test left pushed is popped);
- torch's global switches (default dtype, threads, grad mode, deterministic algorithms) and its
  default generator, reseeded with the seed a fresh process starts with;
- the environment, working directory, ``sys.path``, signal handlers and mask, warning filters (and the
  once-per-location memory, so a warning a test expects is printed again), logging handlers;
- child processes the task started and left running (killed);
- functions, classes and UPPER_CASE constants of the loaded modules (and the methods of their
  classes): a test that
  replaced one (``dist_checkpointing.save = failing``) and did not put it back is reported, and
  the rank is not reused (see :class:`Attributes`).

:func:`teardown` returns the problems it found and fixed, so a leak is visible in the test that
caused it instead of in whichever test runs next.
"""

import gc
import logging
import os
import re
import signal
import sys
import warnings
from dataclasses import dataclass, field

import torch

# Signals a test (or the run loop under test) may take over; their handlers are put back.
_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP,
                             signal.SIGALRM, signal.SIGCHLD))


@dataclass
class Baseline:
    """The state of a freshly started rank, recorded once before its first task."""

    environ: dict = field(default_factory=lambda: dict(os.environ))
    cwd: str = field(default_factory=os.getcwd)
    sys_path: list = field(default_factory=lambda: list(sys.path))
    handlers: dict = field(default_factory=lambda: {s: signal.getsignal(s) for s in _SIGNALS})
    signal_mask: set = field(default_factory=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, []))
    warning_filters: list = field(default_factory=lambda: list(warnings.filters))
    log_handlers: list = field(default_factory=lambda: list(logging.getLogger().handlers))
    log_level: int = field(default_factory=lambda: logging.getLogger().level)
    default_dtype: torch.dtype = field(default_factory=torch.get_default_dtype)
    num_threads: int = field(default_factory=torch.get_num_threads)
    seed: int = field(default_factory=torch.initial_seed)
    mode_depth: int = field(default_factory=lambda: torch._C._len_torch_function_stack())


def _release_models() -> None:
    """Frees the models and optimizers a task built. A trained Megatron model is not garbage
    the collector can find once its task has ended: DDP keeps each parameter's gradient
    accumulator with a hook that holds the DDP module, and the distributed optimizer's main
    parameters are views whose C++ base keeps each parameter's Python object alive and
    untraversed; the cycles hold the model, its buffers and its process groups, each with gloo
    threads that would pile up task after task. Both links are cut here (the task is over)."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on every object wakes deprecation notices
        found = [obj for obj in gc.get_objects()
                 if isinstance(obj, (DistributedDataParallel, MegatronOptimizer))]
    for obj in found:
        if isinstance(obj, DistributedDataParallel) and isinstance(getattr(obj, "grad_accs", None), list):
            obj.grad_accs.clear()
        elif isinstance(obj, MegatronOptimizer):
            vars(obj).clear()
    del found
    # Megatron memoises methods with functools.lru_cache (RotaryEmbedding.forward): the cache
    # holds the module instance, and through it a process group.
    for memoised in _memoised():
        memoised.cache_clear()


_memoised_in: dict = {}  # Megatron module name -> its lru_cache'd functions and methods


def _memoised() -> list:
    """Every functools.lru_cache'd function or method of the Megatron modules loaded (a module
    is looked through once, when first seen)."""
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron") and module is not None and name not in _memoised_in:
            found = []
            for value in list(vars(module).values()):
                members = list(vars(value).values()) if isinstance(value, type) else [value]
                found += [m for m in members if callable(getattr(m, "cache_clear", None))]
            _memoised_in[name] = found
    return [m for found in _memoised_in.values() for m in found]


def _megatron() -> list[str]:
    """Destroys Megatron's global state a task may have created, and the models it left."""
    import torch.distributed as dist
    from megatron.core import num_microbatches_calculator as nmc
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    _release_models()
    ps.destroy_model_parallel()
    # destroy_model_parallel of 0.16.1 forgets a few groups (the intra-partial data-parallel
    # ones): any group still named by a module global is dropped too.
    for name, value in list(vars(ps).items()):
        if name.startswith("_") and isinstance(value, (dist.ProcessGroup, dist.Store)):
            setattr(ps, name, None)
    if nmc._GLOBAL_NUM_MICROBATCHES_CALCULATOR is not None:
        nmc.destroy_num_microbatches_calculator()
    # The tracker holds the seeds of the last initialize(); a fresh process has none.
    mrandom._CUDA_RNG_STATE_TRACKER = None
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    return []  # a test's groups are the pool's to destroy: not a leak


def _process_group() -> list[str]:
    import torch.distributed as dist

    if not dist.is_initialized():
        return []
    dist.destroy_process_group()
    return []  # the pool initialised it for the task: not a leak


def _torch(base: Baseline) -> list[str]:
    left = []
    from megasimpo.parallel import cpu

    depth = torch._C._len_torch_function_stack()
    if depth > base.mode_depth:
        left.append(f"{depth - base.mode_depth} torch function mode(s) left pushed")
        while torch._C._len_torch_function_stack() > base.mode_depth:
            torch._C._pop_torch_function_stack()
    if depth < base.mode_depth or not cpu.enable():
        raise RuntimeError("the CPU redirect was removed by the task; this rank cannot be reused")
    if torch.get_default_dtype() != base.default_dtype:
        left.append(f"default dtype {torch.get_default_dtype()}")
        torch.set_default_dtype(base.default_dtype)
    if not torch.is_grad_enabled():
        left.append("grad mode off")
        torch.set_grad_enabled(True)
    if torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(False)
    torch.set_num_threads(base.num_threads)
    torch.manual_seed(base.seed)  # what an unseeded test sees in a fresh process
    return left


def _process(base: Baseline) -> list[str]:
    left = []
    if dict(os.environ) != base.environ:
        os.environ.clear()
        os.environ.update(base.environ)
    if os.getcwd() != base.cwd:
        os.chdir(base.cwd)
    sys.path[:] = base.sys_path
    for s, handler in base.handlers.items():
        if signal.getsignal(s) is not handler:
            left.append(f"handler of {signal.Signals(s).name}")
            signal.signal(s, handler)
    if signal.pthread_sigmask(signal.SIG_BLOCK, []) != base.signal_mask:
        left.append("blocked signals")
        signal.pthread_sigmask(signal.SIG_SETMASK, base.signal_mask)
    warnings.filters[:] = base.warning_filters
    warnings._filters_mutated()  # forget which warnings were already shown
    root = logging.getLogger()
    root.handlers[:] = base.log_handlers
    root.setLevel(base.log_level)
    return left


def _children() -> list[str]:
    """Kills the processes this rank started and left running."""
    import psutil

    left = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any(helper in part for part in child.cmdline()
                   for helper in ("resource_tracker", "forkserver")):
                continue  # multiprocessing's own, started once and shared by later tasks
            left.append(f"child process {child.pid} ({' '.join(child.cmdline()[:3])})")
            child.kill()
        except psutil.Error:
            pass
    return left


_CONSTANT = re.compile(r"^[A-Z][A-Z0-9_]*$")  # a module constant by convention: WINDOW, DDP_BUCKET_SIZE


# What tests reach into; the rest of sys.modules (all of torch, transformers) would make the
# picture ten times dearer for attributes no test replaces.
_WATCHED = ("megasimpo", "megatron", "torch.distributed", "safetensors")
_WATCHED_STDLIB = {"os", "shutil", "time", "subprocess", "signal", "socket", "tempfile", "torch"}
_TESTS = os.path.dirname(os.path.abspath(__file__))


def _watched(name: str, module) -> bool:
    if name in _WATCHED_STDLIB or name.split(".")[0] in _WATCHED:
        return True
    path = getattr(module, "__file__", None) or ""  # a test module (not this machinery)
    return path.startswith(_TESTS) and not name.startswith("rank_")


class Attributes:
    """Which function, class, method or constant (an UPPER_CASE name) every loaded module and
    its classes hold, by identity.

    Compared after each task with the picture taken after the previous one: a replaced callable
    is a monkeypatch the task left behind. It cannot be undone reliably from here (the patched
    object may be cached elsewhere), so it is reported and the rank retired. Modules a task
    imported are added to the picture as they are. Other values (flags, caches, private state)
    are not compared: they change legitimately.
    """

    def __init__(self):
        self.seen = self._take()

    @staticmethod
    def _take() -> dict:
        picture = {}
        for name, module in list(sys.modules.items()):
            if module is None or not _watched(name, module):
                continue
            try:
                entries = list(vars(module).items())
            except TypeError:
                continue
            for attr, value in entries:
                if _CONSTANT.match(attr):
                    picture[(name, attr)] = id(value)
                elif callable(value) and not attr.startswith("__"):
                    picture[(name, attr)] = id(value)
                    if isinstance(value, type) and getattr(value, "__module__", None) == name:
                        for cattr, cvalue in list(vars(value).items()):
                            if not cattr.startswith("__") and (
                                    callable(cvalue) or isinstance(cvalue, (staticmethod,
                                                                            classmethod, property))):
                                picture[(name, f"{attr}.{cattr}")] = id(cvalue)
        return picture

    def changed(self) -> list[str]:
        """What was replaced since the last call (and takes the new picture)."""
        now = self._take()
        replaced = [f"{m}.{a}" for (m, a), i in now.items() if self.seen.get((m, a), i) != i]
        self.seen = now
        return sorted(replaced)


MAX_THREADS = 64  # a rank between tasks runs a handful; more means process groups leaked


def teardown(base: Baseline, attributes: Attributes) -> tuple[list[str], list[str]]:
    """Puts this rank back to ``base``; returns (what the task had left behind and was undone,
    what it left that cannot be undone: replaced functions, leaked threads; the rank must not be
    reused)."""
    left = _megatron() + _process_group() + _torch(base) + _process(base) + _children()
    gc.collect()
    # What is left now is the rank's (imports, caches): frozen out of later collections and of
    # gc.get_objects(), so that each teardown looks through what one task made, not the
    # million objects of torch, Megatron and transformers.
    gc.freeze()
    retire = attributes.changed()
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 0
    if threads > MAX_THREADS:
        retire.append(f"{threads} threads still running (process groups that were not freed?)")
    return left, retire
