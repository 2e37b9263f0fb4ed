"""Loading checkpoint files without running code from them.

A checkpoint is data, but three of its file kinds are pickles, and unpickling runs whatever
callables the file names: a crafted checkpoint would run code on every rank that loads it.
Here every one of them is read by an unpickler that can only build allow-listed objects:

- ``.metadata`` (torch.distributed.checkpoint's index of the shards; a plain protocol-4 pickle,
  which torch's weights-only unpickler cannot read): a ``pickle.Unpickler`` whose ``find_class``
  knows exactly the DCP dataclasses, ``torch.Size``, dtypes and layouts such an index holds
  (``METADATA_GLOBALS``), then a check of its structure (shard files named inside the checkpoint);
- ``common.pt``, the ShardedObjects stored as bytes inside ``*.distcp`` shards, and ``rng_*.pt``:
  ``torch.load(weights_only=True)``, torch's restricted unpickler (tensors, containers, numbers,
  strings, plus the globals registered with ``torch.serialization.add_safe_globals``; Megatron's
  import registers a few: see docs/checkpoints.md, "Trust model").

``guard(path)`` is the one entry point for ``dist_checkpointing`` loads: it validates the JSON
files first (``megasimpo.json``, dist_checkpointing's ``metadata.json``), reads every pickle of
the checkpoint that way up front (so a bad file fails here, naming it), and while open makes
Megatron/torch read them the same way (``FileSystemReader.read_metadata`` replaced;
``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``, which overrides even torch's own explicit
``weights_only=False`` for those bytes objects). Written for torch 2.13 and Megatron-Core 0.16;
``_check_versions`` says what to re-check on an upgrade.
"""

import contextlib
import functools
import io
import json
import os
import pickle
import threading
from typing import Any, Iterator

import torch

from megasimpo import checksums
from megasimpo.checkpoint_meta import read_meta

WRITTEN_FOR = {"torch": "2.13", "megatron.core": "0.16"}
UPGRADE_CHECKLIST = (
    "re-check on upgrade: (1) every unpickling on dist_checkpointing.load's path: grep "
    "torch/distributed/checkpoint and megatron/core/dist_checkpointing for pickle.load and "
    "torch.load (today: filesystem.py FileSystemReader.read_metadata -> pickle.load(.metadata); "
    "default_planner.py DefaultLoadPlanner.load_bytes -> torch.load(weights_only=False); "
    "strategies/common.py load_common/load_sharded_objects -> torch.load); (2) that "
    "FileSystemReader.read_metadata still opens self._get_metadata_path(rank) and sets "
    "storage_meta.load_id; (3) that torch.load still honours TORCH_FORCE_WEIGHTS_ONLY_LOAD over "
    "an explicit weights_only=False; (4) the classes a fresh .metadata names (METADATA_GLOBALS); "
    "then update WRITTEN_FOR in megasimpo/safe_load.py"
)
DIST_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
               "common_backend": "torch", "common_backend_version": 1}
TRUST_HINT = ("megasimpo loads checkpoint files only in forms that cannot run code "
              "(docs/checkpoints.md, 'Trust model'); if this checkpoint comes from an old "
              "megasimpo or another tool, convert it again from its HF model")


def _short(error: BaseException) -> str:
    """The informative line of an unpickling error (torch's run to a page of advice)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln or "unrecognized" in ln or "Can only" in ln:
            return ln.split(" Please use")[0]  # not torch's advice to allow-list it
    return lines[-1] if lines else type(error).__name__


def _refused(file: str, what: str, error: BaseException) -> ValueError:
    return ValueError(f"{file}: refused to load {what}: it would build objects outside the "
                      f"allow-list of plain data, which could run code ({_short(error)}); "
                      f"{TRUST_HINT}")


def load_tensors(file: str, what: str = "it") -> Any:
    """``torch.load(file, weights_only=True)`` on the CPU; ValueError naming ``file`` when it
    holds anything the weights-only unpickler refuses (nothing in it is executed)."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refused(file, what, e) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{file}: cannot read {what}: {_short(e)}; the checkpoint is "
                         "corrupted or incomplete: use another one") from None


# ----- .metadata: a pickle torch's weights-only unpickler cannot read (protocol 4) -----------

@functools.lru_cache(maxsize=1)
def _metadata_globals() -> dict:
    """(module, name) -> object: everything a torch 2.13 DCP ``.metadata`` may name."""
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata, planner

    allowed = {("torch", "Size"): torch.Size,
               ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
               ("pathlib", "PosixPath"): pathlib.PosixPath}  # StorageMeta.checkpoint_id
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                 "ChunkStorageMetadata", "TensorProperties", "MetadataIndex", "StorageMeta",
                 "_MEM_FORMAT_ENCODING"):
        allowed[("torch.distributed.checkpoint.metadata", name)] = getattr(metadata, name)
    for name in ("_StorageInfo", "_StoragePrefix"):
        allowed[("torch.distributed.checkpoint.filesystem", name)] = getattr(filesystem, name)
    for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                 "BytesIOWriteData"):  # Metadata.all_local_plans
        allowed[("torch.distributed.checkpoint.planner", name)] = getattr(planner, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only ``METADATA_GLOBALS``: any other global (``os.system``, ``builtins.eval``,
    a class with a hostile ``__reduce__``) is an UnpicklingError before it is looked up."""

    def find_class(self, module, name):
        obj = _metadata_globals().get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a "
                                         "checkpoint's .metadata")
        return obj

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in a .metadata")


def _check_metadata(md, file: str):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, Metadata,
                                                       MetadataIndex, TensorStorageMetadata)

    def bad(why):
        return ValueError(f"{file}: not a valid checkpoint index: {why}; the checkpoint is "
                          "corrupted or was not written by dist_checkpointing: use another one")

    if type(md) is not Metadata:
        raise bad(f"it holds a {type(md).__name__}, not a Metadata")
    if not isinstance(md.state_dict_metadata, dict) or not isinstance(md.storage_data, dict):
        raise bad("state_dict_metadata/storage_data are not dicts")
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(entry, (TensorStorageMetadata,
                                                              BytesStorageMetadata)):
            raise bad(f"entry {key!r} is a {type(entry).__name__}")
        if isinstance(entry, TensorStorageMetadata) and not isinstance(entry.properties.dtype,
                                                                        torch.dtype):
            raise bad(f"tensor {key!r} has no dtype")
    for index, info in md.storage_data.items():
        if type(index) is not MetadataIndex or type(info) is not _StorageInfo:
            raise bad(f"storage entry {index!r} is a {type(info).__name__}")
        name = info.relative_path
        if (not isinstance(name, str) or not name or os.path.basename(name) != name
                or name.startswith(".") or not name.endswith(".distcp")):
            raise bad(f"{index.fqn!r} is stored in {name!r}, which is not a shard file inside "
                      "the checkpoint")
        if not (isinstance(info.offset, int) and isinstance(info.length, int)
                and info.offset >= 0 and info.length >= 0):
            raise bad(f"{index.fqn!r} has offset {info.offset!r}, length {info.length!r}")
        if checksums.recorded(info) is not None and not checksums.valid(checksums.recorded(info)):
            raise bad(f"{index.fqn!r} has checksum {checksums.recorded(info)!r}")
    return md


def load_metadata_file(file: str):
    """A DCP ``.metadata`` read with ``_MetadataUnpickler`` and checked; ValueError naming it."""
    with open(file, "rb") as f:
        try:
            md = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError,
                IndexError, KeyError) as e:
            if isinstance(e, pickle.UnpicklingError):
                raise _refused(file, "the checkpoint index", e) from None
            raise ValueError(f"{file}: cannot read the checkpoint index: {_short(e)}; the "
                             "checkpoint is corrupted or incomplete: use another one") from None
    return _check_metadata(md, file)


def read_dcp_metadata(path: str):
    """torch.distributed.checkpoint's index of checkpoint ``path`` (``PATH/.metadata``),
    read without running code: what ``FileSystemReader(path).read_metadata()`` returns."""
    file = os.path.join(path, ".metadata")
    if not os.path.isfile(file):
        raise ValueError(f"{path}: no .metadata, so the tensors cannot be found: the checkpoint "
                         "is incomplete; copy it again or use another one")
    return load_metadata_file(file)


def _safe_read_metadata(self, *args, **kwargs):
    """FileSystemReader.read_metadata of torch 2.13 with the pickle.load made safe."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as stream:
        try:
            md = _MetadataUnpickler(stream).load()
        except pickle.UnpicklingError as e:
            raise _refused(str(path), "the checkpoint index", e) from None
    _check_metadata(md, str(path))
    if getattr(md, "storage_meta", None) is None:
        md.storage_meta = StorageMeta()
    md.storage_meta.load_id = self.load_id
    return md


# ----- guard ------------------------------------------------------------------------------------

def check_dist_config(path: str) -> None:
    """dist_checkpointing's ``metadata.json`` (JSON) must name the torch_dist/torch backends,
    the only ones whose reads ``guard`` makes safe."""
    file = os.path.join(path, "metadata.json")
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: not a readable dist_checkpointing config ({e}); the "
                         "checkpoint is incomplete: use another one") from None
    if not isinstance(config, dict) or {k: config.get(k) for k in DIST_CONFIG} != DIST_CONFIG \
            or set(config) - set(DIST_CONFIG):
        raise ValueError(f"{file}: {config!r}, expected {DIST_CONFIG}: megasimpo reads only "
                         "torch_dist checkpoints")


def _check_versions() -> None:
    # Newer releases may add unpickling paths: refused until re-checked (megasimpo/versions.py).
    # Older torch releases that setup.py allows (the GPU image's 2.11) have the same reader and
    # planner; the structural checks below catch a difference.
    from megasimpo import versions

    versions.check("megasimpo.safe_load", WRITTEN_FOR, UPGRADE_CHECKLIST)
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    if not (hasattr(FileSystemReader, "_get_metadata_path")
            and hasattr(DefaultLoadPlanner, "load_bytes")):
        raise RuntimeError(f"torch {torch.__version__}: its DCP reader changed; "
                           f"{UPGRADE_CHECKLIST}")


def preflight(path: str):
    """Reads every pickle of checkpoint ``path`` the safe way, so that a bad one fails here with
    its name: ``.metadata``, ``common.pt``, and the byte objects inside the shards (each checked
    against its recorded checksum first). Returns the DCP index."""
    md = read_dcp_metadata(path)
    common = os.path.join(path, "common.pt")
    if os.path.isfile(common):
        load_tensors(common, "the checkpoint's common state")
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    for index, info in sorted(md.storage_data.items(), key=lambda kv: (kv[1].relative_path,
                                                                         kv[1].offset)):
        entry = md.state_dict_metadata.get(index.fqn)
        if not isinstance(entry, BytesStorageMetadata) or info.transform_descriptors:
            continue  # tensors are read with weights_only=True by torch itself
        shard = os.path.join(path, info.relative_path)
        if not os.path.isfile(shard):
            continue  # verify_shards names missing files
        with open(shard, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        checksums.verify(checksums.bytes_digest(data), info, file=shard,
                         item=checksums.item_name(index), checkpoint=path)
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise _refused(f"{shard} (object {index.fqn!r})", "an object", e) from None
        except (RuntimeError, EOFError) as e:
            raise ValueError(f"{shard}: object {index.fqn!r} is unreadable ({_short(e)}); the "
                             "checkpoint is corrupted: use another one") from None
    return md


_lock = threading.RLock()
_depth = 0
_saved: dict = {}


@contextlib.contextmanager
def _restricted() -> Iterator[None]:
    """While open: FileSystemReader.read_metadata is ``_safe_read_metadata``, every
    ``torch.load`` is weights-only (TORCH_FORCE_WEIGHTS_ONLY_LOAD) and every stored item read is
    checked against its checksum (``torch_compat.verified_reads``). Re-entrant."""
    global _depth
    from megatron.core.msc_utils import MultiStorageClientFeature
    from torch.distributed.checkpoint import FileSystemReader

    from megasimpo import torch_compat

    if MultiStorageClientFeature.is_enabled():
        raise RuntimeError("megasimpo.safe_load: Megatron's multi-storage client is enabled; "
                           "its readers bypass the safe loaders, so it is not supported")
    with _lock:
        if _depth == 0:
            _check_versions()
            _saved["read_metadata"] = FileSystemReader.__dict__["read_metadata"]
            _saved["env"] = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",
                                                          "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
            FileSystemReader.read_metadata = _safe_read_metadata
            _saved["reads"] = torch_compat.verified_reads()
            _saved["reads"].__enter__()
            os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                FileSystemReader.read_metadata = _saved.pop("read_metadata")
                _saved.pop("reads").__exit__(None, None, None)
                for k, v in _saved.pop("env").items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v


@contextlib.contextmanager
def guard(path: str) -> Iterator[None]:
    """Around any ``dist_checkpointing.load``/``load_tensors_metadata`` of checkpoint ``path``:
    first its JSON (``megasimpo.json`` through ``checkpoint_meta.read_meta``, ``metadata.json``)
    is validated, then every pickle in it is read safely (``preflight``), and while open Megatron's
    and torch's own reads of it are restricted the same way and verified against the checksums
    recorded at save (a checkpoint without them gets a one-line note). ValueError naming the
    file (and, for a checksum mismatch, the item)."""
    read_meta(path)
    check_dist_config(path)
    with _restricted():
        note = checksums.note(path, preflight(path))
        if note and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
            print(note, flush=True)
        try:
            yield
        except BaseException as e:  # torch's CheckpointException derives from BaseException
            mismatch = checksums.failure_in(e)
            if mismatch is None or mismatch is e:
                raise
            raise mismatch from None
