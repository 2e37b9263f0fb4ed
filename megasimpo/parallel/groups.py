"""Process groups from a Layout. The only module that touches Megatron's ``parallel_state``.

Everything else receives a :class:`ProcessGroups` and passes groups explicitly.
"""

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megasimpo.config import Layout
from megasimpo.parallel import cpu

PORT_ATTEMPTS = 5  # ports init_distributed tries when it picks MASTER_PORT itself


@dataclass(frozen=True)
class ProcessGroups:
    """This rank's groups and coordinates in the layout."""

    layout: Layout
    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    cp: dist.ProcessGroup
    dp: dist.ProcessGroup  # data-parallel replicas, without CP
    dp_cp: dist.ProcessGroup  # data-parallel x context-parallel (what DDP reduces over)
    rank: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int

    @property
    def is_last_stage(self) -> bool:
        """Whether this rank holds the output layer (the last pipeline stage)."""
        return self.pp_rank == self.layout.pp - 1

    @property
    def reports_metrics(self) -> bool:
        """One rank per DP replica contributes metrics: last stage, TP rank 0, CP rank 0."""
        return self.is_last_stage and self.tp_rank == 0 and self.cp_rank == 0


def init_distributed() -> tuple[int, int]:
    """Starts the default process group (gloo on CPU, NCCL on GPU); returns (rank, world size).

    Plain ``python -m megasimpo`` runs as a single rank: the torchrun variables are filled in,
    MASTER_PORT with a port that is free when picked. Another process can bind that port before
    the rendezvous store does (two runs started at the same instant); the store then fails with
    EADDRINUSE and a new port is picked, ``PORT_ATTEMPTS`` times at most. A MASTER_PORT that
    torchrun or the user set is shared with the other ranks, so it is used as given, no retry.
    """
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        pick_port = "MASTER_PORT" not in os.environ
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            backend = "nccl"
        else:
            cpu.enable()
            backend = "gloo"
        for attempt in range(1, PORT_ATTEMPTS + 1):
            if pick_port:
                os.environ["MASTER_PORT"] = str(_free_port())
            try:
                dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
                break
            except RuntimeError as e:  # torch.distributed.DistNetworkError from the TCPStore
                if not (pick_port and attempt < PORT_ATTEMPTS and _address_in_use(e)):
                    raise
    return dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _address_in_use(error: Exception) -> bool:
    """Whether ``error`` is the rendezvous store failing to listen on a port already taken."""
    text = str(error)
    return "EADDRINUSE" in text or "address already in use" in text.lower()


def initialize(layout: Layout, seed: int) -> ProcessGroups:
    """Creates Megatron's model-parallel groups for ``layout`` and seeds the RNG tracker."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if dist.get_world_size() != layout.world_size:
        raise ValueError(
            f"layout needs {layout.world_size} ranks (tp={layout.tp} pp={layout.pp} cp={layout.cp} "
            f"dp={layout.dp}) but the world has {dist.get_world_size()}"
        )
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        create_gloo_process_groups=has_gloo_groups(),
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ProcessGroups(
        layout=layout,
        tp=ps.get_tensor_model_parallel_group(),
        pp=ps.get_pipeline_model_parallel_group(),
        cp=ps.get_context_parallel_group(),
        dp=ps.get_data_parallel_group(),
        dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
        rank=dist.get_rank(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def has_gloo_groups() -> bool:
    """Whether Megatron's groups get gloo twins: on a gloo world only (not under NCCL, nor the
    fake world of `plan --simulate`, where no peer would answer a gloo rendezvous)."""
    return dist.get_backend() == "gloo"


def chunk_stages(vp_stage: Optional[int]) -> tuple[bool, bool]:
    """(pre_process, post_process) for a model chunk: whether it holds the embedding / output layer."""
    from megatron.core import parallel_state as ps

    return (ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage))


def all_reduce_host(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """A small CPU tensor reduced over the whole world, returned on the CPU: it travels on the
    device the backend needs (the current GPU for NCCL). No-op on one rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    moved = tensor.to(dev)
    dist.all_reduce(moved, op=op)
    return moved.cpu()


def first_error(error):
    """The first rank's error message (or None), on every rank: each rank says how its part of
    a collective piece of work went, and all act on the same answer."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), None)


def from_rank0(value):
    """``value`` as rank 0 has it, on every rank (a picklable object; identity on one rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def destroy() -> None:
    """Tears down Megatron's groups and the default group (safe to call twice)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
