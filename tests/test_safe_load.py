"""A crafted checkpoint must not run code: RNG files, ``.metadata``, ``common.pt`` and the
objects inside ``*.distcp`` shards are read without executing anything (issue #14 item 7).

Every crafted file below holds a pickle whose ``__reduce__`` calls ``open(MARKER, "w")``: had it
been unpickled the ordinary way, MARKER would exist."""

import json
import os
import pickle
import re
import shutil
import sys

import pytest

from multirank import run_main, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Payload:
    """Unpickled the ordinary way, creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def inputs(shared_inputs):
    return shared_inputs()


def _train(ckpt, data, out):
    return run_main("megasimpo", ["train", "--load", ckpt, "--data", data, "--out", str(out),
                                  "--steps", "2", "--global-batch-size", "4", "--micro-batch-size",
                                  "2", "--lr", "1e-2", "--seed", "3", "--save-interval", "1",
                                  "--exit-interval", "1"], timeout=300)


# ----- RNG state -------------------------------------------------------------------------------

def _rng_round_trip(rank, world, path):
    import random

    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    from megasimpo import checkpoint
    from megasimpo.config import Layout
    from megasimpo.parallel import groups
    from fixtures import TINY

    groups.initialize(Layout.resolve(TINY, 1), 5)
    random.random(), np.random.rand(3), torch.rand(3), random.gauss(0, 1), np.random.randn(1)
    torch.save(checkpoint._rng_state(), path)
    draws = (random.random(), random.gauss(0, 1), np.random.rand(4).tolist(),
             np.random.randn(2).tolist(), torch.rand(4).tolist())
    tracker = {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()}
    # torch's default allow-list only: not the globals Megatron registers at import (numpy arrays)
    extra = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        state = torch.load(path, weights_only=True)
    finally:
        torch.serialization.add_safe_globals(extra)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    tensor_parallel.get_cuda_rng_tracker().set_states({k: torch.zeros_like(v)
                                                       for k, v in tracker.items()})
    checkpoint._set_rng_state(state, path)
    again = (random.random(), random.gauss(0, 1), np.random.rand(4).tolist(),
             np.random.randn(2).tolist(), torch.rand(4).tolist())
    restored = tensor_parallel.get_cuda_rng_tracker().get_states()
    return draws == again and sorted(tracker) == sorted(restored) and all(
        torch.equal(tracker[k], restored[k]) for k in tracker)


def test_rng_state_is_plain_tensors_and_restores_exactly(tmp_path):
    assert run_ranks(_rng_round_trip, 1, str(tmp_path / "rng.pt"))[0]


def test_crafted_rng_file_is_refused_on_resume(inputs, tmp_path):
    ckpt, data, _ = inputs
    out, marker = tmp_path / "run", tmp_path / "MARKER"
    p = _train(ckpt, data, out)
    assert p.returncode == 0, p.stderr[-3000:]
    rng = out / "checkpoints" / "step_0000001" / "rng_00000.pt"
    assert rng.is_file()
    import torch

    torch.save({"python": Payload(marker)}, rng)
    p = _train(ckpt, data, out)
    assert not marker.exists(), "the crafted RNG file ran code"
    assert p.returncode != 0
    assert str(rng) in p.stderr and "refused" in p.stderr, p.stderr[-3000:]


# ----- .metadata, common.pt, objects in shards -------------------------------------------------

def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _craft_metadata(path, marker):
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(Payload(marker), f)


def _craft_common(path, marker):
    import torch

    torch.save({"train": {"step": 1}, "x": Payload(marker)}, os.path.join(path, "common.pt"))


def _craft_object(path, marker):
    """Points one ShardedObject (an ``_extra_state``) of the index at a crafted payload appended
    to its shard file: the index itself stays a legitimate one, with the payload's checksum (a
    checksum finds corruption; anyone crafting a file can compute one)."""
    import io

    import torch
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megasimpo import checksums, safe_load

    md = safe_load.read_dcp_metadata(path)
    index, info = next((i, s) for i, s in md.storage_data.items()
                       if isinstance(md.state_dict_metadata[i.fqn], BytesStorageMetadata))
    buf = io.BytesIO()
    torch.save([Payload(marker)], buf)
    shard = os.path.join(path, info.relative_path)
    info.offset, info.length = os.path.getsize(shard), len(buf.getvalue())
    setattr(info, checksums.ATTR, checksums.bytes_digest(buf.getvalue()))
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    return info.relative_path


CRAFTS = {"metadata": (_craft_metadata, ".metadata"), "common": (_craft_common, "common.pt"),
          "object": (_craft_object, ".distcp")}


def _load_crafted(rank, world, ckpt, root, how):
    """``how``: 'load_model' (checkpoint.load_model, what --load does) or 'megatron' (Megatron's
    own reads inside safe_load's restriction, with the up-front checks skipped)."""
    import torch
    from megatron.core import dist_checkpointing

    from megasimpo import checkpoint, safe_load
    from megasimpo.config import Layout
    from megasimpo.model import Precision, build_chunks
    from megasimpo.parallel import groups

    # torch.load's default is weights_only=True: this makes it False where not explicit, so
    # common.pt is a live threat too (as on torch < 2.6, or for a user who set it)
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    model = checkpoint.model_config(ckpt)
    layout = Layout.resolve(model, 1)
    groups.initialize(layout, 0)
    chunks = build_chunks(model, layout, Precision(name="fp32"))
    results = {}
    for name, (craft, _) in CRAFTS.items():
        path = _copy(ckpt, os.path.join(root, f"{how}_{name}"))
        marker = os.path.join(root, f"MARKER_{how}_{name}")
        craft(path, marker)
        try:
            if how == "load_model":
                checkpoint.load_model(chunks, path)
            else:
                with safe_load._restricted():
                    dist_checkpointing.load(checkpoint.sharded_model_state(chunks), path)
            error = None
        except BaseException as e:  # noqa: BLE001 - torch's CheckpointException is one
            error = f"{type(e).__name__}: {e}"
        results[name] = (os.path.exists(marker), error)
    # a clean checkpoint still loads, inside the guard, to the same weights
    checkpoint.load_model(chunks, ckpt)
    want = {k: v.clone() for k, v in chunks[0].state_dict().items() if "extra_state" not in k}
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.zero_()
    with safe_load.guard(ckpt):
        loaded = dist_checkpointing.load(checkpoint.sharded_model_state(chunks), ckpt)
    chunks[0].load_state_dict(loaded["model0"], strict=True)
    got = {k: v for k, v in chunks[0].state_dict().items() if "extra_state" not in k}
    results["clean"] = all(torch.equal(got[k], v) for k, v in want.items()) and bool(want)
    return results


@pytest.mark.parametrize("how", ["load_model", "megatron"])
def test_crafted_pickles_in_a_checkpoint_run_nothing(inputs, tmp_path, how):
    ckpt, _, _ = inputs
    results = run_ranks(_load_crafted, 1, ckpt, str(tmp_path), how)[0]
    assert results.pop("clean")
    for name, (ran, error) in results.items():
        assert not ran, f"a crafted {name} ran code through {how}"
        assert error, f"a crafted {name} loaded through {how}"
        if how == "load_model":  # the up-front checks name the file
            assert "refused" in error and CRAFTS[name][1] in error, (name, error)


def test_index_and_common_state_are_read_without_code(inputs, tmp_path):
    import torch

    from megasimpo import safe_load

    ckpt, _, _ = inputs
    md = safe_load.read_dcp_metadata(ckpt)
    assert "embedding.word_embeddings.weight" in md.state_dict_metadata
    path = _copy(ckpt, tmp_path / "m")
    _craft_metadata(path, tmp_path / "MARKER")
    with pytest.raises(ValueError, match=r"\.metadata: refused .*open is not allowed"):
        safe_load.read_dcp_metadata(path)
    torch.save({"x": Payload(tmp_path / "MARKER")}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"c\.pt: refused"):
        safe_load.load_tensors(str(tmp_path / "c.pt"))
    assert not (tmp_path / "MARKER").exists()


def test_index_naming_files_outside_the_checkpoint_is_refused(inputs, tmp_path):
    from megasimpo import safe_load

    path = _copy(inputs[0], tmp_path / "m")
    md = safe_load.read_dcp_metadata(path)
    next(iter(md.storage_data.values())).relative_path = "../../etc/passwd.distcp"
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(ValueError, match="not a shard file inside the checkpoint"):
        safe_load.read_dcp_metadata(path)


def test_guard_validates_the_json_before_any_pickle(inputs, tmp_path):
    from megasimpo import safe_load

    marker = tmp_path / "MARKER"
    path = _copy(inputs[0], tmp_path / "m")
    _craft_metadata(path, marker)
    os.remove(os.path.join(path, "megasimpo.json"))
    with pytest.raises(ValueError, match="not a megasimpo checkpoint"):
        with safe_load.guard(path):
            pass
    path = _copy(inputs[0], tmp_path / "n")
    _craft_metadata(path, marker)
    with open(os.path.join(path, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "zarr"}, f)
    with pytest.raises(ValueError, match="reads only torch_dist"):
        with safe_load.guard(path):
            pass
    assert not marker.exists()
    with safe_load.guard(inputs[0]):  # a clean one, and the patch is undone on exit
        from torch.distributed.checkpoint import FileSystemReader

        assert FileSystemReader.read_metadata is safe_load._safe_read_metadata
        assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
    assert FileSystemReader.read_metadata is not safe_load._safe_read_metadata


# ----- tokenizers ----------------------------------------------------------------------------

def test_no_code_enables_remote_code():
    pattern = re.compile(r"trust_remote_code\s*=\s*(True|[^F\s)])")
    for top in ("megasimpo", "tools"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    text = open(os.path.join(dirpath, name)).read()
                    assert not pattern.search(text), os.path.join(dirpath, name)


def test_tokenizer_with_custom_code_is_refused_without_asking(tmp_path, monkeypatch):
    """transformers' default (trust_remote_code=None) asks on stdin whether to run the code an
    ``auto_map`` names; a 'y' would run it. megasimpo must refuse without asking."""
    import builtins

    sys.path.insert(0, os.path.join(ROOT, "tests", "data"))
    from tiny_tokenizers import build_hf_tokenizer

    from megasimpo.data.tokenize import load_encoder

    tok, marker = str(tmp_path / "tok"), tmp_path / "MARKER"
    build_hf_tokenizer(tok)
    with open(os.path.join(tok, "tokenizer_config.json")) as f:
        config = json.load(f)
    config.update(tokenizer_class="EvilTokenizer",
                  auto_map={"AutoTokenizer": ["evil_tok.EvilTokenizer", None]})
    with open(os.path.join(tok, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(tok, "evil_tok.py"), "w") as f:
        f.write(f"open({str(marker)!r}, 'w')\n"
                "from transformers import PreTrainedTokenizerFast\n"
                "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "y")
    with pytest.raises(ValueError, match="could not be loaded"):
        load_encoder(tok)
    assert not asked and not marker.exists()
