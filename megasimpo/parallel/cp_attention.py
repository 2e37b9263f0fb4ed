"""Context-parallel core attention without Transformer Engine: K and V all-gathered over the
CP group, each rank attending with its own query chunks, causal by global positions (the
approach Llama 3 was trained with).

The split (one home, used by the data path in ``step.cp_slice`` too): a sequence of length L is
cut into 2*cp chunks and CP rank r holds chunks r and 2*cp-1-r, so every rank gets the same
share of the causal attention's work. This is Megatron's split (its RoPE takes the matching
rotary rows with ``get_pos_emb_on_this_cp_rank``). A packed (THD) row is split per segment, as
Transformer Engine's THD context parallelism does: each segment's length is a multiple of 2*cp
(``data/packing.py`` pads them) and each is split like a sequence of its own; Megatron's THD RoPE
(``_apply_rotary_pos_emb_thd``) takes the rotary rows of the same positions.

Shaped like Megatron's ``tensor_parallel/cross_entropy.py``: helpers, one autograd.Function (the
all-gather of K/V along the sequence, whose backward reduce-scatters dK/dV), one public function
with an explicit process group.
"""

from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup


def cp_positions(length: int, cp_rank: int, cp_size: int, device=None) -> Tensor:
    """[length / cp] int64: the positions 0..length-1 of one sequence that CP rank ``cp_rank``
    holds, in its order: chunk r then chunk 2cp-1-r of 2cp equal chunks."""
    if length % (2 * cp_size):
        raise ValueError(f"a sequence of {length} positions does not split into 2 x cp = "
                         f"{2 * cp_size} equal chunks")
    c = length // (2 * cp_size)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c,
                          device=device)
    return torch.cat([first, second])


def thd_cp_positions(segments: Sequence[int], cp_rank: int, cp_size: int, device=None) -> Tensor:
    """[sum(segments) / cp] int64: the positions of a packed row (segments back to back, each a
    multiple of 2cp long) that CP rank ``cp_rank`` holds: each segment split by ``cp_positions``,
    segment after segment."""
    parts, start = [], 0
    for n in segments:
        parts.append(start + cp_positions(int(n), cp_rank, cp_size, device))
        start += int(n)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)


def _segment_lengths(cu_seqlens: Tensor) -> list:
    """Host ints from [n + 1] boundaries (one small device read per forward under packing)."""
    return cu_seqlens.diff().tolist()


class _AllGatherSequence(torch.autograd.Function):
    """[s, ...] -> [cp * s, ...]: every CP rank's tensor, rank after rank, along dim 0.
    Backward: the gradient of each rank's part is summed over the ranks that used it
    (reduce-scatter), since every rank attends to every rank's K and V."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        size = dist.get_world_size(group=group)
        out = x.new_empty((size * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        size = dist.get_world_size(group=ctx.group)
        out = grad.new_empty((grad.shape[0] // size,) + tuple(grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


def _allowed(q_pos: Tensor, k_pos: Tensor, seg: Optional[Tensor]) -> Tensor:
    """[sq, sk] bool, True = may attend: key position <= query position (global positions), and
    in the same packed segment when ``seg`` (segment id per global position) is given."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if seg is not None:
        allowed &= seg[q_pos][:, None] == seg[k_pos][None, :]
    return allowed


def context_parallel_attention(query: Tensor, key: Tensor, value: Tensor, *,
                               cp_group: ProcessGroup, scale: float,
                               cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """Causal attention of this CP rank's queries over the whole sequence's keys and values.

    Padded rows (``cu_seqlens`` None): query [s/cp, b, np, hn], key/value [s/cp, b, ng, hn]
    (this rank's ``cp_positions`` of each row; np/ng heads of this TP rank, np a multiple of ng)
    -> [s/cp, b, np, hn]. Packed row (THD): query [t/cp, np, hn], key/value [t/cp, ng, hn]
    (``thd_cp_positions``), ``cu_seqlens`` [n + 1] the segment boundaries of the WHOLE row (each
    segment a multiple of 2cp) -> [t/cp, np, hn]; attention stays inside each segment.

    K and V are all-gathered over ``cp_group`` (differentiable: dK/dV are reduce-scattered);
    the mask compares global positions, so the gathered keys need no reordering. Every query
    sees at least itself, so no row of the softmax is empty.
    """
    cp_size, cp_rank = dist.get_world_size(group=cp_group), dist.get_rank(group=cp_group)
    k_all = _AllGatherSequence.apply(key, cp_group)
    v_all = _AllGatherSequence.apply(value, cp_group)
    local, device = query.shape[0], query.device
    if cu_seqlens is None:
        positions = [cp_positions(local * cp_size, r, cp_size, device) for r in range(cp_size)]
        seg = None
    else:
        segments = _segment_lengths(cu_seqlens)
        positions = [thd_cp_positions(segments, r, cp_size, device) for r in range(cp_size)]
        seg = torch.repeat_interleave(torch.arange(len(segments), device=device),
                                      cu_seqlens.diff().to(device).long())
    mask = _allowed(positions[cp_rank], torch.cat(positions), seg)
    gqa = query.shape[-2] != key.shape[-2]
    if cu_seqlens is None:  # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, k_all, v_all))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                             enable_gqa=gqa)
        return out.permute(2, 0, 1, 3)
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, k_all, v_all))  # [1, heads, t, hn]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)
