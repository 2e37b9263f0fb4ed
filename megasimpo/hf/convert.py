"""HF safetensors <-> megasimpo checkpoints (Megatron dist_checkpointing), streamed by tensor.

Import (``megasimpo/hf/full_import.py``) never holds the model: each tensor block is read from
safetensors, converted and written only when the checkpoint writer reaches it.

Export loads one layer at a time with ``dist_checkpointing.load`` of a subset of sharded tensors
(the checkpoint may be saved at any TP/PP layout; DCP reshards on read) and writes safetensors
shards of at most ``max_shard_size`` bytes.

A LoRA checkpoint or a PEFT adapter goes through ``megasimpo/hf/lora_export.py``, which this
module dispatches to (it never imports this one). Outputs go to ``OUT.partial`` and are committed
by one rename (``megasimpo/hf/output.py``), so an interrupted conversion never leaves something
that looks complete.
"""

import contextlib
import dataclasses
import json
import os
from typing import Optional

import torch

from megasimpo import atomic, checkpoint, safe_load
from megasimpo.checkpoint_meta import read_meta
from megasimpo.config import ModelConfig
from megasimpo.hf import lora_export, mapping, output
from megasimpo.hf.full_import import import_full
from megasimpo.run_paths import META_FILE

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def import_hf(hf_dir: str, out: str, *, force: bool = False, progress: bool = True,
              adapter: Optional[str] = None, ignore_base_name: bool = False) -> ModelConfig:
    """Converts an HF Llama/Mistral/Qwen2 directory (config.json + safetensors) to a checkpoint.

    Validates the config and every tensor's presence and shape before writing anything; raises
    ValueError naming the tensor and file on a mismatch. Tensors are stored in config.json's dtype
    (the weights' own when the config names none). Returns the model's ModelConfig. With
    ``adapter`` (a PEFT LoRA directory over ``hf_dir``): a LoRA checkpoint, the base in
    ``out/base`` (megasimpo/hf/lora_export.py).
    """
    if adapter is not None:
        return lora_export.import_adapter(hf_dir, adapter, out, force=force, progress=progress,
                                          ignore_base_name=ignore_base_name)
    return import_full(hf_dir, out, force=force, progress=progress)


class _ShardWriter:
    """Collects tensors into safetensors files of at most ``max_bytes`` (a bigger tensor alone)."""

    def __init__(self, out_dir: str, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending, self.pending_bytes, self.files, self.weight_map = {}, 0, [], {}

    def add(self, name: str, t: torch.Tensor) -> None:
        if t.untyped_storage().nbytes() != t.nbytes:  # safetensors refuses shared storage
            t = t.clone()
        nbytes = t.nbytes
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"shard-{len(self.files)}.tmp"
        save_file(self.pending, os.path.join(self.out_dir, name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self, total_bytes: int) -> None:
        """Writes the last file, names the files as HF does, and the index if there are several."""
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        for i, (tmp, names) in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, tmp), os.path.join(self.out_dir, final))
            self.weight_map.update({k: final for k in names})
        if n > 1:
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total_bytes},
                           "weight_map": dict(sorted(self.weight_map.items()))}, f, indent=2)


def _stored_tensors(ckpt: str, model: ModelConfig) -> dict:
    """key -> stored dtype of every tensor the model needs; shapes checked against its config."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(ckpt)
    stored = {}
    for p in mapping.pieces(model):
        if p.key not in meta:
            raise ValueError(f"{p.key}: missing from checkpoint {ckpt}")
        shape = tuple(meta[p.key].global_shape)
        want = tuple(size for _, _, size in p.prepended(model.num_layers)) \
            + (p.part[1] * p.shape[0],) + tuple(p.shape[1:])
        if shape != want:
            raise ValueError(f"{p.key} in checkpoint {ckpt}: shape {list(shape)} does not match "
                             f"its {META_FILE}, which implies {list(want)}")
        stored[p.key] = meta[p.key].dtype
    return stored


def _read_target(p: mapping.Piece, model: ModelConfig, dtype: torch.dtype):
    """A ShardedTensor that reads piece ``p`` alone from a checkpoint.

    Layer (and expert) pieces are [1, ...] blocks at their layer's (expert's) offset with no
    sharding grid: with a grid, Megatron would describe the other layers' blocks as held by other
    ranks, which a one-rank world cannot express.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    rows = p.shape[0]
    shape, offset, full = p.shape, (p.part[0] * rows,) + (0,) * (len(p.shape) - 1), \
        (p.part[1] * rows,) + tuple(p.shape[1:])
    axes = p.prepended(model.num_layers)
    shape = (1,) * len(axes) + tuple(shape)
    offset = tuple(i for _, i, _ in axes) + offset
    full = tuple(n for _, _, n in axes) + full
    return ShardedTensor(key=p.key, data=torch.empty(shape, dtype=dtype), dtype=dtype,
                         local_shape=shape, global_shape=full, global_offset=offset,
                         axis_fragmentations=None, replica_id=0)


def _note_unrecorded(ckpt: str, chosen: str, stored: dict) -> None:
    """One line when a checkpoint recording no ``weights_dtype`` stores another dtype than the
    one it is exported in (an fp32 run saved before the dtype was recorded)."""
    kinds = sorted({str(t).replace("torch.", "") for t in stored.values()} - {chosen})
    if kinds and "weights_dtype" not in read_meta(ckpt):
        print(f"convert_hf: note: {ckpt} stores {'/'.join(kinds)} weights but records no "
              f"weights_dtype (saved by an older megasimpo): exporting {chosen}, its model's "
              "dtype; pass --dtype to choose", flush=True)


def export_hf(ckpt: str, out: str, *, force: bool = False,
              max_shard_size: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
              adapter_only: bool = False, dtype: Optional[str] = None) -> ModelConfig:
    """Converts a checkpoint saved at any layout to an HF directory loadable by transformers.

    Weights are written in ``export_dtype`` (by default the dtype the checkpoint records for its
    weights: an fp32-trained model exports as fp32, bit for bit; ``dtype`` "bf16" rounds it), and
    config.json's ``dtype``/``torch_dtype`` say that dtype. Vocabulary padding rows are dropped;
    config.json is regenerated from the ModelConfig over the original config.json (kept in
    CKPT/tokenizer/ by import) and the tokenizer files copied back. A LoRA checkpoint exports
    merged (its base's weights + alpha/r B A), or with ``adapter_only`` as a PEFT adapter
    directory (megasimpo/hf/lora_export.py). Returns the ModelConfig as exported.
    """
    if adapter_only:
        return lora_export.export_adapter(ckpt, out, force=force, dtype=dtype)
    if max_shard_size <= 0:
        raise ValueError(f"--max-shard-size {max_shard_size} must be positive")
    model = checkpoint.model_config(ckpt)
    model = dataclasses.replace(model, dtype=output.export_dtype(ckpt, model, dtype))
    lora = lora_export.source(ckpt)
    weights = lora.base if lora else ckpt  # where the (base) weights are
    from megatron.core import dist_checkpointing

    dtype = checkpoint.torch_dtype(model.dtype)
    groups = mapping.piece_groups(model)
    partial = output.begin(out, force, ckpt)
    try:
        writer, total = _ShardWriter(partial, max_shard_size), 0
        with output.single_process_group(), safe_load.guard(ckpt), \
                (safe_load.guard(weights) if lora else contextlib.nullcontext()):
            stored = _stored_tensors(weights, model)
            adapters_stored = lora_export.stored_adapters(lora) if lora else None
            _note_unrecorded(ckpt, model.dtype, adapters_stored or stored)
            bar = output.progress(sum(len(g) for g in groups), "export", progress)
            for group in groups:
                state = {f"piece{n}": _read_target(p, model, stored[p.key])
                         for n, p in enumerate(group)}
                # Only this group's blocks: the access-integrity check wants the whole model.
                loaded = dist_checkpointing.load(state, weights, validate_access_integrity=False)
                layer = group[0].layer
                adapters = lora_export.read_layer(lora, layer, adapters_stored) \
                    if lora and layer is not None else {}
                for n, p in enumerate(group):
                    block = loaded[f"piece{n}"].view(p.shape)
                    add = lora_export.delta(p, adapters, lora.cfg, lora.model) if adapters else None
                    block = (block.float() + add if add is not None else block).to(dtype)
                    for name, t in mapping.to_hf(p, block, model).items():
                        writer.add(name, t)
                        total += t.nbytes
                    bar.update()
                del loaded, state
            bar.close()
        writer.close(total)
        tok = checkpoint.tokenizer_dir(ckpt) or checkpoint.tokenizer_dir(weights)
        base = None
        if tok and os.path.isfile(os.path.join(tok, "config.json")):
            with open(os.path.join(tok, "config.json")) as f:
                base = json.load(f)
        if tok:
            output.copy_tokenizer(tok, partial, skip=("config.json",))
        with open(os.path.join(partial, "config.json"), "w") as f:
            json.dump(mapping.hf_config(model, base), f, indent=2)
        output.commit(partial, out)
    except BaseException:
        atomic.delete(partial)
        raise
    return model


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1e9' or a plain byte count -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = str(text).strip().upper()
    num = s.rstrip("KMGTIB")
    try:
        value = int(float(num) * units[s[len(num):].strip()])
    except (KeyError, ValueError):
        raise ValueError(f"--max-shard-size {text!r}: expected bytes or a size like 5GB, 500MB") \
            from None
    if value <= 0:
        raise ValueError(f"--max-shard-size {text!r} must be positive")
    return value
