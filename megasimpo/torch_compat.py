"""Everything that reaches into torch's private or version-specific internals, in one place.

Written for torch 2.13 (``WRITTEN_FOR``); each entry point first checks the installed release
(``megasimpo.versions.check``: newer refused until re-checked, older allowed, each with the
fallback noted where it is used) and refuses otherwise with ``UPGRADE_CHECKLIST``, what to
re-check. (``safe_load`` guards its own uses of DCP's reader with the same rule.)

- ``bounded_file_writer``: DCP's ``FileSystemWriter`` with files cut at the largest block, through
  its private ``_write_data`` (used by ``hf/streaming.py``).
"""

import functools
import queue

import torch

from megasimpo import versions

WRITTEN_FOR = {"torch": "2.13"}
UPGRADE_CHECKLIST = (
    "re-check on upgrade: bounded_file_writer: that FileSystemWriter.write_data still only "
    "groups plan.items into (path, file name, items) entries on a queue.Queue and hands them to "
    "self._write_data(planner, file_queue), file names f'{plan.storage_data.prefix}{n}.distcp', "
    "and whether its file writer still keeps each tensor name's last block alive until the file "
    "is closed (if not, the cut is unnecessary); then update WRITTEN_FOR in "
    "megasimpo/torch_compat.py"
)


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
