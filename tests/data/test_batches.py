"""Micro-batches as the step consumes them: the typed batch, and a full pass in windows."""

import numpy as np
import torch
import pytest

from megasimpo.data.batches import MicroBatch, full_pass, full_pass_windows, make_batch
from megasimpo.data.indexed import Pair

pytestmark = pytest.mark.fast  # in `make test-fast`

PAIRS = [Pair(prompt_ids=[1 + i, 2], chosen_ids=[3, 4 + i], rejected_ids=[5]) for i in range(7)]


def test_make_batch_is_a_cpu_microbatch_with_host_lengths():
    ref = np.arange(14, dtype=np.float64).reshape(7, 2)
    batch = make_batch(PAIRS, [2, 5], 6, [1.0, 0.0], ref)
    assert isinstance(batch, MicroBatch) and batch.packed is None
    assert batch.tokens.shape == batch.labels.shape == batch.loss_mask.shape == (4, 6)
    assert batch.tokens.device.type == "cpu" and batch.tokens[0, :3].tolist() == [3, 2, 3]
    assert batch.lengths == (3, 3, 2, 2) and batch.num_tokens == 10 and batch.num_pairs == 2
    assert batch.weights.tolist() == [1.0, 0.0]
    assert batch.ref_logps.dtype == torch.float32 and batch.ref_logps.tolist() == [[4, 5], [10, 11]]
    assert make_batch(PAIRS, [0], 6).weights.tolist() == [1.0] and make_batch(PAIRS, [0], 6).ref_logps is None


def test_full_pass_windows_cover_every_pair_once_a_window_at_a_time():
    for dp_size in (1, 2, 3):
        seen = []
        for dp_rank in range(dp_size):
            idx, weights = full_pass(len(PAIRS), dp_rank, dp_size, 2)
            windows = full_pass_windows(PAIRS, dp_rank, dp_size, 2, 6, window=2)
            assert len(windows) == len(list(windows)) == -(-len(idx) // 4)
            flat_idx, flat_w = [], []
            for batches, chunks in windows:
                assert 1 <= len(batches) == len(chunks) <= 2
                for batch, (i, w) in zip(batches, chunks):
                    assert batch.weights.tolist() == w and len(i) == 2
                    assert torch.equal(batch.tokens, make_batch(PAIRS, i, 6).tokens)
                    flat_idx += i
                    flat_w += w
            assert (flat_idx, flat_w) == (idx, weights)  # the same pass, in the same order
            seen += [i for i, w in zip(flat_idx, flat_w) if w > 0]
        assert sorted(seen) == list(range(len(PAIRS)))
