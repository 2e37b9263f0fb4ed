"""Sampler determinism / DP sharding / resume and collate layout against hand-built tensors."""

import numpy as np
import pytest
import torch

from megasimpo.data.indexed import Pair, PairDataset, write_pairs
from megasimpo.data.loader import (
    BatchLayout,
    PairSampler,
    collate_pairs,
    count_truncated,
    default_seq_length,
    pad_to_multiple,
)

pytestmark = pytest.mark.fast  # in `make test-fast`


def _sampler(num_pairs, dp_rank, dp_size, mbs=2, nmb=3, seed=1234):
    layout = BatchLayout(micro_batch_size=mbs, num_microbatches=nmb, dp_rank=dp_rank, dp_size=dp_size)
    return PairSampler(num_pairs, layout, seed)


def _rank_step(sampler, step):
    return np.concatenate(sampler.step_indices(step))


def test_layout_and_micro_batch_shapes():
    s = _sampler(24, 1, 2)
    assert s.layout.global_batch_size == 12 and s.steps_per_epoch == 2 and s.dropped_per_epoch == 0
    mbs = s.step_indices(0)
    assert len(mbs) == 3 and all(m.shape == (2,) and m.dtype == np.int64 for m in mbs)


def test_matches_reference_permutation():
    # Independent statement of the contract: epoch e = default_rng([seed, e]).permutation(n).
    n, seed = 30, 7
    s = _sampler(n, 1, 2, mbs=2, nmb=2, seed=seed)  # global batch 8, 3 steps, 6 dropped
    assert s.steps_per_epoch == 3 and s.dropped_per_epoch == 6
    for step in range(7):
        epoch, k = divmod(step, 3)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        mine = perm[8 * k + 4: 8 * k + 8]  # rank 1's half of the global slice
        got = s.step_indices(step)
        assert [m.tolist() for m in got] == [mine[:2].tolist(), mine[2:].tolist()]


def test_dp2_covers_each_pair_once_per_epoch_and_epochs_differ():
    n = 24
    ranks = [_sampler(n, d, 2) for d in range(2)]
    epochs = []
    for epoch in range(3):
        order = np.concatenate([_rank_step(r, epoch * 2 + k) for k in range(2) for r in ranks])
        assert sorted(order.tolist()) == list(range(n))
        epochs.append(order.tolist())
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_dropped_tail_and_too_small_dataset():
    s = _sampler(25, 0, 2)
    assert s.steps_per_epoch == 2 and s.dropped_per_epoch == 1
    seen = np.concatenate([_rank_step(_sampler(25, d, 2), k) for k in range(2) for d in range(2)])
    assert len(set(seen.tolist())) == 24
    with pytest.raises(ValueError, match="11 pairs cannot fill one global batch of 12"):
        _sampler(11, 0, 2)
    with pytest.raises(ValueError, match="dp_rank=2"):
        BatchLayout(micro_batch_size=1, num_microbatches=1, dp_rank=2, dp_size=2)


def test_same_seed_same_order_and_independent_of_dp_size():
    n = 48
    single = _sampler(n, 0, 1, mbs=2, nmb=6)  # global batch 12 on one rank
    again = _sampler(n, 0, 1, mbs=2, nmb=6)
    other_seed = _sampler(n, 0, 1, mbs=2, nmb=6, seed=99)
    dp2 = [_sampler(n, d, 2, mbs=2, nmb=3) for d in range(2)]  # global batch 12 on two ranks
    dp4 = [_sampler(n, d, 4, mbs=1, nmb=3) for d in range(4)]
    differs = False
    for step in range(9):
        ref = _rank_step(single, step)
        assert ref.tolist() == _rank_step(again, step).tolist()
        differs |= ref.tolist() != _rank_step(other_seed, step).tolist()
        assert np.concatenate([_rank_step(r, step) for r in dp2]).tolist() == ref.tolist()
        assert np.concatenate([_rank_step(r, step) for r in dp4]).tolist() == ref.tolist()
    assert differs


def test_resume_from_step_k_equals_continuing():
    k = 5
    continuing = _sampler(36, 1, 2)
    run = [[m.tolist() for m in continuing.step_indices(s)] for s in range(12)]
    resumed = _sampler(36, 1, 2)  # fresh object, as after a restart
    assert [[m.tolist() for m in resumed.step_indices(s)] for s in range(k, 12)] == run[k:]


def _pair(p, c, r):
    return Pair(np.array(p, dtype=np.int64), np.array(c, dtype=np.int64), np.array(r, dtype=np.int64))


def test_collate_hand_built():
    P = 99  # pad id, distinct from every token so padding is visible
    pairs = [
        _pair([5, 6], [7, 8, 9], [10]),
        # Too long at s=6: prompt cut from the left to 4 tokens (for the 3-token rejected),
        # the same 4 tokens for both rows.
        _pair([1, 2, 3, 4, 5, 6], [20, 21], [30, 31, 32]),
    ]
    out = collate_pairs(pairs, seq_length=6, pad_id=P)
    tokens = torch.tensor([
        [5, 6, 7, 8, P, P],       # pair 0 chosen:   5 6 | 7 8 9
        [3, 4, 5, 6, 20, P],      # pair 1 chosen:   3 4 5 6 | 20 21
        [5, 6, P, P, P, P],       # pair 0 rejected: 5 6 | 10
        [3, 4, 5, 6, 30, 31],     # pair 1 rejected: 3 4 5 6 | 30 31 32
    ])
    labels = torch.tensor([
        [6, 7, 8, 9, P, P],
        [4, 5, 6, 20, 21, P],
        [6, 10, P, P, P, P],
        [4, 5, 6, 30, 31, 32],
    ])
    mask = torch.tensor([
        [0, 1, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 1],
    ], dtype=torch.float32)
    assert out["tokens"].dtype == torch.int64 and out["labels"].dtype == torch.int64
    assert out["loss_mask"].dtype == torch.float32 and out["position_ids"].dtype == torch.int64
    assert torch.equal(out["tokens"], tokens)
    assert torch.equal(out["labels"], labels)
    assert torch.equal(out["loss_mask"], mask)
    assert torch.equal(out["position_ids"], torch.arange(6).repeat(4, 1))
    # Labels are the inputs shifted by one wherever both are real tokens.
    real = out["tokens"][:, 1:] != P
    assert torch.equal(out["labels"][:, :-1][real], out["tokens"][:, 1:][real])


def test_collate_empty_prompt_scores_from_second_token():
    out = collate_pairs([_pair([], [7, 8, 9], [4, 5])], seq_length=4, pad_id=0)
    assert torch.equal(out["tokens"], torch.tensor([[7, 8, 0, 0], [4, 0, 0, 0]]))
    assert torch.equal(out["labels"], torch.tensor([[8, 9, 0, 0], [5, 0, 0, 0]]))
    assert torch.equal(out["loss_mask"], torch.tensor([[1.0, 1, 0, 0], [1, 0, 0, 0]]))
    # With no prompt, s + 1 response tokens fit exactly (s inputs); s + 2 do not.
    out = collate_pairs([_pair([], [1, 2, 3, 4, 5], [6, 7])], seq_length=4, pad_id=0)
    assert out["loss_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    with pytest.raises(ValueError, match="response of 6 tokens does not fit seq_length=4"):
        collate_pairs([_pair([], [1, 2, 3, 4, 5, 6], [6, 7])], seq_length=4, pad_id=0)
    with pytest.raises(ValueError, match="1-token response leave nothing to score"):
        collate_pairs([_pair([], [1, 2], [3])], seq_length=4, pad_id=0)


def test_collate_exact_fit_and_response_too_long():
    # Response of exactly s tokens fits with one prompt token kept.
    out = collate_pairs([_pair([1, 2, 3], [4, 5, 6], [7])], seq_length=3, pad_id=0)
    assert out["tokens"].tolist() == [[3, 4, 5], [3, 0, 0]]
    assert out["loss_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="response of 7 tokens does not fit seq_length=6"):
        collate_pairs([_pair([1], [1, 2, 3, 4, 5, 6, 7], [2])], seq_length=6, pad_id=0)


def test_pad_to_multiple():
    assert [pad_to_multiple(n, 8) for n in (0, 1, 8, 9, 16)] == [0, 8, 8, 16, 16]
    with pytest.raises(ValueError, match="multiple=0"):
        pad_to_multiple(3, 0)


def test_default_seq_length_and_count_truncated(tmp_path):
    prefix = str(tmp_path / "d")
    # Untruncated input lengths (p + max(c, r) - 1): 4, 12, 2, 21.
    write_pairs(prefix, [
        ([1, 2], [3, 4, 5], [6]),
        ([1] * 10, [2, 3], [4, 5, 6]),
        ([], [1, 2, 3], [4, 5]),
        ([1] * 20, [2], [3, 4]),
    ], vocab_size=10)
    ds = PairDataset(prefix)
    assert default_seq_length(ds, multiple=8, cap=4096) == 24
    assert default_seq_length(ds, multiple=1, cap=4096) == 21
    assert default_seq_length(ds, multiple=8, cap=20) == 16  # cap rounded down to the multiple
    assert count_truncated(ds, 21) == 0
    assert count_truncated(ds, 12) == 1
    assert count_truncated(ds, 4) == 2
    with pytest.raises(ValueError, match="first is pair 0 with a response of 3 tokens"):
        count_truncated(ds, 2)


def test_one_truncation_rule(tmp_path):
    """Preprocessing (``truncate_prompt``, full-sequence tokens), collation and the start-up
    count (``seq_length`` inputs = tokens - 1) keep the same prompt tokens: one rule,
    ``tokenize.kept_prompt_length``, elementwise the same as per pair."""
    from megasimpo.data.tokenize import kept_prompt_length, truncate_prompt

    seq_length = 6
    cases = [(p, c, r) for p in range(0, 9) for c in range(1, 9) for r in (1, 2, 5)]
    fits, kept_by = [], []
    for p, c, r in cases:
        prompt, chosen, rejected = list(range(1, p + 1)), [7] * c, [8] * r
        kept = truncate_prompt(prompt, chosen, rejected, seq_length + 1)
        scalar = int(kept_prompt_length(p, max(c, r), seq_length + 1))
        assert scalar == (-1 if kept is None else len(kept))
        if kept is None:
            with pytest.raises(ValueError, match="does not fit seq_length=6"):
                collate_pairs([_pair(prompt, chosen, rejected)], seq_length, pad_id=0)
            continue
        if p == 0 and min(c, r) < 2:
            continue  # unscorable (preprocessing skips it), not a truncation case
        out = collate_pairs([_pair(prompt, chosen, rejected)], seq_length, pad_id=0)
        for row, response in ((0, chosen), (1, rejected)):  # each row: kept prompt + response
            n = len(kept) + len(response) - 1
            assert out["tokens"][row, :n].tolist() == (kept + response)[:-1]
        fits.append((prompt, chosen, rejected))
        kept_by.append(len(kept))
    lengths = np.array([[len(a), len(b), len(c)] for a, b, c in fits])
    longest = np.maximum(lengths[:, 1], lengths[:, 2])
    assert kept_prompt_length(lengths[:, 0], longest, seq_length + 1).tolist() == kept_by
    prefix = str(tmp_path / "d")
    write_pairs(prefix, fits, vocab_size=10)
    assert count_truncated(PairDataset(prefix), seq_length) == sum(
        k < len(f[0]) for k, f in zip(kept_by, fits))
