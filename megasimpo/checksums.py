"""Checksums of a checkpoint's stored items: what was written is what is read.

Every item a ``torch_dist`` checkpoint stores (a tensor block, a ShardedTensor chunk as one rank
wrote it, or a serialised object) occupies one byte range of one ``*.distcp`` file, recorded in
DCP's index (``.metadata``: ``storage_data[MetadataIndex] = _StorageInfo(file, offset, length)``).
The rank that writes an item hashes the bytes as they go to the file and records the digest on
that item's ``_StorageInfo`` (attribute ``ATTR``), so the digests reach ``.metadata`` with the
offsets, gathered by DCP itself and committed with the checkpoint (``checkpoint.atomic_save``).
A load at any layout reads whole stored items (DCP's reader ``torch.load``s an item's byte range,
then narrows it to the part a rank needs), so each rank verifies every item it reads before it is
deserialised. Hashing per item, not per file, is what makes that work: a rank at another layout
reads byte ranges of files other ranks wrote. The reach-ins into torch's writer and reader are in
``torch_compat.checksummed_writes`` / ``verified_reads``.

CRC-32 (zlib, ~3 GB/s on one core) finds any flipped byte or burst up to 32 bits; it is an
integrity check, not a defence against someone who rewrites the checkpoint on purpose (the
trust model is ``safe_load``'s). The cost is in docs/checkpoints.md ("Checksums").
"""

import re
import zlib
from typing import Optional

ATTR = "megasimpo_checksum"  # on DCP's _StorageInfo; a name torch's own fields will not take
ALGORITHM = "crc32"
_FORMAT = re.compile(r"crc32:[0-9a-f]{8}")
UNVERIFIED = "no checksums recorded; bytes not verified"


class Hasher:
    """Incremental digest of the bytes of one stored item."""

    def __init__(self):
        self.value, self.count = 0, 0

    def update(self, data) -> None:
        view = memoryview(data)
        self.value = zlib.crc32(view, self.value)
        self.count += view.nbytes

    def hexdigest(self) -> str:
        return f"{ALGORITHM}:{self.value:08x}"


def digest(data) -> str:
    """The recorded form of ``data``'s checksum (``"crc32:1a2b3c4d"``)."""
    h = Hasher()
    h.update(data)
    return h.hexdigest()


def recorded(info) -> Optional[str]:
    """The checksum recorded on a ``_StorageInfo``, or None (saved before checksums)."""
    return getattr(info, ATTR, None)


def valid(value) -> bool:
    """Whether ``value`` (read from an untrusted ``.metadata``) is a checksum this code wrote."""
    return isinstance(value, str) and _FORMAT.fullmatch(value) is not None


class ChecksumError(ValueError):
    """A stored item whose bytes differ from what was written."""


def verify(data, info, *, file: str, item, checkpoint: str) -> None:
    """ChecksumError naming ``file``, the ``item`` and the checkpoint when ``data`` (the bytes
    of the stored item ``info`` describes) does not match its recorded checksum. ``item``: its
    name, or a function giving it (called only on a mismatch)."""
    expected = recorded(info)
    if expected is None:
        return
    got = digest(data)
    if got != expected:
        item = item() if callable(item) else item
        raise ChecksumError(
            f"{file}: the bytes of {item} differ from what was written (checksum {got}, "
            f"recorded {expected} when {checkpoint} was saved): the checkpoint is corrupted; "
            "restore it from another copy, or use another checkpoint (e.g. an earlier step)")


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
