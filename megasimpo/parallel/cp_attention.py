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

Shaped like Megatron's ``tensor_parallel/cross_entropy.py``: helpers and one public function with
an explicit process group; K/V go through Megatron's own differentiable sequence all-gather
(``gather_from_sequence_parallel_region``, whose backward reduce-scatters dK/dV).
"""

from typing import Optional, Sequence

import torch
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


def cp_attention_mask(cp_rank: int, cp_size: int, *, length: Optional[int] = None,
                      segments: Optional[Sequence[int]] = None, device=None) -> Tensor:
    """[L/cp, L] bool, True = may attend, for ``context_parallel_attention`` on CP rank
    ``cp_rank``: rows are this rank's query positions, columns the keys as the all-gather
    returns them (rank 0's positions, then rank 1's, ...). Causal by global positions; with
    ``segments`` (a packed row, host ints) also inside each segment. Give ``length`` (padded
    rows of L positions) or ``segments``. One mask serves every layer of a micro-batch."""
    if segments is None:
        positions = [cp_positions(length, r, cp_size, device) for r in range(cp_size)]
    else:
        positions = [thd_cp_positions(segments, r, cp_size, device) for r in range(cp_size)]
    q_pos, k_pos = positions[cp_rank], torch.cat(positions)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if segments is not None:
        seg = torch.repeat_interleave(torch.arange(len(segments), device=device),
                                      torch.tensor(list(segments), device=device))
        allowed &= seg[q_pos][:, None] == seg[k_pos][None, :]
    return allowed


def context_parallel_attention(query: Tensor, key: Tensor, value: Tensor, allowed: Tensor, *,
                               cp_group: ProcessGroup, scale: float) -> Tensor:
    """Causal attention of this CP rank's queries over the whole sequence's keys and values.

    Padded rows: query [s/cp, b, np, hn], key/value [s/cp, b, ng, hn] (this rank's
    ``cp_positions`` of each row; np/ng heads of this TP rank, np a multiple of ng) ->
    [s/cp, b, np, hn]. A packed row (THD): query [t/cp, np, hn], key/value [t/cp, ng, hn]
    (``thd_cp_positions``) -> [t/cp, np, hn]. ``allowed``: [s/cp, s], ``cp_attention_mask``
    (bool, True = may attend) or its additive form (0 / -inf, the query's dtype).

    K and V are all-gathered over ``cp_group`` (differentiable: dK/dV are reduce-scattered);
    the mask compares global positions, so the gathered keys need no reordering. Every query
    sees at least itself, so no row of the softmax is empty.
    """
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    # Megatron's sequence all-gather: backward reduce-scatters dK/dV, since every rank attends to
    # every rank's keys and values.
    k_all, v_all = (gather_from_sequence_parallel_region(x, group=cp_group) for x in (key, value))
    gqa = query.shape[-2] != key.shape[-2]
    if query.dim() == 4:  # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, k_all, v_all))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale,
                                             enable_gqa=gqa)
        return out.permute(2, 0, 1, 3)
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, k_all, v_all))  # [1, heads, t, hn]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)
