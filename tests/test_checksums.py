"""A checksum per stored item (issue #25 item 5): a checkpoint with a flipped byte fails to load
with one line naming the file, the tensor and the checkpoint, at the layout it was saved at and at
TP=2 (which reads byte ranges of a file another layout wrote); a checkpoint saved before checksums
loads with a one-line note."""

import os
import pickle

import pytest

from fixtures import writable_copy
from multirank import run_ranks


@pytest.fixture(scope="module")
def inputs(shared_inputs):
    return shared_inputs()


def _index(path):
    from megasimpo import safe_load

    return safe_load.read_dcp_metadata(path)


def _digest_of(path, index, info):
    """The checksum of stored item ``index`` computed from the file alone."""
    import io

    import torch

    from megasimpo import checksums

    with open(os.path.join(path, info.relative_path), "rb") as f:
        f.seek(info.offset)
        data = f.read(info.length)
    if index.offset is None:
        return checksums.bytes_digest(data)
    return checksums.tensor_digest(torch.load(io.BytesIO(data), weights_only=True))


def _flip(path, want_object=False):
    """Flips one byte in the middle of the largest tensor block (or of an object) of ``path``;
    returns (shard file, key)."""
    md = _index(path)
    items = [(i, s) for i, s in md.storage_data.items() if (i.offset is None) == want_object]
    index, info = max(items, key=lambda kv: kv[1].length)
    shard = os.path.join(path, info.relative_path)
    with open(shard, "r+b") as f:
        f.seek(info.offset + info.length // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    return shard, index.fqn


def _strip(path):
    """``path`` as a checkpoint saved before checksums were recorded."""
    from megasimpo import checksums

    md = _index(path)
    for info in md.storage_data.values():
        delattr(info, checksums.ATTR)
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(md, f)


def _load(rank, world, path, tp):
    """``checkpoint.load_model`` of ``path`` at TP=``tp``: (error or None, what it printed)."""
    import contextlib
    import io

    from megasimpo import checkpoint
    from megasimpo.config import Layout
    from megasimpo.model import Precision, build_chunks
    from megasimpo.parallel import groups

    model = checkpoint.model_config(path)
    layout = Layout.resolve(model, world, tp=tp)
    groups.initialize(layout, 0)
    chunks = build_chunks(model, layout, Precision(name="fp32"))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            checkpoint.load_model(chunks, path)
    except ValueError as e:
        return str(e), printed.getvalue()
    return None, printed.getvalue()


def test_every_stored_item_has_the_checksum_of_its_bytes(inputs):
    from megasimpo import checksums

    ckpt = inputs[0]  # written by checkpoint.save_model (Megatron's writer, forked processes)
    md = _index(ckpt)
    assert checksums.count(md) == (len(md.storage_data), len(md.storage_data))
    for index, info in md.storage_data.items():
        assert checksums.recorded(info) == _digest_of(ckpt, index, info)


def test_flipped_byte_fails_the_load_naming_file_and_tensor(inputs, tmp_path):
    ckpt = inputs[0]
    bad = writable_copy(ckpt, str(tmp_path / "bad"))
    shard, key = _flip(bad)
    error, _ = run_ranks(_load, 1, bad, 1)[0]
    assert error and error.startswith(f"{shard}: tensor {key!r}"), error
    assert f"when {bad} was saved" in error and "restore it from another copy" in error
    assert "\n" not in error
    # At TP=2 each rank reads part of the block another layout wrote: both fail the same way.
    for error, _ in run_ranks(_load, 2, bad, 2):
        assert error and error.startswith(f"{shard}: tensor {key!r}"), error

    old = writable_copy(ckpt, str(tmp_path / "old"))
    _strip(old)
    obj = writable_copy(ckpt, str(tmp_path / "obj"))
    obj_shard, obj_key = _flip(obj, want_object=True)
    error, printed = run_ranks(_load, 1, old, 1)[0]  # saved before checksums: a note, loads
    assert error is None
    assert printed == f"note: {old}: no checksums recorded; bytes not verified (saved before " \
                      "megasimpo recorded them)\n"
    error, _ = run_ranks(_load, 1, obj, 1)[0]  # a serialised object (read before any tensor)
    assert error and error.startswith(f"{obj_shard}: object {obj_key!r} differs"), error
    assert run_ranks(_load, 1, ckpt, 1)[0] == (None, "")


def _stream(rank, world, path):
    """A checkpoint written by the streaming import's save (hf/streaming.py), random blocks."""
    import torch
    from megatron.core import dist_checkpointing

    from fixtures import TINY
    from megasimpo.hf import streaming

    state, _ = streaming.sharded_state(TINY, torch.float32)
    produce = lambda sh: torch.randn(tuple(sh.local_shape))  # noqa: E731
    dist_checkpointing.save(state, path, sharded_strategy=streaming.streaming_strategy(produce))


def test_streamed_import_records_a_checksum_per_block(tmp_path):
    from megasimpo import checksums

    path = str(tmp_path / "streamed")
    os.makedirs(path)
    run_ranks(_stream, 1, path)
    md = _index(path)
    blocks = [i for i in md.storage_data if i.offset is not None]
    assert len(blocks) > 5 and checksums.count(md) == (len(md.storage_data),) * 2
    for index, info in md.storage_data.items():
        assert checksums.recorded(info) == _digest_of(path, index, info)


def test_checksum_in_an_index_must_be_one_megasimpo_wrote(inputs, tmp_path):
    from megasimpo import checksums

    path = writable_copy(inputs[0], str(tmp_path / "m"))
    md = _index(path)
    setattr(next(iter(md.storage_data.values())), checksums.ATTR, ["not", "a", "checksum"])
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(ValueError, match=r"\.metadata: not a valid checkpoint index: .* has "
                                         r"checksum \['not'"):
        _index(path)
