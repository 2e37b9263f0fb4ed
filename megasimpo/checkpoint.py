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

from megasimpo.config import ModelConfig
from megasimpo.model import unwrap

META_FILE = "megasimpo.json"
FORMAT = "megasimpo-checkpoint-v1"


def read_meta(path: str) -> dict:
    """The metadata of a checkpoint directory; ValueError if ``path`` is not one."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise ValueError(
            f"{path}: not a megasimpo checkpoint (no {META_FILE}); convert an HF model with "
            "`python tools/convert_hf.py import --hf HF_DIR --out CKPT`"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def model_config(path: str) -> ModelConfig:
    """The ModelConfig a checkpoint was saved with."""
    return ModelConfig.from_dict(read_meta(path)["model"])


def sharded_model_state(chunks: list) -> dict:
    """Layout-independent sharded state of this rank's model chunks."""
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def atomic_save(path: str, sharded_state: dict, meta: dict,
                tokenizer_dir: Optional[str] = None, common: Optional[dict] = None) -> None:
    """Saves ``sharded_state`` (collective: every rank calls it) to ``path`` atomically."""
    from megatron.core import dist_checkpointing

    partial = path.rstrip("/") + ".partial"
    if _rank0():
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    _barrier()
    state = dict(sharded_state)
    if common:
        state.update(common)
    dist_checkpointing.save(state, partial)
    if _rank0():
        if tokenizer_dir and os.path.isdir(tokenizer_dir):
            shutil.copytree(tokenizer_dir, os.path.join(partial, "tokenizer"))
        with open(os.path.join(partial, META_FILE), "w") as f:
            json.dump(dict(meta, format=FORMAT), f, indent=2)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(partial, path)
    _barrier()


def save_model(chunks: list, model: ModelConfig, path: str, *, source: str = "",
               tokenizer_dir: Optional[str] = None) -> None:
    """Saves model weights only (what ``--load`` and HF export read)."""
    atomic_save(path, sharded_model_state(chunks), {"model": model.to_dict(), "source": source},
                tokenizer_dir=tokenizer_dir)


def load_model(chunks: list, path: str) -> None:
    """Loads a checkpoint's weights into this rank's chunks, whatever layout it was saved at."""
    from megatron.core import dist_checkpointing

    read_meta(path)
    state = dist_checkpointing.load(sharded_model_state(chunks), path)
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(state[f"model{i}"], strict=True)


def tokenizer_dir(path: str) -> Optional[str]:
    """The tokenizer files saved with a checkpoint, if any."""
    d = os.path.join(path, "tokenizer")
    return d if os.path.isdir(d) else None


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype from its HF config name ('bfloat16', 'float32', ...)."""
    return getattr(torch, name.replace("torch.", ""))
