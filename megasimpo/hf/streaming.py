"""Streaming ``dist_checkpointing.save``: a checkpoint written one tensor block at a time.

The state handed to ``dist_checkpointing.save`` holds ShardedTensors whose data lives on the
``meta`` device (shapes and dtypes only). A save strategy gives torch.distributed.checkpoint
(DCP) lazy tensors instead; DCP's file writer (one thread) asks for each block when it reaches
it, and ``produce(piece)`` reads, converts and returns it, after which it is dropped. torch's
writer keeps a file's blocks alive until the file is closed, so files are cut at the size of the
largest block (``torch_compat.bounded_file_writer``, version-bound): peak memory is a few of the
largest tensors, not the model.
"""

import io
from typing import Callable

import torch

from megasimpo.config import ModelConfig
from megasimpo.families.registry import family_of
from megasimpo.hf import mapping
from megasimpo.torch_compat import bounded_file_writer, checksummed_writes


def _chunk_shape(sh) -> torch.Size:
    """A ShardedTensor's block as stored: its local shape with the prepended (layer) axes as 1."""
    return torch.Size((1,) * sh.prepend_axis_num + tuple(sh.local_shape))


class _LazyTensor:
    """A checkpoint tensor whose blocks are produced only when DCP's writer resolves them.

    Implements DCP's ``__create_write_items__`` protocol (as Megatron's CheckpointableShardedTensor
    does), with data from ``produce(sharded_tensor)`` instead of a tensor held in memory.
    """

    def __init__(self, produce: Callable):
        self.produce = produce
        self.shards = []

    def __create_write_items__(self, fqn, obj):
        from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                           TensorProperties)
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        return [WriteItem(index=MetadataIndex(fqn, torch.Size(sh.global_offset), i),
                          type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(offsets=torch.Size(sh.global_offset),
                                                         sizes=_chunk_shape(sh)),
                              properties=TensorProperties(dtype=sh.dtype),
                              size=torch.Size(sh.global_shape)))
                for i, sh in enumerate(self.shards)]

    def block(self, index) -> torch.Tensor:
        """The data of the block at ``index.offset``, produced now."""
        sh = next(s for s in self.shards if tuple(s.global_offset) == tuple(index.offset))
        t = self.produce(sh)
        assert t.shape == tuple(sh.local_shape) and t.dtype == sh.dtype, (sh, t.shape, t.dtype)
        return t.contiguous().view(_chunk_shape(sh))


def _planner():
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner

    class LazyPlanner(MCoreSavePlanner):
        """Megatron's save planner; lazy tensors are produced when the writer looks them up."""

        def lookup_object(self, index):
            obj = self.state_dict[index.fqn]
            if isinstance(obj, _LazyTensor):
                return obj.block(index)
            return super().lookup_object(index)

    return LazyPlanner(flatten_state_dict=False)


def streaming_strategy(produce: Callable):
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy

    class StreamingSave(SaveShardedStrategy):
        """The ``torch_dist`` format (what ``dist_checkpointing.load`` reads), produced lazily."""

        @property
        def can_handle_sharded_objects(self):
            return True

        def save(self, sharded_state_dict, checkpoint_dir):
            from torch.distributed.checkpoint import save as dcp_save

            state = {}
            for sh in nested_values(sharded_state_dict):
                if isinstance(sh, ShardedObject):  # serialised exactly as Megatron's strategy does
                    buf = io.BytesIO()
                    torch.save([sh.data], buf)
                    state[sh.unique_key] = buf
                else:
                    state.setdefault(sh.key, _LazyTensor(produce)).shards.append(sh)
            with checksummed_writes():  # a checksum per block, verified by every load
                dcp_save(state, storage_writer=bounded_file_writer(str(checkpoint_dir)),
                         planner=_planner())

    return StreamingSave("torch_dist", 1)


def sharded_state(model: ModelConfig, dtype: torch.dtype) -> tuple:
    """(sharded state dict with meta-device data, {(key, global offset): Piece})."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    state, where = {}, {}
    for n, p in enumerate(mapping.pieces(model)):
        offsets = p.prepended(model.num_layers)
        prepend = len(offsets)
        if p.part[1] > 1:
            offsets.append((prepend, p.part[0], p.part[1]))
        sh = ShardedTensor.from_rank_offsets(
            p.key, torch.empty(p.shape, dtype=dtype, device="meta"), *offsets, replica_id=0,
            prepend_axis_num=prepend, allow_shape_mismatch=p.kind == "vocab")
        state[f"piece{n}"] = sh
        where[(p.key, tuple(sh.global_offset))] = p
    for n, (key, shape, offset) in enumerate(family_of(model).extra_states(model)):
        state[f"extra{n}"] = ShardedObject(key, None, shape, offset, replica_id=0)
    return state, where
