"""Checkpoints with Megatron's dist_checkpointing: saved at one layout, loaded at any other.

A model checkpoint (``CKPT``) is a dist_checkpointing directory plus ``megasimpo.json`` (model
config, provenance) and, when known, ``tokenizer/``. Every save goes to ``PATH.partial`` and is
committed by one rename, so an interrupted save never leaves something that looks complete.
"""

import json
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from megasimpo import atomic, lora, lora_checkpoint, safe_load
from megasimpo.checkpoint_meta import FORMAT, read_meta
from megasimpo.config import LoraConfig, ModelConfig
from megasimpo.model import unwrap
from megasimpo.parallel import groups as pgroups
from megasimpo.parallel.compat import finish_optimizer_load, prepare_optimizer_for_load
from megasimpo.run_paths import CHECKPOINTS, LATEST, META_FILE, final_model_of


def model_config(path: str) -> ModelConfig:
    """The ModelConfig a checkpoint was saved with."""
    return ModelConfig.from_dict(read_meta(path)["model"])


def sharded_model_state(chunks: list) -> dict:
    """``{"model{i}": chunk i's sharded state}``: with LoRA adapters, theirs only (the frozen base
    is referenced by the checkpoint, not saved: megasimpo/lora_checkpoint.py)."""
    states = {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}
    return lora_checkpoint.adapter_states(states) if lora_checkpoint.config_of(chunks) else states


def weights_dtype(chunks: list) -> str:
    """The dtype the chunks' weights are saved in, as HF names it ("float32" after an fp32 run
    of a bf16 model); a LoRA model's adapters' (its base is not saved with it)."""
    found = lora.adapters(chunks)
    param = found[0].lora_a if found else next(unwrap(chunks[0]).parameters())
    return str(param.dtype).replace("torch.", "")


def _restore(chunks: list, state: dict, path: str) -> None:
    """Puts a loaded model state into the chunks (adapters only for a LoRA model)."""
    lora = lora_checkpoint.config_of(chunks) is not None
    for i, chunk in enumerate(chunks):
        if lora:
            lora_checkpoint.restore(unwrap(chunk), state[f"model{i}"], path)
        else:
            unwrap(chunk).load_state_dict(state[f"model{i}"], strict=True)



def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _failure(error: BaseException, path: str) -> str:
    """One line for a save that failed: the cause, and the free space when the disk is full."""
    import errno

    text = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    full = (getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text
            or "unexpected pos" in text)  # torch's zip writer on a short write
    if full:
        parent = os.path.dirname(os.path.abspath(path))
        free = shutil.disk_usage(parent).free / 1e9 if os.path.isdir(parent) else float("nan")
        return f"no space left on the device of {parent} ({free:.1f} GB free; {text})"
    if isinstance(error, PermissionError):
        return f"permission denied ({text}); make {os.path.dirname(path) or '.'} writable"
    return f"{type(error).__name__}: {text}"


def _check(error: Optional[str], path: str, partial: str) -> None:
    """Raises on every rank if any rank failed, after removing the unfinished ``partial``."""
    error = pgroups.first_error(error)
    if error:
        if _rank0():
            atomic.delete(partial)
        raise ValueError(f"saving {path} failed, so nothing was replaced (an earlier version "
                         f"of it, if any, is intact): {error}")


def _sharding_error(state: dict) -> Optional[str]:
    """Megatron's check that the ranks' shards tile every tensor exactly once, with its error
    shared by every rank. Inside ``dist_checkpointing.save`` only rank 0 raises it, while the
    others go on to the next collective and wait there for ever."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    try:
        save_preprocess(state, validate_access_integrity=True)  # builds factories in place
    except CheckpointingException as e:
        return f"the ranks' shards do not fit together (a sharding bug, please report it): {e}"
    return None


def atomic_save(path: str, sharded_state: dict, meta: dict,
                tokenizer_dir: Optional[str] = None, common: Optional[dict] = None,
                per_rank: Optional[dict] = None) -> None:
    """Saves ``sharded_state`` (collective: every rank calls it) to ``path`` atomically.

    ``common``: plain values saved once (rank 0) and returned by every load; ``per_rank``:
    {file name: object} each rank writes beside the shards (RNG states). A failure on any rank
    (a full disk, a read-only directory) removes ``PATH.partial`` and raises ValueError on every
    rank; an existing ``path`` is only replaced once the new one is complete
    (``atomic.replace_dir``).
    """
    from megatron.core import dist_checkpointing

    partial = path.rstrip("/") + atomic.PARTIAL_SUFFIX
    error = None
    if _rank0():
        try:
            atomic.delete(partial)
            os.makedirs(partial)
        except OSError as e:
            error = _failure(e, partial)
    _check(error, path, partial)
    state = dict(sharded_state)
    if common:
        state.update(common)
    _check(_sharding_error(state), path, partial)
    try:
        from megasimpo.parallel.processes import sync_save_strategy  # leaves no process behind
        from megasimpo.torch_compat import checksummed_writes  # a checksum per stored item

        with checksummed_writes():
            dist_checkpointing.save(state, partial, sharded_strategy=sync_save_strategy(),
                                    validate_access_integrity=False)  # done by _sharding_error
        for name, obj in (per_rank or {}).items():
            torch.save(obj, os.path.join(partial, name))
    except Exception as e:  # noqa: BLE001 - every cause gets the same clean-up and one line
        error = _failure(e, partial)
    _check(error, path, partial)
    if _rank0():
        try:
            if tokenizer_dir and os.path.isdir(tokenizer_dir):
                shutil.copytree(tokenizer_dir, os.path.join(partial, "tokenizer"))
            with open(os.path.join(partial, META_FILE), "w") as f:
                json.dump(dict(meta, format=FORMAT), f, indent=2)
            atomic.replace_dir(partial, path)
        except OSError as e:
            error = _failure(e, partial)
    _check(error, path, partial)


def save_model(chunks: list, model: ModelConfig, path: str, *, source: str = "",
               tokenizer_dir: Optional[str] = None, base: Optional[dict] = None) -> None:
    """Saves model weights only (what ``--load`` and HF export read); a LoRA model's adapters
    only, with ``base`` (``lora_checkpoint.base_record`` of the frozen base) in its metadata."""
    meta = {"model": model.to_dict(), "source": source, "weights_dtype": weights_dtype(chunks),
            **lora_checkpoint.meta_for(chunks, base, path)}
    atomic_save(path, sharded_model_state(chunks), meta, tokenizer_dir=tokenizer_dir)


def verify_shards(path: str) -> None:
    """ValueError naming the file when a shard the checkpoint's index lists is missing or
    shorter than the index says (an interrupted copy): checked before any rank reads a byte."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise ValueError(f"{path}: no .metadata, so the tensors cannot be found: the checkpoint "
                         "is incomplete; copy it again or use another one")
    needed = {}
    for info in safe_load.read_dcp_metadata(path).storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0),
                                         info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ValueError(f"{file}: shard file missing: the checkpoint is incomplete (an "
                             "interrupted copy?); copy it again or use another checkpoint")
        if os.path.getsize(file) < size:
            raise ValueError(f"{file}: {os.path.getsize(file)} bytes, but the checkpoint's index "
                             f"needs {size}: the file is truncated; copy it again or use another "
                             "checkpoint")


def _load(sharded_state: dict, path: str) -> dict:
    """``dist_checkpointing.load`` with the shards checked first and its failures (raised by
    torch as a BaseException carrying each rank's error) turned into one ValueError."""
    from megatron.core import dist_checkpointing

    verify_shards(path)
    with safe_load.guard(path):  # no pickle in the checkpoint can build more than plain data
        try:
            return dist_checkpointing.load(sharded_state, path)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # torch's CheckpointException derives from BaseException
            from megasimpo import checksums

            if checksums.failure_in(e) is not None:  # names the file and the item already
                raise checksums.failure_in(e) from None
            failures = getattr(e, "failures", None) or {}
            inner = next(iter(failures.values()), (e,))[0] if failures else e
            text = str(inner).strip() or type(inner).__name__
            hint = ("its tensors have other shapes than the model its megasimpo.json describes"
                    if "shape mismatch" in text else "a shard is unreadable or corrupted")
            from megasimpo.torch_compat import item_being_read

            if item_being_read():  # the tensor whose bytes torch could not deserialise
                hint += f" at {item_being_read()}"
            raise ValueError(f"{path}: cannot load the checkpoint: {hint} ({text}); use another "
                             "checkpoint or convert the model again") from None


def load_model(chunks: list, path: str) -> Optional[dict]:
    """Loads a checkpoint's weights into this rank's chunks, whatever layout it was saved at.

    A LoRA checkpoint loads its base first, then gets the adapters it holds; returns its base
    record then (None for a full model)."""
    meta = read_meta(path)
    base = meta.get(lora_checkpoint.BASE_KEY)
    if lora_checkpoint.META_KEY in meta:
        base_path = lora_checkpoint.check_base(base or {}, path)
        if lora_checkpoint.META_KEY in read_meta(base_path):
            raise ValueError(f"{path}: its base {base_path} is itself a LoRA checkpoint; "
                             "export that one merged and import it as the base")
        load_model(chunks, base_path)
        from megasimpo import lora

        lora.apply([unwrap(c) for c in chunks], LoraConfig(**meta[lora_checkpoint.META_KEY]),
                   seed=0)
    _restore(chunks, _load(sharded_model_state(chunks), path), path)
    return base


# ----- training state: resumable checkpoints in RUN_DIR/checkpoints -----------------------------

# Megatron-Core 0.16's distributed-optimizer formats: "dp_reshardable" (parallel, but resumes only
# at the same TP/PP) and "fully_reshardable" (each DP group's rank 0 gathers its shard's state into
# the canonical per-parameter form on save; loads at any TP/PP/DP). "fully_sharded_model_space"
# is rejected by 0.16's dist_checkpointing. Resuming at another layout is the point here.
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The committed checkpoint ``RUN_DIR/checkpoints/latest`` points at, or None."""
    pointer = os.path.join(run_dir, CHECKPOINTS, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(run_dir, CHECKPOINTS, f.read().strip())
    read_meta(path)  # a pointer to something incomplete is an error, not a fresh start
    return path


def remove_stale_partials(run_dir: str) -> None:
    """Deletes checkpoints whose save died midway (``*.partial``): they can never be completed."""
    ckdir = os.path.join(run_dir, CHECKPOINTS)
    if _rank0() and os.path.isdir(ckdir):
        for name in os.listdir(ckdir):
            if name.endswith(".partial"):
                atomic.delete(os.path.join(ckdir, name))
    _barrier()


RNG_FORMAT = "megasimpo-rng-v2"


def _rng_state() -> dict:
    """This rank's RNG states as tensors, numbers and strings only, so that the file loads with
    ``torch.load(weights_only=True)`` and can hold no code (numpy's state array and Python's
    state tuple become int64 tensors; torch, CUDA and tracker states are uint8 tensors)."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    version, mt, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    for k, v in tracker.items():
        if not (isinstance(v, torch.Tensor) and v.dtype == torch.uint8):
            raise ValueError(f"RNG tracker state {k!r} is a {type(v).__name__}, not a uint8 "
                             "tensor (CUDA-graph RNG?): it cannot be saved as plain tensors")
    return {"format": RNG_FORMAT,
            "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                       "gauss_next": gauss_next},
            "numpy": {"name": str(name), "key": torch.from_numpy(key.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached_gaussian)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": dict(tracker)}


def _set_rng_state(state: dict, source: str = "RNG state") -> None:
    """Restores what ``_rng_state`` saved (``source``: the file, for errors). Files written
    before RNG_FORMAT (pickled tuples with a numpy array) are accepted as long as they loaded
    with ``weights_only=True``."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    try:
        if state.get("format") == RNG_FORMAT:
            py, npy = state["python"], state["numpy"]
            python = (py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss_next"])
            numpy_state = (npy["name"], npy["key"].numpy().astype(np.uint32), npy["pos"],
                           npy["has_gauss"], npy["cached_gaussian"])
        else:  # megasimpo-checkpoint-v1 RNG files
            python, numpy_state = state["python"], state["numpy"]
        random.setstate(python)
        np.random.set_state(numpy_state)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: not an RNG state megasimpo wrote ({type(e).__name__}: "
                         f"{e}); the checkpoint is corrupted: use another one") from None
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_training_state(run_dir: str, step: int, chunks: list, optimizer, scheduler,
                        model: ModelConfig, layout: dict, keep: int,
                        run: Optional[dict] = None, base: Optional[dict] = None) -> str:
    """Checkpoint after ``step`` optimizer steps: model, optimizer, LR schedule, data position
    (the step: the data order is a function of it) and RNG; then ``latest`` and rotation.
    ``run``: the run configuration it is written under (a resume compares against it); ``base``:
    a LoRA model's base record (the checkpoint then holds the adapters and their state only)."""
    name = f"step_{step:07d}"
    path = os.path.join(run_dir, CHECKPOINTS, name)
    model_state = sharded_model_state(chunks)
    state = dict(model_state)
    state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=False,
                                                      metadata=OPTIMIZER_SHARDING)
    rank = dist.get_rank() if dist.is_initialized() else 0
    atomic_save(path, state, {"model": model.to_dict(), "step": step, "layout": layout,
                              "weights_dtype": weights_dtype(chunks),
                              **({"run": run} if run is not None else {}),
                              **lora_checkpoint.meta_for(chunks, base, path)},
                common={"scheduler": scheduler.state_dict(), "train": {"step": step}},
                per_rank={f"rng_{rank:05d}.pt": _rng_state()})
    if _rank0():
        atomic.write_text(os.path.join(run_dir, CHECKPOINTS, LATEST), name + "\n")
        done = sorted(d for d in os.listdir(os.path.join(run_dir, CHECKPOINTS))
                      if d.startswith("step_") and not d.endswith((atomic.PARTIAL_SUFFIX, atomic.OLD_SUFFIX)))
        for old in done[:-keep] if keep > 0 else []:
            atomic.delete(os.path.join(run_dir, CHECKPOINTS, old))
    _barrier()
    return path


def load_training_state(path: str, chunks: list, optimizer, scheduler, layout: dict) -> int:
    """Restores a training checkpoint at this rank's layout; returns the steps already done.

    RNG states are restored only when the layout is unchanged (they are per rank)."""
    meta = read_meta(path)
    lora_checkpoint.check_resume(meta, lora_checkpoint.config_of(chunks), path,
                                 final_model_of(path))
    prepare_optimizer_for_load(optimizer)
    model_state = sharded_model_state(chunks)
    sharded = dict(model_state)
    sharded["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=True,
                                                        metadata=OPTIMIZER_SHARDING)
    if lora_checkpoint.BASE_KEY in meta:  # the frozen base it was trained on must be unchanged
        lora_checkpoint.check_base(meta[lora_checkpoint.BASE_KEY], path)
    state = _load(sharded, path)
    _restore(chunks, state, path)
    optimizer.load_state_dict(state["optimizer"])
    finish_optimizer_load(optimizer)
    scheduler.load_state_dict(state["scheduler"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = os.path.join(path, f"rng_{rank:05d}.pt")
    if meta.get("layout") == layout and os.path.isfile(rng_file):
        _set_rng_state(safe_load.load_tensors(rng_file, "its RNG state"), rng_file)
    return int(state["train"]["step"])


def tokenizer_dir(path: str) -> Optional[str]:
    """The tokenizer files saved with a checkpoint, if any."""
    d = os.path.join(path, "tokenizer")
    return d if os.path.isdir(d) else None


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype from its HF config name ('bfloat16', 'float32', ...)."""
    return getattr(torch, name.replace("torch.", ""))
