"""Preference pairs <-> Megatron-Core IndexedDataset (``PREFIX.bin`` / ``PREFIX.idx``).

Storage layout: one pair is one IndexedDataset *document* of exactly three *sequences*, in order:
prompt ids, chosen-response ids, rejected-response ids. The response ids are exactly the tokens the
loss covers; the prompt is everything before them (it may be empty). Tokens are stored with
``DType.optimal_dtype(vocab_size)`` (uint16 below 65500 ids, int32 above), so the files are plain
Megatron files that Megatron's own tools can read, merge and inspect. The ``.idx`` ends with a
megasimpo trailer (``megasimpo.data.fingerprint``) that Megatron ignores: a content fingerprint that
ties it to its ``.bin``, the largest token id and the writer's vocabulary size. Files without
one (written by Megatron's tools, merged with ``add_index``, or by an older megasimpo) are stamped
once::

    python -m megasimpo.data.stamp PREFIX [--vocab-size N]
"""

import json
import operator
import os
import tempfile
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from megasimpo.atomic import file_mode
from megasimpo.data.fingerprint import (
    compute_fingerprint, encode_trailer, read_index, read_trailer)

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


def remove_quietly(path: str) -> None:
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

    Pairs go to temporary files next to the prefix; only a clean exit publishes them, with the
    trailer appended to the ``.idx`` and mode 0o666 & ~umask. Publication removes any old
    ``PREFIX.idx`` first, then renames the new ``.bin``, then the new ``.idx``, so at every instant
    either ``PREFIX.idx`` is absent or it describes the ``PREFIX.bin`` beside it: a crash never
    leaves a complete-looking mismatched pair of files. An exception inside the ``with`` block
    removes the temporaries and leaves any previous ``PREFIX.*`` untouched.
    """

    def __init__(self, prefix: str, vocab_size: int):
        if vocab_size <= 0:
            raise ValueError(f"vocab_size={vocab_size} must be positive")
        self.prefix = prefix
        self.vocab_size = vocab_size
        self.dtype = DType.optimal_dtype(vocab_size)
        self.max_token_id = -1  # over every prompt, chosen and rejected id added
        self.fingerprint: Optional[str] = None  # set by seal()
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
        self._mode = file_mode()
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
        if self._builder is None or self.fingerprint is not None:
            raise RuntimeError("PairWriter.add called outside its `with` block or after seal()")
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
        ids = np.concatenate([prompt, chosen, rejected])
        self._builder.add_document(ids, [prompt.size, chosen.size, rejected.size])
        self.max_token_id = max(self.max_token_id, int(ids.max()))
        self._num_pairs += 1

    def seal(self, tokenizer_identity: Optional[str] = None) -> str:
        """Complete the temporary files (index and trailer, with ``tokenizer_identity`` when
        given) without publishing them and return the fingerprint; no ``add`` after it. Called by
        a clean exit when not called before."""
        if self._builder is None:
            raise RuntimeError("PairWriter.seal called outside its `with` block")
        if self.fingerprint is None:
            if self._num_pairs == 0:
                # Megatron cannot mmap an empty .bin: refuse rather than publish an unreadable set.
                raise ValueError(f"no pairs were written to {self.prefix!r}")
            self._builder.finalize(self._tmp_idx)
            fingerprint = compute_fingerprint(read_index(self._tmp_idx), self._tmp_bin)
            with open(self._tmp_idx, "ab") as f:
                f.write(encode_trailer(fingerprint, self.max_token_id, self.vocab_size,
                                       self._num_pairs, tokenizer_identity))
            self.fingerprint = fingerprint
        return self.fingerprint

    def __exit__(self, exc_type, exc_val, exc_tb):
        try:
            if exc_type is not None:
                return None  # the finally block discards the temporaries
            self.seal()
            for tmp in (self._tmp_bin, self._tmp_idx):
                _fsync(tmp)
                os.chmod(tmp, self._mode)
            remove_quietly(get_idx_path(self.prefix))
            os.replace(self._tmp_bin, get_bin_path(self.prefix))
            os.replace(self._tmp_idx, get_idx_path(self.prefix))
        finally:
            if not self._builder.data_file.closed:
                self._builder.data_file.close()
            for tmp in (self._tmp_bin, self._tmp_idx):
                remove_quietly(tmp)  # no-op after a successful os.replace
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


def open_megatron(prefix: str):
    """(IndexedDataset, number of pairs) of ``prefix``, checked to be a pair dataset whose .bin
    has the size its .idx describes; ValueError otherwise. The trailer is not looked at."""
    if not IndexedDataset.exists(prefix):
        raise ValueError(
            f"pair dataset {prefix!r} not found: need {get_bin_path(prefix)} and "
            f"{get_idx_path(prefix)}"
        )
    with open(get_idx_path(prefix), "rb") as f:
        if f.read(len(_IDX_HEADER)) != _IDX_HEADER:
            raise ValueError(f"{get_idx_path(prefix)!r} is not a Megatron IndexedDataset index")
    try:
        ds = IndexedDataset(prefix, multimodal=False, mmap=True)
    except (AssertionError, ValueError, OSError) as err:  # Megatron asserts on a bad header
        raise ValueError(f"{prefix!r} is not a readable IndexedDataset: {err}") from err
    seq_lengths = ds.sequence_lengths
    docs = ds.document_indices
    num_pairs = len(docs) - 1
    expected = np.arange(0, SEQUENCES_PER_PAIR * num_pairs + 1, SEQUENCES_PER_PAIR)
    if len(seq_lengths) != SEQUENCES_PER_PAIR * num_pairs or not np.array_equal(docs, expected):
        raise ValueError(
            f"{prefix!r} is not a megasimpo pair dataset: expected {SEQUENCES_PER_PAIR} "
            f"sequences per document, got {len(seq_lengths)} sequences in {num_pairs} documents"
        )
    # A .bin from another write (e.g. copied by hand) would silently decode garbage.
    itemsize = DType.size(ds.index.dtype)
    expected_bytes = int(seq_lengths.astype(np.int64).sum()) * itemsize
    actual_bytes = os.path.getsize(get_bin_path(prefix))
    if actual_bytes != expected_bytes:
        raise ValueError(
            f"{prefix!r}: {get_bin_path(prefix)} has {actual_bytes} bytes but the index "
            f"describes {expected_bytes}; the .bin and .idx do not belong together"
        )
    return ds, num_pairs


def _check_summary(prefix: str, fingerprint: str) -> None:
    """ValueError when ``PREFIX.summary.json`` exists and names another fingerprint. A summary
    without one (older megasimpo) has nothing to compare and is not checked."""
    path = f"{prefix}.summary.json"
    if not os.path.exists(path):
        return
    try:
        with open(path, "rb") as f:
            summary = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable summary ({err}); move it away or re-run "
                         "tools/preprocess_data.py") from None
    got = summary.get("fingerprint") if isinstance(summary, dict) else None
    if got is not None and got != fingerprint:
        raise ValueError(
            f"{path} has fingerprint {got} but {get_idx_path(prefix)} has {fingerprint}: the "
            "summary describes another write of this prefix; re-run tools/preprocess_data.py")


class PairDataset:
    """Read-only, memory-mapped view of a pair dataset written by ``PairWriter`` (or stamped).

    ``fingerprint``, ``max_token_id`` (-1 for no tokens), ``vocab_size`` (the writer's; None
    for a file stamped without ``--vocab-size``) and ``tokenizer_identity`` (None where not
    recorded) come from the ``.idx`` trailer, whose fingerprint is recomputed on open and must
    match."""

    def __init__(self, prefix: str):
        self._ds, num_pairs = open_megatron(prefix)
        self.prefix = prefix
        idx, bin_path = get_idx_path(prefix), get_bin_path(prefix)
        index = read_index(idx)
        trailer = read_trailer(idx, index)
        if trailer is None:
            raise ValueError(
                f"{idx!r} has no megasimpo trailer (fingerprint and token range): it was written "
                "by Megatron's tools, merged with add_index or by an older megasimpo; stamp it "
                f"once with `python -m megasimpo.data.stamp {prefix} --vocab-size N` "
                "(N: the tokenizer's vocabulary size) or re-run tools/preprocess_data.py")
        if trailer.get("num_pairs") != num_pairs:
            raise ValueError(
                f"{idx!r}: its trailer counts {trailer.get('num_pairs')} pairs but the index "
                f"holds {num_pairs}; the file was edited after it was written; re-run "
                "tools/preprocess_data.py (or stamp the Megatron index again)")
        fingerprint = compute_fingerprint(index, bin_path)
        if trailer.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{idx!r} and {bin_path!r} come from different writes (fingerprint "
                f"{trailer.get('fingerprint')} in the .idx, {fingerprint} computed from both): "
                "the prompt/response split would be wrong; re-run tools/preprocess_data.py")
        _check_summary(prefix, fingerprint)
        self.fingerprint: str = fingerprint
        self.max_token_id: int = int(trailer["max_token_id"])
        self.vocab_size: Optional[int] = trailer.get("vocab_size")
        # None: written before identities, stamped, or only pre-tokenized records.
        self.tokenizer_identity: Optional[str] = trailer.get("tokenizer")
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


def dataset_parts(datasets) -> List[PairDataset]:
    """The ``PairDataset``s of ``datasets``: prefixes, ``PairDataset``s or ``ConcatPairs``, one or
    a list."""
    if isinstance(datasets, (str, os.PathLike, PairDataset)) or hasattr(datasets, "parts"):
        datasets = [datasets]
    out = []
    for item in datasets:
        out += item.parts if hasattr(item, "parts") else [
            item if isinstance(item, PairDataset) else PairDataset(os.fspath(item))]
    return out


def check_token_range(datasets, vocab_size: int, what: str) -> None:
    """ValueError when a token id of ``datasets`` (prefixes, ``PairDataset``s or ``ConcatPairs``;
    one or a list) is outside the model's vocabulary [0, ``vocab_size``); ``what`` names the model
    (e.g. the checkpoint path). Pass the model's real vocabulary size, not the padded one."""
    for ds in dataset_parts(datasets):
        if ds.max_token_id >= vocab_size:
            raise ValueError(
                f"{ds.prefix}: token id {ds.max_token_id} >= the model's vocabulary size "
                f"{vocab_size} ({what}): this dataset was tokenized for another model; re-run "
                "tools/preprocess_data.py with the checkpoint's tokenizer")
