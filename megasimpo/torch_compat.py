"""Everything that reaches into torch's private or version-specific internals, in one place.

Written for torch 2.13 (``WRITTEN_FOR``); each entry point first checks the installed release
(``megasimpo.versions.check``: newer refused until re-checked, older allowed, each with the
fallback noted where it is used) and refuses otherwise with ``UPGRADE_CHECKLIST``, what to
re-check. (``safe_load`` guards its own uses of DCP's reader with the same rule.)

- ``bounded_file_writer``: DCP's ``FileSystemWriter`` with files cut at the largest block, through
  its private ``_write_data`` (used by ``hf/streaming.py``).
- ``checksummed_writes`` / ``verified_reads``: a checksum per stored item (``checksums.py``),
  through DCP's private ``_write_item`` (also Megatron-Core 0.16's writer's, which imports it)
  and ``FileSystemReader._slice_file`` / the reader's ``narrow_tensor_by_index``; bound to
  Megatron-Core's minor too (``CHECKSUMS_FOR``).
"""

import contextlib
import functools
import inspect
import io
import queue
import threading
from typing import Iterator, Optional

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
    "storage_key, ...) still writes one stored item (`data`: a CPU tensor, or a BytesIO stored "
    "as is) and returns a WriteResult whose storage_data is the _StorageInfo that ends up in "
    ".metadata, pickling its __dict__; that torch's _write_files_from_queue and Megatron's "
    "FileSystemWriterAsync.write_preloaded_data still call it by the module-level name "
    "_write_item; that FileSystemReader.read_data still reads each item through "
    "self._slice_file(file, storage_info), torch.loads a tensor item whole and then calls "
    "filesystem.narrow_tensor_by_index on it (and nowhere else), in one thread; then update "
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


def _checksummed(write_item):
    """DCP's ``_write_item`` recording the checksum of the item it writes (a tensor's dtype,
    shape and contents; an object's bytes) on the item's ``_StorageInfo``."""
    from megasimpo import checksums

    signature = inspect.signature(write_item)

    @functools.wraps(write_item)
    def checksummed_write_item(*args, **kwargs):
        data = signature.bind(*args, **kwargs).arguments["data"]
        result = write_item(*args, **kwargs)
        info = result.storage_data
        if isinstance(data, torch.Tensor):
            setattr(info, checksums.ATTR, checksums.tensor_digest(data))
        elif not info.transform_descriptors:  # (stored bytes = data; megasimpo sets no transforms)
            setattr(info, checksums.ATTR, checksums.bytes_digest(data.getbuffer()))
        return result

    checksummed_write_item.megasimpo_checksummed = True
    return checksummed_write_item


@contextlib.contextmanager
def checksummed_writes() -> Iterator[None]:
    """While open, every item DCP writes in this process (and in the writer processes Megatron
    forks meanwhile) carries its checksum into ``.metadata``."""
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


_reading = threading.local()  # the tensor item whose bytes torch.load is reading in this thread


def _item_name(reader, sinfo):
    """The error's name of the item ``sinfo`` (a search of the whole index: mismatches only)."""
    from megasimpo import checksums

    return checksums.item_name(next((i for i, s in reader.storage_data.items() if s is sinfo),
                                    None))


def _verify(got, reader, sinfo):
    from megasimpo import checksums

    checksums.verify(got, sinfo, file=str(reader.fs.concat_path(reader.path, sinfo.relative_path)),
                     item=lambda: _item_name(reader, sinfo), checkpoint=str(reader.path))


def item_being_read() -> Optional[str]:
    """``FILE: tensor 'KEY' (...)`` for the tensor item this thread's DCP read was deserialising
    when it failed (torch could not read its bytes), else None."""
    item = getattr(_reading, "item", None)
    if item is None:
        return None
    reader, sinfo = item
    return f"{reader.fs.concat_path(reader.path, sinfo.relative_path)}: {_item_name(reader, sinfo)}"


def _verified_slice_file(original):
    """``FileSystemReader._slice_file``: an object's stored bytes are read and verified here; a
    tensor item is remembered, to be verified once torch has deserialised it (``_verified_narrow``:
    ``read_data`` narrows the whole stored tensor to the requested part right after)."""
    from megasimpo import checksums

    def _slice_file(self, file, sinfo):
        recorded = checksums.recorded(sinfo)
        _reading.item = None
        if recorded is None:
            return original(self, file, sinfo)
        if checksums.of_tensor(recorded):
            _reading.item = (self, sinfo)
            return original(self, file, sinfo)
        file.seek(sinfo.offset)
        data = file.read(sinfo.length)
        _verify(checksums.bytes_digest(data), self, sinfo)
        return io.BytesIO(data)

    _slice_file.megasimpo_verified = True
    return _slice_file


def _verified_narrow(original):
    """``narrow_tensor_by_index`` as DCP's reader calls it on each whole stored tensor it has just
    read: the tensor is verified against its recorded checksum first."""
    from megasimpo import checksums

    def narrow_tensor_by_index(tensor, offsets, sizes):
        item, _reading.item = getattr(_reading, "item", None), None
        if item is not None:
            _verify(checksums.tensor_digest(tensor), *item)
        return original(tensor, offsets, sizes)

    return narrow_tensor_by_index


@contextlib.contextmanager
def verified_reads() -> Iterator[None]:
    """While open, DCP's file reader verifies every stored item it reads against the checksum
    recorded at save (items of checkpoints saved before checksums are read as before). Not
    re-entrant: ``safe_load._restricted`` opens it once."""
    _check_checksums()
    from torch.distributed.checkpoint import FileSystemReader, filesystem

    slice_file = FileSystemReader.__dict__.get("_slice_file")
    narrow = filesystem.__dict__.get("narrow_tensor_by_index")
    if slice_file is None or narrow is None:  # older torch without these: reads unverified
        yield
        return
    FileSystemReader._slice_file = _verified_slice_file(slice_file)
    filesystem.narrow_tensor_by_index = _verified_narrow(narrow)
    try:
        yield
    finally:
        FileSystemReader._slice_file = slice_file
        filesystem.narrow_tensor_by_index = narrow
