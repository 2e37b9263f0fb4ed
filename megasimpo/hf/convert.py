"""HF safetensors <-> megasimpo checkpoints (Megatron dist_checkpointing), streamed by tensor.

Import never holds the model: each tensor block is read from safetensors, converted and written
only when the checkpoint writer reaches it (``megasimpo/hf/streaming.py``), so peak memory is a
few of the largest tensors, not the model.

Export loads one layer at a time with ``dist_checkpointing.load`` of a subset of sharded tensors
(the checkpoint may be saved at any TP/PP layout; DCP reshards on read) and writes safetensors
shards of at most ``max_shard_size`` bytes.

Outputs go to ``OUT.partial`` and are committed by one rename, so an interrupted conversion never
leaves something that looks complete.
"""

import contextlib
import dataclasses
import json
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from megasimpo import atomic, checkpoint, safe_load
from megasimpo.config import ModelConfig
from megasimpo.hf import mapping, streaming

# Files of an HF model directory that travel with the checkpoint (CKPT/tokenizer/): tokenizer,
# chat templates, generation defaults, and the original config.json (export keeps its extra fields).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                   "generation_config.json", "chat_template.json", "chat_template.jinja",
                   "config.json")
TOKENIZER_DIRS = ("additional_chat_templates",)
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
                "F16": torch.float16}
EXPORT_DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}  # export --dtype


# ----- reading HF weights --------------------------------------------------------------------

class HFWeights:
    """The tensors of an HF model directory: where each lives, its shape and dtype (from the
    safetensors headers, checked up front), read one at a time on request."""

    def __init__(self, hf_dir: str):
        from safetensors import SafetensorError, safe_open

        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        listed = None
        if os.path.isfile(index):
            with open(index) as f:
                try:
                    listed = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise ValueError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(listed.values()))
            for name in files:
                if not os.path.isfile(os.path.join(hf_dir, name)):
                    holds = sorted(k for k, v in listed.items() if v == name)
                    raise ValueError(f"{os.path.join(hf_dir, name)}: shard listed in {index} is "
                                     f"missing (it holds {holds[0]} and {len(holds) - 1} more)")
        elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise ValueError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json "
                             "(only safetensors weights are supported)")
        self.file_of, self.shape, self.dtype = {}, {}, {}
        for name in files:
            path = os.path.join(hf_dir, name)
            try:
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        self.file_of[key] = path
                        self.shape[key] = tuple(sl.get_shape())
                        self.dtype[key] = sl.get_dtype()
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{path}: truncated or not a safetensors file ({e})") from None
        for key, name in (listed or {}).items():
            if self.file_of.get(key) != os.path.join(hf_dir, name):
                raise ValueError(f"{key}: {index} places it in {name}, which does not hold it")

    def check(self, model: ModelConfig) -> None:
        """Every tensor the config implies is present with its shape; nothing unknown is left."""
        expected = mapping.hf_shapes(model)
        for name, shape in expected.items():
            if name not in self.shape:
                raise ValueError(f"{name}: missing from the weights in {self.hf_dir} "
                                 f"(config.json implies it, shape {list(shape)})")
            if self.shape[name] != tuple(shape):
                raise ValueError(f"{name} in {self.file_of[name]}: shape {list(self.shape[name])} "
                                 f"does not match config.json, which implies {list(shape)}")
            if self.dtype[name] not in _SAFE_DTYPES:
                raise ValueError(f"{name} in {self.file_of[name]}: dtype {self.dtype[name]} "
                                 "is not a floating point type this converter reads")
        extra = [n for n in self.shape if n not in expected and not mapping.is_ignored(n, model)]
        if extra:
            raise ValueError(f"{extra[0]} in {self.file_of[extra[0]]}: not part of a "
                             f"{model.architecture} as converted here ({len(extra)} such tensors; "
                             "biases on o_proj or the MLP are not supported)")

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read now (the file is opened for this read only, so no mapping lingers)."""
        from safetensors import SafetensorError, safe_open

        path = self.file_of[name]
        try:
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{name} in {path}: cannot be read ({e})") from None


# ----- import / export -----------------------------------------------------------------------

@contextlib.contextmanager
def _single_process_group():
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


def _begin(out: str, force: bool, source: str) -> str:
    """Checks ``out`` and returns a fresh ``out.partial`` to write into."""
    out = out.rstrip("/")
    atomic.check_out_not_over_input(out, source, "the input")  # --force would delete it
    if os.path.lexists(out) and not force:
        raise ValueError(f"{out} already exists; pass --force to replace it")
    partial = out + ".partial"
    atomic.delete(partial)
    os.makedirs(partial)
    return partial


def _commit(partial: str, out: str) -> None:
    atomic.replace_dir(partial, out.rstrip("/"))  # an old --out goes only once this is in place


def _copy_tokenizer(src: str, dst: str, skip: tuple = ()) -> None:
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


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)


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
        from megasimpo.hf import lora_export

        return lora_export.import_adapter(hf_dir, adapter, out, force=force, progress=progress,
                                          ignore_base_name=ignore_base_name)
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ValueError(f"--hf {hf_dir}: not an HF model directory (no config.json)")
    model = ModelConfig.from_hf(hf_dir)
    with open(os.path.join(hf_dir, "config.json")) as f:
        raw = json.load(f)
    weights = HFWeights(hf_dir)
    weights.check(model)
    if not (raw.get("torch_dtype") or raw.get("dtype")):  # the weights say what they are
        stored = weights.dtype["model.embed_tokens.weight"]
        model = dataclasses.replace(model, dtype=str(_SAFE_DTYPES[stored]).replace("torch.", ""))
    dtype = checkpoint.torch_dtype(model.dtype)
    partial = _begin(out, force, hf_dir)
    try:
        state, where = streaming.sharded_state(model, dtype)
        bar = _progress(len(where), "import", progress)
        failures = []

        def produce(sh) -> torch.Tensor:
            try:
                p = where[(sh.key, tuple(sh.global_offset))]
                t = mapping.to_mcore(p, [weights.read(n).to(dtype) for n in p.hf], model)
            except BaseException as e:
                failures.append(e)
                raise
            bar.update()
            return t

        from megatron.core import dist_checkpointing

        with _single_process_group():
            try:
                dist_checkpointing.save(state, partial,
                                        sharded_strategy=streaming.streaming_strategy(produce))
            except BaseException:  # DCP's CheckpointException derives from BaseException
                if failures:  # it wraps the error that stopped the writer: report that one
                    raise failures[0] from None
                raise
        bar.close()
        _copy_tokenizer(hf_dir, os.path.join(partial, "tokenizer"))
        with open(os.path.join(partial, checkpoint.META_FILE), "w") as f:
            json.dump({"format": checkpoint.FORMAT, "model": model.to_dict(),
                       "source": os.path.abspath(hf_dir), "weights_dtype": model.dtype}, f,
                      indent=2)
        _commit(partial, out)
    except BaseException:
        atomic.delete(partial)
        raise
    return model


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
        want = ((model.num_layers,) if p.layer is not None else ()) + (p.part[1] * p.shape[0],) \
            + tuple(p.shape[1:])
        if shape != want:
            raise ValueError(f"{p.key} in checkpoint {ckpt}: shape {list(shape)} does not match "
                             f"its {checkpoint.META_FILE}, which implies {list(want)}")
        stored[p.key] = meta[p.key].dtype
    return stored


def _read_target(p: mapping.Piece, model: ModelConfig, dtype: torch.dtype):
    """A ShardedTensor that reads piece ``p`` alone from a checkpoint.

    Layer pieces are [1, ...] blocks at their layer's offset with no sharding grid: with a grid,
    Megatron would describe the other layers' blocks as held by other ranks, which a one-rank
    world cannot express.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    rows = p.shape[0]
    shape, offset, full = p.shape, (p.part[0] * rows,) + (0,) * (len(p.shape) - 1), \
        (p.part[1] * rows,) + tuple(p.shape[1:])
    if p.layer is not None:
        shape, offset, full = (1,) + shape, (p.layer,) + offset, (model.num_layers,) + full
    return ShardedTensor(key=p.key, data=torch.empty(shape, dtype=dtype), dtype=dtype,
                         local_shape=shape, global_shape=full, global_offset=offset,
                         axis_fragmentations=None, replica_id=0)


def export_dtype(ckpt: str, model: ModelConfig, dtype: Optional[str]) -> str:
    """The HF name of the dtype ``export`` writes: ``dtype`` (``--dtype``: bf16, fp32, fp16) when
    given, else the one the checkpoint's ``megasimpo.json`` records its weights in
    (``weights_dtype``: float32 after an fp32 run, a LoRA checkpoint's adapters' dtype), else,
    for checkpoints saved before that was recorded, the model's (``model.dtype``, as before)."""
    if dtype is not None:
        if dtype not in EXPORT_DTYPES:
            raise ValueError(f"--dtype {dtype!r} must be one of {', '.join(EXPORT_DTYPES)}")
        return EXPORT_DTYPES[dtype]
    return checkpoint.read_meta(ckpt).get("weights_dtype") or model.dtype


def _note_unrecorded(ckpt: str, chosen: str, stored: dict) -> None:
    """One line when a checkpoint recording no ``weights_dtype`` stores another dtype than the
    one it is exported in (an fp32 run saved before the dtype was recorded)."""
    kinds = sorted({str(t).replace("torch.", "") for t in stored.values()} - {chosen})
    if kinds and "weights_dtype" not in checkpoint.read_meta(ckpt):
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
    from megasimpo.hf import lora_export

    if adapter_only:
        return lora_export.export_adapter(ckpt, out, force=force, dtype=dtype)
    if max_shard_size <= 0:
        raise ValueError(f"--max-shard-size {max_shard_size} must be positive")
    model = checkpoint.model_config(ckpt)
    model = dataclasses.replace(model, dtype=export_dtype(ckpt, model, dtype))
    lora = lora_export.source(ckpt)
    weights = lora.base if lora else ckpt  # where the (base) weights are
    from megatron.core import dist_checkpointing

    dtype = checkpoint.torch_dtype(model.dtype)
    groups = mapping.piece_groups(model)
    partial = _begin(out, force, ckpt)
    try:
        writer, total = _ShardWriter(partial, max_shard_size), 0
        with _single_process_group(), safe_load.guard(ckpt), \
                (safe_load.guard(weights) if lora else contextlib.nullcontext()):
            stored = _stored_tensors(weights, model)
            adapters_stored = lora_export.stored_adapters(lora) if lora else None
            _note_unrecorded(ckpt, model.dtype, adapters_stored or stored)
            bar = _progress(sum(len(g) for g in groups), "export", progress)
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
            _copy_tokenizer(tok, partial, skip=("config.json",))
        with open(os.path.join(partial, "config.json"), "w") as f:
            json.dump(mapping.hf_config(model, base), f, indent=2)
        _commit(partial, out)
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
