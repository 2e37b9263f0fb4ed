"""Packing padded micro-batches into one row: layout, segments, padding tail (pure tensors)."""

import pytest
import torch

from megasimpo.data.indexed import Pair
from megasimpo.data.loader import collate_pairs
from megasimpo.data.packing import pack_batch, pack_step
from megasimpo.metrics import batch_forward_flops
from fixtures import TINY

PAIRS = [Pair(prompt_ids=[5, 6, 7], chosen_ids=[8, 9], rejected_ids=[10, 11, 12, 13]),
         Pair(prompt_ids=[14], chosen_ids=[15, 16, 17], rejected_ids=[18])]


def _batch():
    return collate_pairs(PAIRS, 8, 0)


def test_rows_are_concatenated_with_their_own_positions():
    batch = _batch()
    assert batch["lengths"].tolist() == [4, 3, 6, 1]  # chosen rows, then rejected rows
    packed = pack_batch(dict(batch, weights=torch.ones(2)), 16)
    assert packed["tokens"].tolist() == [[5, 6, 7, 8, 14, 15, 16, 5, 6, 7, 10, 11, 12, 14] + [0, 0]]
    assert packed["labels"].tolist() == [[6, 7, 8, 9, 15, 16, 17, 6, 7, 10, 11, 12, 13, 18] + [0, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 0, 1]]
    assert packed["segment_ids"].tolist() == [[0] * 4 + [1] * 3 + [2] * 6 + [3] + [4, 4]]
    assert packed["cu_seqlens"].tolist() == [0, 4, 7, 13, 14, 16]
    assert packed["cu_seqlens"].dtype == torch.int32 and packed["max_seqlen"] == 6
    # The loss mask is the padded rows' mask, row by row; the tail is never scored.
    mask = torch.cat([batch["loss_mask"][i, :n] for i, n in enumerate([4, 3, 6, 1])])
    assert packed["loss_mask"][0, :14].tolist() == mask.tolist()
    assert packed["loss_mask"][0, 14:].tolist() == [0.0, 0.0]
    assert torch.equal(packed["weights"], torch.ones(2))  # other entries pass through


def test_exact_fit_has_no_tail_and_short_length_is_refused():
    packed = pack_batch(_batch(), 14)
    assert packed["cu_seqlens"].tolist() == [0, 4, 7, 13, 14]
    assert packed["segment_ids"].max().item() == 3
    with pytest.raises(ValueError, match="13 < the micro-batch's 14"):
        pack_batch(_batch(), 13)


def test_a_step_shares_one_rounded_length():
    short = collate_pairs(PAIRS[1:], 8, 0)  # 3 + 1 = 4 positions
    packed = pack_step([_batch(), short], 16)
    assert [p["tokens"].shape for p in packed] == [(1, 16), (1, 16)]
    assert packed[1]["cu_seqlens"].tolist() == [0, 3, 4, 16]


def test_flops_count_each_packed_sequence_not_the_padded_rows():
    batch = _batch()
    packed = pack_batch(batch, 16)
    padded = batch_forward_flops(TINY, batch)
    assert batch_forward_flops(TINY, packed) < padded * 16 / 32  # 16 positions, not 4 x 8
