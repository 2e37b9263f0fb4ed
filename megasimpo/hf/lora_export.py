"""LoRA checkpoints in HF conversion: merged export, PEFT adapter export and import.

A LoRA checkpoint (megasimpo/lora_checkpoint.py) holds its adapters under the layer keys of its
model: stacked for a dense model (``decoder.layers.self_attention.linear_qkv_lora.lora_a``
[L, r, in], ``...lora_b`` [L, out, r]), per layer for a mixture-of-experts model, as its weights
(``decoder.layers.{i}.self_attention.linear_qkv_lora.lora_a`` [r, in]: ``families/moe.py``); B's
rows laid out as the adapted weight's: Megatron's interleaved QKV rows, fc1's gate rows then up
rows; a per-projection target under its projection's: ``...linear_qkv_lora.parts.q_proj.lora_a``
[r, h], ``...lora_b`` [q rows in HF order, r]. It names its base checkpoint by path and
fingerprint.

* merged export (``export_hf`` of a LoRA checkpoint): the base is streamed piece by piece as
  for any checkpoint and each adapted weight piece gets ``alpha / r * B A`` (the piece's rows of
  B; per-projection targets: each member's ``B A`` at its rows) added in fp32 before the cast to
  the model's dtype (:func:`delta`);
* ``--adapter-only``: a PEFT directory (megasimpo/hf/peft_adapter.py) in the adapters' dtype;
* ``import --adapter``: the base imported to ``CKPT/base`` and, in ``CKPT``, a LoRA checkpoint of
  the PEFT adapter referencing it, by its real path and by ``base`` relative to ``CKPT``, so
  the pair moves as one directory.
"""

import dataclasses
import itertools
import json
import os
import re
from typing import Optional

import torch

from megasimpo import atomic, checkpoint, lora_checkpoint, lora_targets, safe_load
from megasimpo.checkpoint_meta import FORMAT, read_meta
from megasimpo.config import LoraConfig, ModelConfig
from megasimpo.hf import mapping, output, peft_adapter, streaming
from megasimpo.hf.full_import import import_full
from megasimpo.lora import SUFFIX
from megasimpo.run_paths import META_FILE
from megasimpo.shapes import layer_shapes

BASE_DIR = "base"  # import --adapter: the base checkpoint inside the LoRA checkpoint
MODULES = {"linear_qkv": "self_attention.linear_qkv", "linear_proj": "self_attention.linear_proj",
           "linear_fc1": "mlp.linear_fc1", "linear_fc2": "mlp.linear_fc2"}


@dataclasses.dataclass(frozen=True)
class LoraSource:
    """A LoRA checkpoint to export: its path, its base's (None if not needed), adapters, model."""

    ckpt: str
    base: Optional[str]
    cfg: LoraConfig
    model: ModelConfig


_MODULE = re.compile(re.escape(mapping.LAYERS) + r"(?:\d+\.)?(.+)\.weight")  # stacked or per layer


def stacked(m: ModelConfig) -> bool:
    """Whether ``m``'s checkpoint stacks its layers on a leading axis of one key (dense models),
    rather than a key per layer (MoE models): as its family's pieces say."""
    return all(p.stacked for p in mapping.pieces(m) if p.layer == 0)


def adapter_key(target: str, which: str, layer: Optional[int] = None) -> str:
    """The checkpoint key of ``target``'s ``lora_a`` / ``lora_b``: stacked (``layer`` None), or
    layer ``layer``'s own."""
    projection = lora_targets.PROJECTION[target]
    part = "" if target == projection else f".parts.{target}"
    own = mapping.LAYERS if layer is None else f"{mapping.LAYERS}{layer}."
    return f"{own}{MODULES[projection]}{SUFFIX}{part}.{which}"


def _stored_layers(m: ModelConfig) -> list:
    """(layer or None, layer axis) of each adapter key family: one stacked key of L layers, or
    one key per layer without a layer axis."""
    return [(None, (m.num_layers,))] if stacked(m) else [(i, ()) for i in range(m.num_layers)]


def adapter_shapes(m: ModelConfig, target: str, rank: int) -> tuple:
    """(A, B) shapes of one layer's ``target`` adapter: [r, in], [out, r]."""
    n_in, n_out = lora_targets.gemm(layer_shapes(m), target)
    return (rank, n_in), (n_out, rank)


def source(ckpt: str, *, need_base: bool = True) -> Optional[LoraSource]:
    """The LoRA checkpoint ``ckpt`` (None for a full model); with ``need_base`` its base is
    checked (present, unchanged, not LoRA itself, the same model)."""
    meta = read_meta(ckpt)
    if lora_checkpoint.META_KEY not in meta:
        return None
    model = ModelConfig.from_dict(meta["model"])
    cfg = LoraConfig(**meta[lora_checkpoint.META_KEY])
    record = meta.get(lora_checkpoint.BASE_KEY) or {}
    if not need_base:
        return LoraSource(ckpt, lora_checkpoint.find_base(record, ckpt), cfg, model)
    base = lora_checkpoint.check_base(record, ckpt)
    if lora_checkpoint.META_KEY in read_meta(base):
        raise ValueError(f"{ckpt}: its base {base} is itself a LoRA checkpoint; export that one "
                         "merged and import it as the base")
    if checkpoint.model_config(base) != model:
        raise ValueError(f"{ckpt}: its model (megasimpo.json) differs from its base {base}'s")
    return LoraSource(ckpt, base, cfg, model)


def stored_adapters(src: LoraSource) -> dict:
    """key -> stored dtype of every adapter tensor; ValueError on a missing one or a bad shape."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(src.ckpt)
    stored = {}
    for target in src.cfg.targets:
        shapes = adapter_shapes(src.model, target, src.cfg.rank)
        for (layer, axis), (which, shape) in itertools.product(
                _stored_layers(src.model), zip(("lora_a", "lora_b"), shapes)):
            key, want = adapter_key(target, which, layer), axis + shape
            if key not in meta:
                raise ValueError(f"{key}: missing from LoRA checkpoint {src.ckpt}, whose "
                                 f"{META_FILE} lists {target} among its targets")
            if tuple(meta[key].global_shape) != want:
                raise ValueError(f"{key} in LoRA checkpoint {src.ckpt}: shape "
                                 f"{list(meta[key].global_shape)}, but its {META_FILE} "
                                 f"implies {list(want)}")
            stored[key] = meta[key].dtype
    return stored


def read_layer(src: LoraSource, layer: int, stored: dict) -> dict:
    """{target: (A, B)} of one layer, fp32 (inside a process group and ``safe_load.guard``)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    L, state = src.model.num_layers, {}
    own = None if stacked(src.model) else layer  # per-layer keys: the whole tensor
    for target in src.cfg.targets:
        for which, shape in zip(("lora_a", "lora_b"), adapter_shapes(src.model, target,
                                                                     src.cfg.rank)):
            key = adapter_key(target, which, own)
            axis, offset = ((1,), (layer,)) if own is None else ((), ())
            state[f"{target}.{which}"] = ShardedTensor(
                key=key, data=torch.empty(axis + shape, dtype=stored[key]), dtype=stored[key],
                local_shape=axis + shape, global_shape=((L,) if axis else ()) + shape,
                global_offset=offset + (0, 0), axis_fragmentations=None, replica_id=0)
    loaded = dist_checkpointing.load(state, src.ckpt, validate_access_integrity=False)
    return {t: tuple(loaded[f"{t}.{w}"].reshape(shape).float()
                     for w, shape in zip(("lora_a", "lora_b"),
                                         adapter_shapes(src.model, t, src.cfg.rank)))
            for t in src.cfg.targets}


def delta(p: mapping.Piece, adapters: dict, cfg: LoraConfig,
          m: Optional[ModelConfig] = None) -> Optional[torch.Tensor]:
    """``alpha / r * B A`` for weight piece ``p`` (fp32; B's rows of the piece), or None when
    ``p`` is not an adapted weight (``m``: the model, needed for per-projection QKV targets)."""
    module = _MODULE.fullmatch(p.key)
    target = next((t for t, mod in MODULES.items() if module and module.group(1) == mod), None)
    if target is None:
        return None
    if target in adapters:
        a, b = adapters[target]
        rows = p.shape[0]
        return (b[p.part[0] * rows:(p.part[0] + 1) * rows] @ a) * cfg.scale
    members = lora_targets.SPLIT.get(target, ())
    if not any(t in adapters for t in members):
        return None
    if target == "linear_fc1":  # piece 0: the gate rows, piece 1: the up rows
        member = members[p.part[0]]
        return adapters[member][1] @ adapters[member][0] * cfg.scale if member in adapters \
            else None
    shapes = peft_adapter.module_shapes(m)
    parts = [adapters[t][1] @ adapters[t][0] * cfg.scale if t in adapters
             else torch.zeros(shapes[t][1], shapes[t][0]) for t in members]
    return mapping.qkv_to_mcore(*parts, m.num_query_groups)


def base_name(base: Optional[str]) -> Optional[str]:
    """What the base model is called: its original config.json's ``_name_or_path``, else the HF
    directory it was imported from when that is one here, else None."""
    if base is None:
        return None
    tok = checkpoint.tokenizer_dir(base)
    try:
        with open(os.path.join(tok or base, "config.json")) as f:
            name = json.load(f).get("_name_or_path")
        if name:
            return name
    except (OSError, json.JSONDecodeError):
        pass
    src = read_meta(base).get("source")
    if src and os.path.isfile(os.path.join(src, "config.json")) and \
            not os.path.isfile(os.path.join(src, META_FILE)):
        return src
    return None


def export_adapter(ckpt: str, out: str, *, force: bool = False,
                   dtype: Optional[str] = None) -> ModelConfig:
    """Writes LoRA checkpoint ``ckpt``'s adapters as a PEFT directory ``out``, in ``dtype``
    (default: the dtype the adapters were trained and saved in, as a merged export)."""
    src = source(ckpt, need_base=False)
    if src is None:
        raise ValueError(f"--adapter-only: {ckpt} is not a LoRA checkpoint (its "
                         f"{META_FILE} has no \"lora\" entry): it holds full weights, "
                         "so there is no adapter to write; export it without --adapter-only")
    dtype = checkpoint.torch_dtype(output.export_dtype(ckpt, src.model, dtype))
    partial = output.begin(out, force, ckpt)
    try:
        tensors = {}
        with output.single_process_group(), safe_load.guard(ckpt):
            stored = stored_adapters(src)
            for layer in range(src.model.num_layers):
                tensors.update(peft_adapter.to_peft(layer, read_layer(src, layer, stored),
                                                    src.model, dtype))
        peft_adapter.write(partial, src.cfg, base_name(src.base), tensors)
        output.commit(partial, out)
    except BaseException:
        atomic.delete(partial)
        raise
    return src.model


def _save_adapters(path: str, m: ModelConfig, cfg: LoraConfig, adapters: dict,
                   dtype: torch.dtype) -> None:
    """Writes ``adapters`` ({(layer, target): (A, B)}) as a LoRA checkpoint's tensors under the
    model's layer keys (:func:`stacked`) in the blocks Megatron's own save uses (fc1's B: gate
    rows, up rows), into the empty ``path``, with
    the converter's streaming save (no CUDA calls, unlike Megatron's file writer)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    L, state, data, stack = m.num_layers, {}, {}, stacked(m)
    for (layer, target), (a, b) in adapters.items():
        blocks = [("lora_a", a, None)]
        if target == "linear_fc1":  # as apply_swiglu_sharded_factory stores it
            blocks += [("lora_b", part, (int(stack), i, 2)) for i, part in enumerate(b.chunk(2))]
        else:
            blocks.append(("lora_b", b, None))
        for which, t, split in blocks:  # stacked: layer axis 0 prepended; else a key per layer
            offsets = ([(0, layer, L)] if stack else []) + ([split] if split else [])
            sh = ShardedTensor.from_rank_offsets(
                adapter_key(target, which, None if stack else layer),
                torch.empty(t.shape, dtype=dtype, device="meta"),
                *offsets, replica_id=0, prepend_axis_num=int(stack))
            state[f"t{len(state)}"] = sh
            data[(sh.key, tuple(sh.global_offset))] = t.to(dtype).contiguous()

    def produce(sh) -> torch.Tensor:
        return data[(sh.key, tuple(sh.global_offset))]

    dist_checkpointing.save(state, path, sharded_strategy=streaming.streaming_strategy(produce))


def import_adapter(hf_dir: str, adapter_dir: str, out: str, *, force: bool = False,
                   progress: bool = True, ignore_base_name: bool = False) -> ModelConfig:
    """HF base ``hf_dir`` + PEFT adapter ``adapter_dir`` -> LoRA checkpoint ``out`` with the base
    imported to ``out/base``. The adapter is checked against the base before anything is written."""
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ValueError(f"--hf {hf_dir}: not an HF model directory (no config.json)")
    model = ModelConfig.from_hf(hf_dir)
    cfg, adapters, dtype, raw = peft_adapter.read(adapter_dir, model, hf_dir=hf_dir)
    if not ignore_base_name:
        peft_adapter.check_base_name(raw, hf_dir, adapter_dir)
    atomic.check_out_not_over_input(out, adapter_dir, "--adapter")
    partial = output.begin(out, force, hf_dir)
    try:
        with output.single_process_group():  # first: Megatron's save wants an empty directory
            _save_adapters(partial, model, cfg, adapters, dtype)
        base_partial = os.path.join(partial, BASE_DIR)
        model = import_full(hf_dir, base_partial, progress=progress)  # checks the weights
        output.copy_tokenizer(hf_dir, os.path.join(partial, "tokenizer"))
        record = lora_checkpoint.located(  # relative "base": CKPT and CKPT/base move together
            {"path": os.path.join(os.path.realpath(out.rstrip("/")), BASE_DIR),
             "fingerprint": lora_checkpoint.base_fingerprint(base_partial)}, out)
        lora = lora_checkpoint.config_record(cfg)
        with open(os.path.join(partial, META_FILE), "w") as f:
            json.dump({"format": FORMAT, "model": model.to_dict(),
                       "source": os.path.abspath(adapter_dir), lora_checkpoint.META_KEY: lora,
                       lora_checkpoint.BASE_KEY: record}, f, indent=2)
        output.commit(partial, out)
    except BaseException:
        atomic.delete(partial)
        raise
    return model
