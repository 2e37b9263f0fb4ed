"""Pairs <-> IndexedDataset round trip, validation and atomic publication (no process group)."""

import os

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from megasimpo.data.indexed import Pair, PairDataset, PairWriter, write_pairs

pytestmark = pytest.mark.fast  # in `make test-fast`


def _random_pairs(rng, num, vocab_size):
    """Pairs of varied lengths, including empty prompts and 2-token responses."""
    pairs = []
    for i in range(num):
        p = 0 if i % 5 == 0 else int(rng.integers(1, 40))
        c, r = int(rng.integers(2, 30)), int(rng.integers(2, 30))
        pairs.append(tuple(rng.integers(0, vocab_size, n).tolist() for n in (p, c, r)))
    return pairs


@pytest.mark.parametrize("vocab_size, stored", [(1000, np.uint16), (128256, np.int32)])
def test_round_trip(tmp_path, vocab_size, stored):
    rng = np.random.default_rng(0)
    pairs = _random_pairs(rng, 23, vocab_size)
    pairs[1] = ([vocab_size - 1, 0], [vocab_size - 1], [0, 5])  # the extreme ids survive storage
    prefix = str(tmp_path / "sub" / "dir" / "pairs")  # parent directories are created
    assert write_pairs(prefix, pairs, vocab_size) == 23
    assert IndexedDataset(prefix).index.dtype == stored

    ds = PairDataset(prefix)
    assert len(ds) == 23
    for i, (p, c, r) in enumerate(pairs):
        got = ds[i]
        assert isinstance(got, Pair)
        for arr, want in ((got.prompt_ids, p), (got.chosen_ids, c), (got.rejected_ids, r)):
            assert arr.dtype == np.int64
            assert arr.tolist() == list(want)
    assert ds[-1].chosen_ids.tolist() == list(pairs[-1][1])
    with pytest.raises(IndexError):
        ds[23]

    expected = np.array([[len(p), len(c), len(r)] for p, c, r in pairs], dtype=np.int64)
    lengths = ds.lengths()
    assert lengths.dtype == np.int64 and lengths.shape == (23, 3)
    np.testing.assert_array_equal(lengths, expected)
    per_item = np.array([[len(ds[i].prompt_ids), len(ds[i].chosen_ids), len(ds[i].rejected_ids)]
                         for i in range(len(ds))])
    np.testing.assert_array_equal(lengths, per_item)


def test_writer_accepts_pair_objects_and_counts(tmp_path):
    prefix = str(tmp_path / "p")
    with PairWriter(prefix, vocab_size=50) as w:
        assert w.num_pairs == 0
        w.add(np.array([1, 2]), np.array([3]), np.array([4, 5]))
        w.add([], [7, 8], [9, 10, 11])
        assert w.num_pairs == 2
    assert write_pairs(prefix, [Pair(np.array([1]), np.array([2]), np.array([3]))], 50) == 1
    ds = PairDataset(prefix)
    assert len(ds) == 1 and ds[0].rejected_ids.tolist() == [3]


@pytest.mark.parametrize("bad, message", [
    (([1], [2], [50]), r"pair 2: rejected_ids token 50 at position 0 is outside \[0, 50\)"),
    (([1], [-1, 2], [3]), r"pair 2: chosen_ids token -1 at position 0"),
    (([1, 99], [2], [3]), r"pair 2: prompt_ids token 99 at position 1"),
    (([1], [], [3]), r"pair 2: chosen_ids is empty"),
    (([1], [2], []), r"pair 2: rejected_ids is empty"),
    (([], [2], [3, 4]), r"pair 2: empty prompt and a 1-token chosen_ids"),
    (([1.5], [2], [3]), r"pair 2: prompt_ids must be integer"),
])
def test_bad_pairs_name_the_pair(tmp_path, bad, message):
    prefix = str(tmp_path / "bad")
    good = ([1, 2], [3], [4])
    with pytest.raises(ValueError, match=message):
        write_pairs(prefix, [good, good, bad], vocab_size=50)
    # The failed write published nothing.
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    assert os.listdir(tmp_path) == []  # no temporaries left behind


def test_exception_in_block_leaves_previous_dataset(tmp_path):
    prefix = str(tmp_path / "data")
    with pytest.raises(RuntimeError, match="boom"):
        with PairWriter(prefix, vocab_size=100) as w:
            w.add([1], [2], [3])
            raise RuntimeError("boom")
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    assert os.listdir(tmp_path) == []

    write_pairs(prefix, [([1, 2], [3, 4], [5])], vocab_size=100)
    before = {ext: open(prefix + ext, "rb").read() for ext in (".bin", ".idx")}
    with pytest.raises(RuntimeError, match="boom"):
        with PairWriter(prefix, vocab_size=100) as w:
            w.add([9, 9, 9], [9], [9])
            raise RuntimeError("boom")
    assert {ext: open(prefix + ext, "rb").read() for ext in (".bin", ".idx")} == before
    assert sorted(os.listdir(tmp_path)) == ["data.bin", "data.idx"]
    ds = PairDataset(prefix)
    assert len(ds) == 1 and ds[0].prompt_ids.tolist() == [1, 2]


def test_empty_writer_is_rejected(tmp_path):
    prefix = str(tmp_path / "empty")
    with pytest.raises(ValueError, match="no pairs"):
        write_pairs(prefix, [], vocab_size=10)
    assert os.listdir(tmp_path) == []


def test_missing_prefix(tmp_path):
    prefix = str(tmp_path / "nothing_here")
    with pytest.raises(ValueError, match="nothing_here"):
        PairDataset(prefix)


def test_plain_indexed_dataset_rejected(tmp_path):
    # A Megatron pretraining-style dataset: one sequence per document.
    prefix = str(tmp_path / "plain")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(100))
    for n in (3, 4, 5):
        builder.add_item(torch.arange(n))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    with pytest.raises(ValueError, match="not a megasimpo pair dataset"):
        PairDataset(prefix)


def test_garbage_idx_rejected(tmp_path):
    prefix = str(tmp_path / "junk")
    for ext in (".bin", ".idx"):
        with open(prefix + ext, "wb") as f:
            f.write(b"not an index at all, just bytes")
    with pytest.raises(ValueError, match="junk"):
        PairDataset(prefix)


def test_mismatched_bin_rejected(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_pairs(a, [([1, 2], [3], [4])], vocab_size=10)
    write_pairs(b, [([1, 2, 3, 4], [3, 5], [4])], vocab_size=10)
    os.replace(b + ".bin", a + ".bin")
    with pytest.raises(ValueError, match="do not belong together"):
        PairDataset(a)
