"""Streamed import of a full HF model (config.json + safetensors, no adapter) to a checkpoint.

Import never holds the model: each tensor block is read from safetensors, converted and written
only when the checkpoint writer reaches it (``megasimpo/hf/streaming.py``), so peak memory is a
few of the largest tensors, not the model. ``convert.import_hf`` dispatches here, and
``lora_export.import_adapter`` imports its base with it.
"""

import dataclasses
import json
import os

import torch

from megasimpo import atomic, checkpoint
from megasimpo.checkpoint_meta import FORMAT
from megasimpo.config import ModelConfig
from megasimpo.hf import mapping, output, streaming
from megasimpo.run_paths import META_FILE

SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
               "F16": torch.float16}


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
            if self.dtype[name] not in SAFE_DTYPES:
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


def import_full(hf_dir: str, out: str, *, force: bool = False,
                progress: bool = True) -> ModelConfig:
    """Converts an HF Llama/Mistral/Qwen2 directory (config.json + safetensors) to a checkpoint.

    Validates the config and every tensor's presence and shape before writing anything; raises
    ValueError naming the tensor and file on a mismatch. Tensors are stored in config.json's dtype
    (the weights' own when the config names none). Returns the model's ModelConfig.
    """
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ValueError(f"--hf {hf_dir}: not an HF model directory (no config.json)")
    model = ModelConfig.from_hf(hf_dir)
    with open(os.path.join(hf_dir, "config.json")) as f:
        raw = json.load(f)
    weights = HFWeights(hf_dir)
    weights.check(model)
    if not (raw.get("torch_dtype") or raw.get("dtype")):  # the weights say what they are
        stored = weights.dtype["model.embed_tokens.weight"]
        model = dataclasses.replace(model, dtype=str(SAFE_DTYPES[stored]).replace("torch.", ""))
    dtype = checkpoint.torch_dtype(model.dtype)
    partial = output.begin(out, force, hf_dir)
    try:
        state, where = streaming.sharded_state(model, dtype)
        bar = output.progress(len(where), "import", progress)
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

        with output.single_process_group():
            try:
                dist_checkpointing.save(state, partial,
                                        sharded_strategy=streaming.streaming_strategy(produce))
            except BaseException:  # DCP's CheckpointException derives from BaseException
                if failures:  # it wraps the error that stopped the writer: report that one
                    raise failures[0] from None
                raise
        bar.close()
        output.copy_tokenizer(hf_dir, os.path.join(partial, "tokenizer"))
        with open(os.path.join(partial, META_FILE), "w") as f:
            json.dump({"format": FORMAT, "model": model.to_dict(),
                       "source": os.path.abspath(hf_dir), "weights_dtype": model.dtype}, f,
                      indent=2)
        output.commit(partial, out)
    except BaseException:
        atomic.delete(partial)
        raise
    return model
