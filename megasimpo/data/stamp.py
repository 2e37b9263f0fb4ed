"""Stamp a pair dataset that has no megasimpo trailer (written by Megatron's tools, merged with
``IndexedDatasetBuilder.add_index`` or by an older megasimpo) so ``PairDataset`` opens it.

    python -m megasimpo.data.stamp PREFIX [--vocab-size N]

Reads ``PREFIX.bin`` once for the largest token id and appends the trailer
(``megasimpo.data.fingerprint``) to ``PREFIX.idx``, replaced atomically. Stamping says "this .idx
and this .bin belong together": only stamp files you know were written together.
"""

import argparse
import os
import sys
import tempfile
from typing import Optional

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path

from megasimpo.data.fingerprint import (
    compute_fingerprint, encode_trailer, read_index, read_trailer)
from megasimpo.data.indexed import open_megatron, remove_quietly


def _max_token_id(ds: IndexedDataset, bin_path: str) -> int:
    """Largest token id in ``bin_path`` (-1 when empty), read once in bounded chunks."""
    if os.path.getsize(bin_path) == 0:
        return -1
    tokens = np.memmap(bin_path, dtype=ds.index.dtype, mode="r")
    chunk = 1 << 24
    return max(int(tokens[k:k + chunk].max()) for k in range(0, len(tokens), chunk))


def stamp(prefix: str, vocab_size: Optional[int] = None) -> dict:
    """Append the megasimpo trailer to ``PREFIX.idx`` of a pair dataset that has none (Megatron's
    tools, ``add_index`` merges, older megasimpo), reading ``PREFIX.bin`` once for the largest
    token id; returns the trailer. The ``.idx`` is replaced atomically (temporary file + rename),
    keeping its mode. ValueError when it already has a trailer or an id is >= ``vocab_size``."""
    ds, num_pairs = open_megatron(prefix)
    idx, bin_path = get_idx_path(prefix), get_bin_path(prefix)
    index = read_index(idx)
    existing = read_trailer(idx, index)
    if existing is not None:
        raise ValueError(f"{idx!r} is already stamped (fingerprint {existing['fingerprint']}); "
                         "nothing to do")
    if vocab_size is not None and vocab_size <= 0:
        raise ValueError(f"--vocab-size {vocab_size} must be positive")
    max_id = _max_token_id(ds, bin_path)
    del ds  # closes its memory maps before the index is replaced
    if vocab_size is not None and max_id >= vocab_size:
        raise ValueError(f"{bin_path}: token id {max_id} >= --vocab-size {vocab_size}; pass the "
                         "vocabulary size of the tokenizer the data was written with")
    fingerprint = compute_fingerprint(index, bin_path)
    trailer = encode_trailer(fingerprint, max_id, vocab_size, num_pairs)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(idx)}.", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(idx)))
    try:
        with os.fdopen(fd, "wb") as out, open(idx, "rb") as src:
            out.write(src.read(index.end))
            out.write(trailer)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, os.stat(idx).st_mode & 0o777)
        os.replace(tmp, idx)
    finally:
        remove_quietly(tmp)  # no-op after a successful os.replace
    return read_trailer(idx, read_index(idx))


def main(argv=None) -> int:
    """``python -m megasimpo.data.stamp PREFIX [--vocab-size N]``; returns the exit
    status (2 with a one-line error on bad input)."""
    parser = argparse.ArgumentParser(prog="python -m megasimpo.data.stamp",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("prefix", help="dataset prefix (PREFIX.bin / PREFIX.idx)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="vocabulary size of the tokenizer the data was written with")
    args = parser.parse_args(argv)
    try:
        trailer = stamp(args.prefix, args.vocab_size)
    except ValueError as err:
        print(f"stamp: error: {err}", file=sys.stderr)
        return 2
    print(f"stamped {get_idx_path(args.prefix)}: {trailer['num_pairs']} pairs, max token id "
          f"{trailer['max_token_id']}, fingerprint {trailer['fingerprint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
