"""What every HF conversion (``convert.py``, ``full_import.py``, ``lora_export.py``) does around
its output: the one-rank process group, ``OUT.partial`` committed by one rename, the tokenizer-side
files carried along, the progress bar and the dtype an export writes.

It sits below the three so that each uses these without importing another.
"""

import contextlib
import os
import shutil
from typing import Optional

import torch.distributed as dist

from megasimpo import atomic
from megasimpo.checkpoint_meta import read_meta
from megasimpo.config import ModelConfig

# Files of an HF model directory that travel with the checkpoint (CKPT/tokenizer/): tokenizer,
# chat templates, generation defaults, and the original config.json (export keeps its extra fields).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                   "generation_config.json", "chat_template.json", "chat_template.jinja",
                   "config.json")
TOKENIZER_DIRS = ("additional_chat_templates",)
EXPORT_DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}  # export --dtype


@contextlib.contextmanager
def single_process_group():
    """dist_checkpointing needs a process group: a private one-rank gloo group unless one exists."""
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ValueError("convert_hf runs as a single process; start it without torchrun")
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def begin(out: str, force: bool, source: str) -> str:
    """Checks ``out`` and returns a fresh ``out.partial`` to write into."""
    out = out.rstrip("/")
    atomic.check_out_not_over_input(out, source, "the input")  # --force would delete it
    if os.path.lexists(out) and not force:
        raise ValueError(f"{out} already exists; pass --force to replace it")
    partial = out + ".partial"
    atomic.delete(partial)
    os.makedirs(partial)
    return partial


def commit(partial: str, out: str) -> None:
    """Publishes ``partial`` as ``out`` by one rename."""
    atomic.replace_dir(partial, out.rstrip("/"))  # an old --out goes only once this is in place


def copy_tokenizer(src: str, dst: str, skip: tuple = ()) -> None:
    """Copies the tokenizer-side files present in ``src`` to ``dst``."""
    for name in TOKENIZER_FILES + TOKENIZER_DIRS:
        path = os.path.join(src, name)
        if name in skip or not os.path.exists(path):
            continue
        os.makedirs(dst, exist_ok=True)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(dst, name))
        else:
            shutil.copyfile(path, os.path.join(dst, name))


def progress(total: int, desc: str, enabled: bool):
    """A tqdm bar counting tensors (hidden unless ``enabled``)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)


def export_dtype(ckpt: str, model: ModelConfig, dtype: Optional[str]) -> str:
    """The HF name of the dtype ``export`` writes: ``dtype`` (``--dtype``: bf16, fp32, fp16) when
    given, else the one the checkpoint's ``megasimpo.json`` records its weights in
    (``weights_dtype``: float32 after an fp32 run, a LoRA checkpoint's adapters' dtype), else,
    for checkpoints saved before that was recorded, the model's (``model.dtype``, as before)."""
    if dtype is not None:
        if dtype not in EXPORT_DTYPES:
            raise ValueError(f"--dtype {dtype!r} must be one of {', '.join(EXPORT_DTYPES)}")
        return EXPORT_DTYPES[dtype]
    return read_meta(ckpt).get("weights_dtype") or model.dtype
