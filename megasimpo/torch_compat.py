"""Everything that reaches into torch's private or version-specific internals, in one place.

Written for torch 2.13 (``WRITTEN_FOR``); each entry point first checks the installed release
(``megasimpo.versions.check``: newer refused until re-checked, older allowed, each with the
fallback noted where it is used) and refuses otherwise with ``UPGRADE_CHECKLIST``, what to
re-check. (``safe_load`` guards its own uses of DCP's reader with the same rule.)

- ``bounded_file_writer``: DCP's ``FileSystemWriter`` with files cut at the largest block, through
  its private ``_write_data`` (used by ``hf/streaming.py``).
- ``checksummed_writes`` / ``verified_reads``: a checksum per stored item (``checksums.py``),
  through DCP's private ``_write_item`` (also Megatron-Core 0.16's writer's, which imports it)
  and ``FileSystemReader._slice_file``; bound to Megatron-Core's minor too (``CHECKSUMS_FOR``).
"""

import contextlib
import functools
import inspect
import io
import queue
from typing import Iterator

import torch

from megasimpo import versions

WRITTEN_FOR = {"torch": "2.13"}
UPGRADE_CHECKLIST = (
    "re-check on upgrade: bounded_file_writer: that FileSystemWriter.write_data still only "
    "groups plan.items into (path, file name, items) entries on a queue.Queue and hands them to "
    "self._write_data(planner, file_queue), file names f'{plan.storage_data.prefix}{n}.distcp', "
    "and whether its file writer still keeps each tensor name's last block alive until the file "
    "is closed (if not, the cut is unnecessary); checksums: that "
    "torch.distributed.checkpoint.filesystem._write_item(transforms, stream, data, write_item, "
    "storage_key, ...) still writes exactly one stored item to `stream` (from stream.tell(), "
    "nothing seeked) and returns a WriteResult whose storage_data is the _StorageInfo "
    "(relative_path, offset, length) that ends up in .metadata, pickling its __dict__; that "
    "torch's _write_files_from_queue and Megatron's FileSystemWriterAsync.write_preloaded_data "
    "still call it by the module-level name _write_item; that FileSystemReader.read_data still "
    "reads each item's bytes only through self._slice_file(file, storage_info); then update "
    "WRITTEN_FOR (and CHECKSUMS_FOR) in megasimpo/torch_compat.py"
)
CHECKSUMS_FOR = {"torch": "2.13", "megatron.core": "0.16"}


@functools.cache
def _check() -> None:
    versions.check("megasimpo.torch_compat", WRITTEN_FOR, UPGRADE_CHECKLIST)


def bounded_file_writer(path: str):
    """A DCP ``FileSystemWriter`` for ``path`` (one thread) whose files hold blocks up to the
    size of the largest one, so that memory during a save is bounded by a few blocks."""
    _check()
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.planner import WriteItemType

    def nbytes(item) -> int:
        td = item.tensor_data
        return td.chunk.sizes.numel() * torch.empty((), dtype=td.properties.dtype).element_size()

    class BoundedFileWriter(FileSystemWriter):
        """torch's writer with files cut at the largest block: it keeps the last block of every
        tensor name written to a file alive until the file is closed (one block each of ~10
        names, up to GBs for a 70B model), so cutting files bounds memory by the largest block."""

        def write_data(self, plan, planner):
            if not hasattr(self, "_write_data"):  # older torch: a file per block bounds it too
                self.single_file_per_rank = False
                return super().write_data(plan, planner)
            tensors = [i for i in plan.items if i.type != WriteItemType.BYTE_IO]
            buckets = [[i for i in plan.items if i.type == WriteItemType.BYTE_IO]]
            cap = max((nbytes(i) for i in tensors), default=0)
            size = cap + 1
            for item in tensors:
                if size + nbytes(item) > cap:
                    buckets.append([])
                    size = 0
                buckets[-1].append(item)
                size += nbytes(item)
            files = queue.Queue()
            for n, bucket in enumerate(b for b in buckets if b):
                name = f"{plan.storage_data.prefix}{n}.distcp"
                files.put((self.fs.concat_path(self.path, name), name, bucket))
            return self._write_data(planner, files)

    return BoundedFileWriter(path, thread_count=1)


# ----- checksums of stored items (megasimpo/checksums.py) ----------------------------------------

@functools.cache
def _check_checksums() -> None:
    versions.check("megasimpo.torch_compat (checksums)", CHECKSUMS_FOR, UPGRADE_CHECKLIST)


class _HashingStream:
    """``raw`` (a shard file being written) that hashes every byte written through it."""

    def __init__(self, raw):
        from megasimpo import checksums

        self.raw, self.hasher = raw, checksums.Hasher()

    def write(self, data):
        n = self.raw.write(data)
        self.hasher.update(data)  # a blocking file writes all of it or raises
        return n

    def __getattr__(self, name):  # tell, flush, fileno, ...: the file's own
        return getattr(self.raw, name)


def _checksummed(write_item):
    """DCP's ``_write_item`` recording the CRC of the item's bytes on its ``_StorageInfo``."""
    from megasimpo import checksums

    signature = inspect.signature(write_item)

    @functools.wraps(write_item)
    def checksummed_write_item(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        stream = _HashingStream(bound.arguments["stream"])
        bound.arguments["stream"] = stream
        result = write_item(*bound.args, **bound.kwargs)
        info = result.storage_data
        if stream.hasher.count != info.length:  # e.g. a format that writes items elsewhere
            raise RuntimeError(f"torch {torch.__version__}: DCP wrote {stream.hasher.count} "
                               f"bytes for an item recorded as {info.length}; "
                               f"{UPGRADE_CHECKLIST}")
        setattr(info, checksums.ATTR, stream.hasher.hexdigest())
        return result

    checksummed_write_item.megasimpo_checksummed = True
    return checksummed_write_item


@contextlib.contextmanager
def checksummed_writes() -> Iterator[None]:
    """While open, every item DCP writes in this process (and in the writer processes Megatron
    forks meanwhile) carries the checksum of its bytes into ``.metadata``."""
    _check_checksums()
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from torch.distributed.checkpoint import filesystem

    saved = [(m, m.__dict__["_write_item"]) for m in (filesystem, filesystem_async)]
    for module, original in saved:
        if not getattr(original, "megasimpo_checksummed", False):
            module._write_item = _checksummed(original)
    try:
        yield
    finally:
        for module, original in saved:
            module._write_item = original


def _verified_slice_file(original):
    """``FileSystemReader._slice_file`` that reads an item with a recorded checksum whole and
    verifies it before torch deserialises it (ChecksumError naming the file and the item)."""
    from megasimpo import checksums

    def _slice_file(self, file, sinfo):
        if checksums.recorded(sinfo) is None:
            return original(self, file, sinfo)
        file.seek(sinfo.offset)
        data = file.read(sinfo.length)

        def item():  # only on a mismatch: a search of the whole index
            return checksums.item_name(next((i for i, s in self.storage_data.items()
                                             if s is sinfo), None))

        checksums.verify(data, sinfo, file=str(self.fs.concat_path(self.path, sinfo.relative_path)),
                         item=item, checkpoint=str(self.path))
        return io.BytesIO(data)

    _slice_file.megasimpo_verified = True
    return _slice_file


@contextlib.contextmanager
def verified_reads() -> Iterator[None]:
    """While open, DCP's file reader verifies every stored item it reads against the checksum
    recorded at save (items of checkpoints saved before checksums are read as before). Not
    re-entrant: ``safe_load._restricted`` opens it once."""
    _check_checksums()
    from torch.distributed.checkpoint import FileSystemReader

    original = FileSystemReader.__dict__.get("_slice_file")
    if original is None:  # older torch without the hook: reads stay unverified
        yield
        return
    FileSystemReader._slice_file = _verified_slice_file(original)
    try:
        yield
    finally:
        FileSystemReader._slice_file = original
