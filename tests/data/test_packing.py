"""Packing padded micro-batches into one row: layout, segments, padding tail (pure tensors, on
the CPU), and the one move to the device."""

import numpy as np
import pytest
import torch

from megasimpo.data.batches import MicroBatch, make_batch
from megasimpo.data.indexed import Pair
from megasimpo.data.packing import pack_batch, pack_step, prepare
from megasimpo.metrics import batch_forward_flops
from megasimpo.step import host_totals
from fixtures import TINY

pytestmark = pytest.mark.fast  # in `make test-fast`

PAIRS = [Pair(prompt_ids=[5, 6, 7], chosen_ids=[8, 9], rejected_ids=[10, 11, 12, 13]),
         Pair(prompt_ids=[14], chosen_ids=[15, 16, 17], rejected_ids=[18])]


def _batch(pairs=PAIRS, **kw):
    return make_batch(pairs, range(len(pairs)), 8, **kw)


def test_rows_are_concatenated_with_their_own_positions():
    batch = _batch(ref_logps=np.array([[-1.0, -2.0], [-3.0, -4.0]]))
    assert batch.lengths == (4, 3, 6, 1) and batch.num_tokens == 14  # chosen rows, then rejected
    assert batch.packed is None and batch.tokens.shape == (4, 8)
    packed = pack_batch(batch, 16)
    assert packed.tokens.tolist() == [[5, 6, 7, 8, 14, 15, 16, 5, 6, 7, 10, 11, 12, 14] + [0, 0]]
    assert packed.labels.tolist() == [[6, 7, 8, 9, 15, 16, 17, 6, 7, 10, 11, 12, 13, 18] + [0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 0, 1]]
    layout = packed.packed
    assert layout.segment_ids.tolist() == [[0] * 4 + [1] * 3 + [2] * 6 + [3] + [4, 4]]
    assert layout.cu_seqlens.tolist() == [0, 4, 7, 13, 14, 16]
    assert layout.cu_seqlens.dtype == torch.int32 and layout.max_seqlen == 6
    assert layout.segments == (4, 3, 6, 1, 2)  # host ints: nothing read back from a device
    # The loss mask is the padded rows' mask, row by row; the tail is never scored.
    mask = torch.cat([batch.loss_mask[i, :n] for i, n in enumerate([4, 3, 6, 1])])
    assert packed.loss_mask[0, :14].tolist() == mask.tolist()
    assert packed.loss_mask[0, 14:].tolist() == [0.0, 0.0]
    # The rest passes through.
    assert torch.equal(packed.weights, torch.ones(2)) and packed.lengths == batch.lengths
    assert packed.ref_logps.tolist() == [[-1.0, -2.0], [-3.0, -4.0]]
    with pytest.raises(ValueError, match="already packed"):
        pack_batch(packed, 16)


def test_exact_fit_has_no_tail_and_short_length_is_refused():
    packed = pack_batch(_batch(), 14)
    assert packed.packed.cu_seqlens.tolist() == [0, 4, 7, 13, 14]
    assert packed.packed.segment_ids.max().item() == 3
    with pytest.raises(ValueError, match="13 < the micro-batch's 14"):
        pack_batch(_batch(), 13)


def test_a_step_shares_one_rounded_length():
    short = _batch(PAIRS[1:])  # 3 + 1 = 4 positions
    packed = pack_step([_batch(), short], 16)
    assert [p.tokens.shape for p in packed] == [(1, 16), (1, 16)]
    assert packed[1].packed.cu_seqlens.tolist() == [0, 3, 4, 16]


def test_prepare_packs_and_stays_put_without_a_device():
    batches = [_batch(), _batch(PAIRS[1:])]
    ready = prepare(batches, 16)
    assert all(isinstance(b, MicroBatch) and b.packed is not None for b in ready)
    assert [b.tokens.shape for b in ready] == [(1, 16), (1, 16)]
    totals = host_totals(ready, lambda b: float(b.tokens.numel()))
    assert totals == {"num_tokens": 18.0, "forward_flops": 32.0}  # host lengths, real tokens
    plain = prepare(batches)
    assert [b.packed for b in plain] == [None, None] and plain[0].tokens.shape == (4, 8)
    if not torch.cuda.is_available():  # to(): the current CUDA device, else no copy at all
        assert plain[0].tokens is batches[0].tokens
    moved = pack_batch(batches[0], 16).to("cpu")
    assert moved.packed.segments == (4, 3, 6, 1, 2)


def test_flops_count_each_packed_sequence_not_the_padded_rows():
    batch = _batch()
    packed = pack_batch(batch, 16)
    padded = batch_forward_flops(TINY, batch)
    assert batch_forward_flops(TINY, packed) < padded * 16 / 32  # 16 positions, not 4 x 8
