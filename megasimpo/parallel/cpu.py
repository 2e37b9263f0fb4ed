"""Running Megatron-Core on CPU with gloo (tests, the demo, machines without CUDA).

Megatron-Core 0.16 assumes CUDA in a handful of places that are not numerics: factory calls with
``device="cuda"`` or ``pin_memory=True``, ``Tensor.cuda()``, ``torch.cuda.current_device()`` as
a device argument, the CUDA RNG helpers used by its RNG tracker, ``torch.cuda.synchronize``,
the optimizer's dtype asserts on ``Tensor.type()`` names, and the MoE ``alltoall`` token
dispatcher's side stream for its device-to-host copies (``torch.cuda.Stream``,
``current_stream``, ``stream``, ``Event``: on the host there is one stream, the caller's) and
its split sizes, which gloo's ``all_to_all_single`` takes only as Python lists (Megatron passes
tensors); with expert tensor parallelism the dispatcher also all-gathers and reduce-scatters
blocks of unequal rows, which gloo refuses: those run as equal padded blocks (all-gather) and
an all-reduce of the concatenated blocks (reduce-scatter), the same sums. :func:`enable`
redirects exactly those to the CPU. It is a no-op when CUDA is available, and it never changes
what any kernel computes: every redirected call lands on the same CPU op it would have run had
the caller asked for the CPU.
"""

import torch
from torch.overrides import TorchFunctionMode

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}
_enabled = False
_mode = None


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Integers are CUDA ordinals in Megatron's calls (torch.cuda.current_device()).
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device arguments to the CPU and reports CUDA type names for CPU tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):  # staging for a CUDA copy (Megatron's CP RoPE index)
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if i > 0 and _is_cuda(a) else a for i, a in enumerate(args))
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        return func(*args, **kwargs)


class _HostStream:
    """The one host "stream": work is done when the call returns, so waits and events are
    no-ops. ``Stream()`` and ``current_stream()`` are the same object, so the dispatcher sees
    itself on its side stream already and records nothing."""

    def __new__(cls, *args, **kwargs):
        if not hasattr(cls, "_one"):
            cls._one = super().__new__(cls)
        return cls._one

    def wait_stream(self, other) -> None:
        """Nothing to wait for."""

    def wait_event(self, event) -> None:
        """Nothing to wait for."""

    def synchronize(self) -> None:
        """Nothing outstanding."""

    def record_event(self, event=None):
        """An event that has already happened."""
        return event or _HostEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _HostEvent:
    """A CUDA event stand-in that has always happened."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None) -> None:
        """Nothing to mark."""

    def wait(self, stream=None) -> None:
        """Nothing to wait for."""

    def synchronize(self) -> None:
        """Nothing outstanding."""

    def query(self) -> bool:
        """Done."""
        return True


def _as_list(sizes):
    return sizes.tolist() if hasattr(sizes, "tolist") else sizes


def _all_to_all_single(all_to_all_single):
    def call(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        return all_to_all_single(output, input, _as_list(output_split_sizes),
                                 _as_list(input_split_sizes), *args, **kwargs)

    return call


def _uneven_all_gather(all_gather):
    def call(tensor_list, tensor, group=None, async_op=False):
        if len({tuple(t.shape) for t in tensor_list}) <= 1:
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)  # blocks differ in rows only (Megatron's)
        padded = tensor.new_zeros((rows,) + tuple(tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        blocks = [torch.empty_like(padded) for _ in tensor_list]
        all_gather(blocks, padded, group=group)
        for out, block in zip(tensor_list, blocks):
            out.copy_(block[: out.shape[0]])
        return None

    return call


def _list_reduce_scatter(output, input_list, op=torch.distributed.ReduceOp.SUM, group=None,
                         async_op=False):
    """``reduce_scatter`` of a list (blocks of any rows): all-reduce them concatenated, keep this
    rank's block."""
    full = torch.cat([t.reshape(-1) for t in input_list])
    torch.distributed.all_reduce(full, op=op, group=group)
    rank = torch.distributed.get_rank(group)
    start = sum(t.numel() for t in input_list[:rank])
    output.copy_(full[start:start + output.numel()].view_as(output))
    return None


def enable() -> bool:
    """Installs the CPU redirect when CUDA is absent; returns whether it is active. Idempotent."""
    global _enabled, _mode
    if torch.cuda.is_available():
        return False
    if _enabled:
        return True
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.manual_seed = lambda *a, **k: None
    torch.cuda.manual_seed_all = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.empty_cache = lambda: None
    torch.cuda.Stream = _HostStream
    torch.cuda.current_stream = lambda *a, **k: _HostStream()
    torch.cuda.stream = lambda stream=None: _HostStream()
    torch.cuda.Event = _HostEvent
    torch.distributed.all_to_all_single = _all_to_all_single(torch.distributed.all_to_all_single)
    torch.distributed.all_gather = _uneven_all_gather(torch.distributed.all_gather)
    torch.distributed.reduce_scatter = _list_reduce_scatter
    # The RNG tracker (dropout, TP weight init) forks and restores "CUDA" states: use the CPU one.
    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    _mode = _CudaToCpuMode()
    _mode.__enter__()
    _enabled = True
    return True
