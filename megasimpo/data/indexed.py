"""Preference pairs <-> Megatron-Core IndexedDataset (``PREFIX.bin`` / ``PREFIX.idx``).

Storage layout: one pair is one IndexedDataset *document* of exactly three *sequences*, in order:
prompt ids, chosen-response ids, rejected-response ids. The response ids are exactly the tokens the
loss covers; the prompt is everything before them (it may be empty). Tokens are stored with
``DType.optimal_dtype(vocab_size)`` (uint16 below 65500 ids, int32 above), so the files are plain
Megatron files that Megatron's own tools can read, merge and inspect.
"""

import operator
import os
import tempfile
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

import numpy as np
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

SEQUENCES_PER_PAIR = 3  # prompt, chosen, rejected
# Megatron's .idx magic (indexed_dataset._INDEX_HEADER); checked here because IndexedDataset only
# asserts on it, and a failed IndexedDataset.__init__ then raises again from its own __del__.
_IDX_HEADER = b"MMIDIDX\x00\x00"


@dataclass(frozen=True, eq=False)  # eq=False: dataclass equality on ndarrays is ambiguous
class Pair:
    """One preference pair. ``prompt_ids`` int64 [p] (p >= 0), ``chosen_ids`` int64 [c] (c >= 1),
    ``rejected_ids`` int64 [r] (r >= 1)."""

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray


def _as_ids(values, what: str, pair_number: int, vocab_size: int) -> np.ndarray:
    """Validate one id sequence of pair ``pair_number`` -> int64 [n]; ValueError on a bad value."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"pair {pair_number}: {what} must be a flat sequence, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)  # np.asarray([]) is float64: size 0 needs no dtype check
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"pair {pair_number}: {what} must be integer token ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        pos = int(bad[0])
        raise ValueError(
            f"pair {pair_number}: {what} token {int(arr[pos])} at position {pos} is outside "
            f"[0, {vocab_size})"
        )
    return arr


def _remove_quietly(path: str) -> None:
    """Delete ``path`` if it exists (cleanup must not mask the original error)."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync(path: str) -> None:
    """Flush ``path`` to disk so the rename that publishes it cannot expose a half-written file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PairWriter:
    """Context manager writing pairs to ``PREFIX.bin`` / ``PREFIX.idx``.

    Pairs go to temporary files next to the prefix; only a clean exit publishes them. Publication
    removes any old ``PREFIX.idx`` first, then renames the new ``.bin``, then the new ``.idx``, so at
    every instant either ``PREFIX.idx`` is absent or it describes the ``PREFIX.bin`` beside it: a
    crash never leaves a complete-looking mismatched pair of files. An exception inside the ``with``
    block removes the temporaries and leaves any previous ``PREFIX.*`` untouched.
    """

    def __init__(self, prefix: str, vocab_size: int):
        if vocab_size <= 0:
            raise ValueError(f"vocab_size={vocab_size} must be positive")
        self.prefix = prefix
        self.vocab_size = vocab_size
        self.dtype = DType.optimal_dtype(vocab_size)
        self._num_pairs = 0
        self._builder = None
        self._tmp_bin = self._tmp_idx = None

    @property
    def num_pairs(self) -> int:
        """Pairs added so far."""
        return self._num_pairs

    def __enter__(self) -> "PairWriter":
        parent = os.path.dirname(os.path.abspath(self.prefix))
        os.makedirs(parent, exist_ok=True)
        base = os.path.basename(self.prefix)
        # Unique names in the target directory: os.replace is only atomic within one filesystem.
        fd_bin, self._tmp_bin = tempfile.mkstemp(prefix=f".{base}.", suffix=".bin.tmp", dir=parent)
        fd_idx, self._tmp_idx = tempfile.mkstemp(prefix=f".{base}.", suffix=".idx.tmp", dir=parent)
        os.close(fd_bin)
        os.close(fd_idx)
        self._builder = IndexedDatasetBuilder(self._tmp_bin, dtype=self.dtype)
        return self

    def add(self, prompt_ids: Sequence[int], chosen_ids: Sequence[int],
            rejected_ids: Sequence[int]) -> None:
        """Append one pair. ValueError (naming the 0-based pair number) for an empty response,
        an id outside [0, vocab_size), or an empty prompt with a 1-token response (the first
        response token has no predecessor, so nothing would be left to score)."""
        if self._builder is None:
            raise RuntimeError("PairWriter.add called outside its `with` block")
        n = self._num_pairs
        prompt = _as_ids(prompt_ids, "prompt_ids", n, self.vocab_size)
        chosen = _as_ids(chosen_ids, "chosen_ids", n, self.vocab_size)
        rejected = _as_ids(rejected_ids, "rejected_ids", n, self.vocab_size)
        for what, resp in (("chosen_ids", chosen), ("rejected_ids", rejected)):
            if resp.size == 0:
                raise ValueError(f"pair {n}: {what} is empty; a response needs at least 1 token")
            if prompt.size == 0 and resp.size == 1:
                raise ValueError(
                    f"pair {n}: empty prompt and a 1-token {what}: no token of it can be scored"
                )
        self._builder.add_document(
            np.concatenate([prompt, chosen, rejected]), [prompt.size, chosen.size, rejected.size]
        )
        self._num_pairs += 1

    def __exit__(self, exc_type, exc_val, exc_tb):
        try:
            if exc_type is not None:
                return None  # the finally block discards the temporaries
            if self._num_pairs == 0:
                # Megatron cannot mmap an empty .bin: refuse rather than publish an unreadable set.
                raise ValueError(f"no pairs were written to {self.prefix!r}")
            self._builder.finalize(self._tmp_idx)
            _fsync(self._tmp_bin)
            _fsync(self._tmp_idx)
            _remove_quietly(get_idx_path(self.prefix))
            os.replace(self._tmp_bin, get_bin_path(self.prefix))
            os.replace(self._tmp_idx, get_idx_path(self.prefix))
        finally:
            if not self._builder.data_file.closed:
                self._builder.data_file.close()
            for tmp in (self._tmp_bin, self._tmp_idx):
                _remove_quietly(tmp)  # no-op after a successful os.replace
            self._builder = None
        return None


def write_pairs(prefix: str, pairs: Iterable[Union[tuple, Pair]], vocab_size: int) -> int:
    """Write ``pairs`` ((prompt, chosen, rejected) tuples or ``Pair``) to ``PREFIX.bin/.idx``
    atomically; returns the number written."""
    with PairWriter(prefix, vocab_size) as writer:
        for pair in pairs:
            if isinstance(pair, Pair):
                writer.add(pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)
            else:
                writer.add(*pair)
        return writer.num_pairs


class PairDataset:
    """Read-only, memory-mapped view of a pair dataset written by ``PairWriter``."""

    def __init__(self, prefix: str):
        if not IndexedDataset.exists(prefix):
            raise ValueError(
                f"pair dataset {prefix!r} not found: need {get_bin_path(prefix)} and "
                f"{get_idx_path(prefix)}"
            )
        with open(get_idx_path(prefix), "rb") as f:
            if f.read(len(_IDX_HEADER)) != _IDX_HEADER:
                raise ValueError(f"{get_idx_path(prefix)!r} is not a Megatron IndexedDataset index")
        try:
            self._ds = IndexedDataset(prefix, multimodal=False, mmap=True)
        except (AssertionError, ValueError, OSError) as err:  # Megatron asserts on a bad header
            raise ValueError(f"{prefix!r} is not a readable IndexedDataset: {err}") from err
        self.prefix = prefix
        seq_lengths = self._ds.sequence_lengths
        docs = self._ds.document_indices
        num_pairs = len(docs) - 1
        expected = np.arange(0, SEQUENCES_PER_PAIR * num_pairs + 1, SEQUENCES_PER_PAIR)
        if len(seq_lengths) != SEQUENCES_PER_PAIR * num_pairs or not np.array_equal(docs, expected):
            raise ValueError(
                f"{prefix!r} is not a megasimpo pair dataset: expected {SEQUENCES_PER_PAIR} "
                f"sequences per document, got {len(seq_lengths)} sequences in {num_pairs} documents"
            )
        # A .bin from another write (e.g. copied by hand) would silently decode garbage.
        itemsize = DType.size(self._ds.index.dtype)
        expected_bytes = int(seq_lengths.astype(np.int64).sum()) * itemsize
        actual_bytes = os.path.getsize(get_bin_path(prefix))
        if actual_bytes != expected_bytes:
            raise ValueError(
                f"{prefix!r}: {get_bin_path(prefix)} has {actual_bytes} bytes but the index "
                f"describes {expected_bytes}; the .bin and .idx do not belong together"
            )
        self._num_pairs = num_pairs

    def __len__(self) -> int:
        """Number of pairs."""
        return self._num_pairs

    def __getitem__(self, i: int) -> Pair:
        """Pair ``i`` (negative counts from the end) as int64 copies, independent of the mmap."""
        i = operator.index(i)
        if i < 0:
            i += self._num_pairs
        if not 0 <= i < self._num_pairs:
            raise IndexError(f"pair index {i} out of range for {self._num_pairs} pairs")
        start = SEQUENCES_PER_PAIR * i
        prompt, chosen, rejected = self._ds[start:start + SEQUENCES_PER_PAIR]  # one contiguous read
        return Pair(prompt.astype(np.int64), chosen.astype(np.int64), rejected.astype(np.int64))

    def lengths(self) -> np.ndarray:
        """int64 [n, 3]: prompt, chosen and rejected lengths of every pair (from the index alone)."""
        return self._ds.sequence_lengths.astype(np.int64).reshape(self._num_pairs, SEQUENCES_PER_PAIR)
