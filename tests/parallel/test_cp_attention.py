"""Context-parallel SDPA attention (``parallel/cp_attention.py``) against plain full-sequence
SDPA: CP=2 on gloo, padded rows and a packed (THD) row, forward and gradients of q, k and v."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megasimpo.parallel.cp_attention import (context_parallel_attention, cp_attention_mask,
                                             cp_positions, thd_cp_positions)
from multirank import run_ranks

HEADS, GROUPS, HN = 4, 2, 8  # grouped-query attention: 2 query heads per K/V head
SCALE = HN ** -0.5
SEGMENTS = (8, 12, 4, 8)  # a packed row: each segment a multiple of 2 x cp = 4, the last a tail


def test_split_is_megatrons_load_balanced_split():
    # 16 positions, cp=2: chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert cp_positions(16, 0, 2).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert cp_positions(16, 1, 2).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert thd_cp_positions((4, 8), 1, 2).tolist() == [1, 2, 4 + 2, 4 + 3, 4 + 4, 4 + 5]
    try:
        cp_positions(6, 0, 2)
    except ValueError as e:
        assert "2 x cp = 4" in str(e)
    else:
        raise AssertionError("a length 2cp does not divide was accepted")


def _inputs(shape_q, shape_kv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64)
               for s in (shape_q, shape_kv, shape_kv))
    w = torch.randn(*shape_q, generator=g, dtype=torch.float64)  # d(sum(w * out))
    return q, k, v, w


def _reference(q, k, v, w, mask):
    """Plain SDPA over the whole sequence (fp64): output and the gradients of q, k, v.
    q [..., heads, t, hn] layouts as SDPA takes them; ``mask`` [t, t] True = may attend."""
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE, enable_gqa=True)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _worker(rank, world, packed, additive):
    if packed:  # THD [t, heads, hn]
        t = sum(SEGMENTS)
        q, k, v, w = _inputs((t, HEADS, HN), (t, GROUPS, HN))
        seg = torch.repeat_interleave(torch.arange(len(SEGMENTS)), torch.tensor(SEGMENTS))
        mask = torch.ones(t, t, dtype=torch.bool).tril() & (seg[:, None] == seg[None, :])
        sdpa = [x.transpose(0, 1).unsqueeze(0) for x in (q, k, v, w)]  # [1, heads, t, hn]
        ref = [x[0].transpose(0, 1) for x in _reference(*sdpa, mask)]
        idx = thd_cp_positions(SEGMENTS, rank, world)
        allowed = cp_attention_mask(rank, world, segments=SEGMENTS)
    else:  # padded rows [s, b, heads, hn]
        s, b = 16, 2
        q, k, v, w = _inputs((s, b, HEADS, HN), (s, b, GROUPS, HN))
        sdpa = [x.permute(1, 2, 0, 3) for x in (q, k, v, w)]  # [b, heads, s, hn]
        mask = torch.ones(s, s, dtype=torch.bool).tril()
        ref = [x.permute(2, 0, 1, 3) for x in _reference(*sdpa, mask)]
        idx = cp_positions(s, rank, world)
        allowed = cp_attention_mask(rank, world, length=s)
    local = [x[idx].clone().requires_grad_(True) for x in (q, k, v)]
    if additive:  # the form model.context_parallel_mask hands every layer
        allowed = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, float("-inf"))
    out = context_parallel_attention(*local, allowed, cp_group=dist.group.WORLD, scale=SCALE)
    (out * w[idx]).sum().backward()
    got = [out.detach()] + [x.grad for x in local]
    return [(g - r[idx]).abs().max().item() for g, r in zip(got, ref)]


def test_cp2_matches_full_sequence_sdpa_padded_and_packed():
    for packed, additive in ((False, False), (True, False), (True, True)):
        for errors in run_ranks(_worker, 2, packed, additive):
            # output, dq, dk, dv of this rank's positions (dk/dv summed over both ranks' queries)
            assert max(errors) < 1e-12, (packed, additive, errors)


def test_packed_rows_are_padded_and_split_per_segment():
    # The data path (pack_batch + step.cp_slice) hands each CP rank the positions the attention
    # mask and Megatron's THD RoPE assume: each segment padded to 2cp, split chunk r / 2cp-1-r.
    from megasimpo.data.batches import MicroBatch
    from megasimpo.data.packing import pack_step
    from megasimpo.step import cp_slice

    tokens = torch.tensor([[11, 12, 13, 14, 15, 0, 0, 0], [21, 22, 23, 0, 0, 0, 0, 0]])
    batch = MicroBatch(tokens=tokens, labels=tokens, loss_mask=(tokens > 0).float(),
                       position_ids=torch.arange(8).expand(2, 8), lengths=(5, 3),
                       weights=torch.ones(1))
    packed = pack_step([batch], 4, segment_multiple=4)[0]
    assert packed.packed.segments == (8, 4) and packed.packed.cu_seqlens.tolist() == [0, 8, 12]
    assert packed.tokens.tolist() == [[11, 12, 13, 14, 15, 0, 0, 0, 21, 22, 23, 0]]
    assert packed.loss_mask.sum() == 8 and packed.position_ids[0, 8:].tolist() == [0, 1, 2, 3]
    rank0, rank1 = (cp_slice(packed, r, 2) for r in (0, 1))
    assert rank0.tokens.tolist() == [[11, 12, 0, 0, 21, 0]]
    assert rank1.tokens.tolist() == [[13, 14, 15, 0, 22, 23]]
    assert rank1.packed.segment_ids.tolist() == [[0, 0, 0, 0, 1, 1]]
    assert rank1.packed.cu_seqlens.tolist() == [0, 8, 12]  # global: attention and RoPE
