"""The megasimpo trailer of a pair dataset's ``.idx``: a content fingerprint and the token range.

Megatron's ``.idx`` is a header, then fixed-count arrays (sequence lengths, sequence pointers,
document indices); its reader reads exactly those counts and ignores what follows. megasimpo appends
one trailer there rather than touching the ``.bin``, because ``IndexedDatasetBuilder.add_index``
merges ``.bin`` files by raw copy (a ``.bin`` trailer would end up among a merged dataset's tokens).
The trailer, found from the end of the file::

    JSON bytes | len(JSON) as 8-byte little-endian | TRAILER_MAGIC (8 bytes)

with JSON ``{"format", "fingerprint", "max_token_id", "vocab_size", "num_pairs"}`` and, since
tokenizer identities were added, an optional ``"tokenizer"``: the identity of the tokenizer that
wrote the ids (``tokenizer_identity.py``; versioned inside the string). It is optional both ways:
an older trailer without it still reads (no identity), and an older megasimpo ignores it, so the
trailer format stays ``megasimpo-pairs-v1``.

The fingerprint is blake2b (16 bytes) over the dtype code, the sequence lengths, the document
indices, the ``.bin`` size and the ``.bin`` bytes: all of them up to ``FULL_HASH_LIMIT``, beyond it
``NUM_SAMPLES`` evenly spread ``SAMPLE_SIZE`` blocks plus the last one, so a reader can recompute it
on every open without reading a 100 GB ``.bin``. It tells an ``.idx`` from another write of the
same records (another order, another tokenizer) apart from the ``.bin`` it was written with.
"""

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np

FORMAT = "megasimpo-pairs-v1"
TRAILER_MAGIC = b"MSPAIRS1"
_HEADER = b"MMIDIDX\x00\x00"  # Megatron's indexed_dataset._INDEX_HEADER
_HEADER_SIZE = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8
FULL_HASH_LIMIT = 4 << 20
NUM_SAMPLES = 256
SAMPLE_SIZE = 4096
_FRAME = struct.Struct("<Q")


@dataclass(frozen=True)
class IndexContent:
    """What megasimpo needs of a Megatron ``.idx``: ``end`` is the byte where Megatron's content
    stops (a trailer, if any, starts there)."""

    dtype_code: int
    sequence_lengths: np.ndarray  # int32 [sequences]
    document_indices: np.ndarray  # int64 [documents + 1]
    end: int


def read_index(idx_path: str) -> IndexContent:
    """Parse the Megatron part of ``idx_path``; ValueError naming it when it is not one."""
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER_SIZE)
        if len(head) < _HEADER_SIZE or head[:len(_HEADER)] != _HEADER:
            raise ValueError(f"{idx_path!r} is not a Megatron IndexedDataset index")
        version, code, num_seqs, num_docs = struct.unpack("<QBQQ", head[len(_HEADER):])
        end = _HEADER_SIZE + num_seqs * (4 + 8) + num_docs * 8
        if version != 1 or end > size:
            raise ValueError(f"{idx_path!r} is not a readable Megatron index (version {version}, "
                             f"{size} bytes for {num_seqs} sequences and {num_docs} documents)")
    # Memory maps, not reads: the index of a large dataset is gigabytes, on every rank.
    lengths = _map(idx_path, "<i4", _HEADER_SIZE, num_seqs)
    # The sequence pointers between the two are derived from the lengths: not needed.
    docs = _map(idx_path, "<i8", _HEADER_SIZE + num_seqs * 12, num_docs)
    return IndexContent(code, lengths, docs, end)


def _map(path: str, dtype: str, offset: int, count: int) -> np.ndarray:
    if count == 0:  # numpy cannot map zero bytes
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def _update(h, arr: np.ndarray) -> None:
    """Hash ``arr``'s bytes in bounded slices (no copy of a memory-mapped array)."""
    view = memoryview(np.ascontiguousarray(arr)).cast("B")
    for start in range(0, len(view), 1 << 26):
        h.update(view[start:start + (1 << 26)])


def compute_fingerprint(index: IndexContent, bin_path: str) -> str:
    """Hex blake2b of ``index``'s arrays and (samples of) ``bin_path``; see the module docstring."""
    h = hashlib.blake2b(digest_size=16)
    h.update(FORMAT.encode())
    h.update(bytes([index.dtype_code]))
    h.update(_FRAME.pack(len(index.sequence_lengths)))
    _update(h, index.sequence_lengths.astype("<i4", copy=False))
    _update(h, index.document_indices.astype("<i8", copy=False))
    update_with_file(h, bin_path)
    return h.hexdigest()


def update_with_file(h, path: str) -> None:
    """Adds ``path``'s size and content to hash ``h``: the whole file up to FULL_HASH_LIMIT, else
    NUM_SAMPLES evenly spaced SAMPLE_SIZE blocks and the last one (so a 100 GB file costs ~1 MiB of
    reads). Also the LoRA base-checkpoint fingerprint's file rule (megasimpo/lora_checkpoint.py)."""
    size = os.path.getsize(path)
    h.update(_FRAME.pack(size))
    with open(path, "rb") as f:
        if size <= FULL_HASH_LIMIT:
            h.update(f.read())
        else:
            stride = (size - SAMPLE_SIZE) // NUM_SAMPLES
            for offset in [k * stride for k in range(NUM_SAMPLES)] + [size - SAMPLE_SIZE]:
                f.seek(offset)
                h.update(f.read(SAMPLE_SIZE))


def encode_trailer(fingerprint: str, max_token_id: int, vocab_size: Optional[int],
                   num_pairs: int, tokenizer: Optional[str] = None) -> bytes:
    """The trailer bytes to append after Megatron's index content; ``tokenizer``: the writing
    tokenizer's identity (omitted when None)."""
    fields = {"format": FORMAT, "fingerprint": fingerprint, "max_token_id": max_token_id,
              "vocab_size": vocab_size, "num_pairs": num_pairs}
    if tokenizer is not None:
        fields["tokenizer"] = tokenizer
    body = json.dumps(fields, sort_keys=True).encode()
    return body + _FRAME.pack(len(body)) + TRAILER_MAGIC


def read_trailer(idx_path: str, index: IndexContent) -> Optional[dict]:
    """The trailer of ``idx_path`` (whose Megatron part is ``index``), or None when it has none;
    ValueError naming the file when bytes follow the index but are not a valid trailer."""
    size = os.path.getsize(idx_path)
    if size == index.end:
        return None
    frame = len(TRAILER_MAGIC) + _FRAME.size
    with open(idx_path, "rb") as f:
        f.seek(index.end)
        extra = f.read()
    bad = f"{idx_path!r}: {len(extra)} bytes after the Megatron index are not a megasimpo trailer"
    if len(extra) < frame or extra[-len(TRAILER_MAGIC):] != TRAILER_MAGIC:
        raise ValueError(f"{bad}; re-run tools/preprocess_data.py")
    (length,) = _FRAME.unpack(extra[-frame:-len(TRAILER_MAGIC)])
    if length != len(extra) - frame:
        raise ValueError(f"{bad} (framed length {length}); re-run tools/preprocess_data.py")
    try:
        trailer = json.loads(extra[:length])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{bad} ({err}); re-run tools/preprocess_data.py") from None
    if not isinstance(trailer, dict) or trailer.get("format") != FORMAT:
        got = trailer.get("format") if isinstance(trailer, dict) else trailer
        raise ValueError(f"{idx_path!r}: trailer format {got!r} is not {FORMAT!r}; this "
                         "megasimpo cannot read it (re-run tools/preprocess_data.py)")
    types = {"fingerprint": (str,), "max_token_id": (int,), "num_pairs": (int,),
             "vocab_size": (int, type(None))}
    if not isinstance(trailer.get("tokenizer"), (str, type(None))):
        types["tokenizer"] = (str,)  # optional, but a string where present
    wrong = [key for key, allowed in types.items() if not isinstance(trailer.get(key, ""), allowed)
             or isinstance(trailer.get(key), bool)]
    if wrong:
        raise ValueError(f"{idx_path!r}: trailer fields {wrong} are missing or of the wrong type; "
                         "re-run tools/preprocess_data.py")
    return trailer
