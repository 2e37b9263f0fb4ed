"""Checksums of a checkpoint's stored items: what was written is what is read.

Every item a ``torch_dist`` checkpoint stores (a tensor block, a ShardedTensor chunk as one rank
wrote it, or a serialised object) occupies one byte range of one ``*.distcp`` file, recorded in
DCP's index (``.metadata``: ``storage_data[MetadataIndex] = _StorageInfo(file, offset, length)``).
The rank that writes an item hashes it as it goes to the file and records the digest on that
item's ``_StorageInfo`` (attribute ``ATTR``), so the digests reach ``.metadata`` with the offsets,
gathered by DCP itself and committed with the checkpoint (``checkpoint.atomic_save``). A load at
any layout reads whole stored items (DCP's reader ``torch.load``s an item's byte range, then
narrows it to the part a rank needs), so each rank verifies every item it reads, whole, before
the part it needs is taken. Hashing per item, not per file, is what makes that work: a rank at
another layout reads byte ranges of files other ranks wrote. The reach-ins into torch's writer
and reader are ``torch_compat.checksummed_writes`` / ``verified_reads``.

What is hashed: a serialised object's bytes as stored; a tensor's dtype, shape and contents as
written, compared with the tensor torch deserialises from the stored bytes. Hashing the tensor
rather than its file bytes lets the check ride on torch's own single read (a second pass over
the bytes would cost as much as the load's copy itself); a flipped byte in a tensor's data
changes its contents, one in its serialisation header changes its dtype, shape or contents or
makes torch fail to read it. The hash is xxHash's XXH3-64 (~8 GB/s on one core of the test
machine, CRC-32 ~3 GB/s): an integrity check, not a defence against someone who rewrites the
checkpoint on purpose (the trust model is ``safe_load``'s). The cost is in docs/checkpoints.md
("Checksums").
"""

import re
from typing import Optional

import torch
import xxhash

ATTR = "megasimpo_checksum"  # on DCP's _StorageInfo; a name torch's own fields will not take
TENSOR, BYTES = "xxh3-tensor", "xxh3"  # the digest's prefix says what was hashed
_FORMAT = re.compile(r"xxh3(-tensor)?:[0-9a-f]{16}")
UNVERIFIED = "no checksums recorded; bytes not verified"


def bytes_digest(data) -> str:
    """The recorded checksum of a serialised object's stored bytes (``"xxh3:..."``)."""
    return f"{BYTES}:{xxhash.xxh3_64_hexdigest(memoryview(data))}"


def tensor_digest(tensor) -> str:
    """The recorded checksum of a CPU tensor: its dtype, shape and contents
    (``"xxh3-tensor:..."``), whatever its strides."""
    h = xxhash.xxh3_64(f"{tensor.dtype}:{tuple(tensor.shape)}:".encode())
    h.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return f"{TENSOR}:{h.hexdigest()}"


def recorded(info) -> Optional[str]:
    """The checksum recorded on a ``_StorageInfo``, or None (saved before checksums)."""
    return getattr(info, ATTR, None)


def valid(value) -> bool:
    """Whether ``value`` (read from an untrusted ``.metadata``) is a checksum this code wrote."""
    return isinstance(value, str) and _FORMAT.fullmatch(value) is not None


def of_tensor(value: str) -> bool:
    """Whether a recorded checksum is of a tensor (verified on the deserialised tensor)."""
    return value.startswith(TENSOR + ":")


class ChecksumError(ValueError):
    """A stored item whose bytes differ from what was written."""


def verify(got: str, info, *, file: str, item, checkpoint: str) -> None:
    """ChecksumError naming ``file``, the ``item`` and the checkpoint when ``got`` (the checksum
    of what was read of the stored item ``info`` describes) is not the one recorded at save.
    ``item``: its name, or a function giving it (called only on a mismatch)."""
    expected = recorded(info)
    if expected is not None and got != expected:
        item = item() if callable(item) else item
        raise ChecksumError(
            f"{file}: {item} differs from what was written (checksum {got}, recorded "
            f"{expected} when {checkpoint} was saved): the checkpoint is corrupted; restore it "
            "from another copy, or use another checkpoint (e.g. an earlier step)")


def item_name(index) -> str:
    """How an error names a stored item (a DCP ``MetadataIndex``): ``tensor 'KEY' (block at
    offset (0, 64))``, or ``object 'KEY'`` for a serialised object (no offset)."""
    if index is None:
        return "an item"
    if index.offset is None:
        return f"object {index.fqn!r}"
    return f"tensor {index.fqn!r} (block at offset {tuple(index.offset)})"


def count(md) -> tuple:
    """(items with a checksum, items) of a DCP ``Metadata``."""
    infos = list(md.storage_data.values())
    return sum(recorded(i) is not None for i in infos), len(infos)


def note(path: str, md) -> Optional[str]:
    """The one-line note for a checkpoint whose items have no checksums (saved before they were
    recorded), else None."""
    have, total = count(md)
    if total and not have:
        return f"note: {path}: {UNVERIFIED} (saved before megasimpo recorded them)"
    return None


def failure_in(error: BaseException) -> Optional[ChecksumError]:
    """The ChecksumError behind ``error``: itself, or the one a rank raised inside DCP (torch's
    CheckpointException carries each rank's exception in ``failures``)."""
    if isinstance(error, ChecksumError):
        return error
    for failure in (getattr(error, "failures", None) or {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, ChecksumError):
            return inner
    return None
