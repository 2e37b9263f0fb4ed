"""LoRA adapters on Megatron-Core's tensor-parallel linear layers, sharded like the layer they adapt.

An adapter adds ``alpha / r * B A x`` to a projection's output; the base weights are frozen
(``requires_grad=False``), so Megatron DDP and the distributed optimizer hold gradients, fp32 main
weights and Adam moments of the adapters only. Targets, by Megatron name:

* column-parallel ``linear_qkv`` and ``linear_fc1`` (output split over TP): ``A`` [r, in] is
  replicated, ``B`` [out/tp, r] is split like the output. ``A x`` is formed where the input is:
  under sequence parallelism on this rank's slice of the sequence, and only the small [s, b, r]
  result is all-gathered (backward: reduce-scattered, which sums the parts each rank's ``B`` shard
  adds), so no full-sequence input is kept for backward; ``A``'s gradient then covers this rank's
  slice and is summed over TP by ``finalize_model_grads`` (``A`` is marked ``sequence_parallel``).
  Without SP the input is whole on every rank and ``A x``'s gradient is all-reduced over TP;
* row-parallel ``linear_proj`` and ``linear_fc2`` (input split over TP): ``A`` [r, in/tp] is split
  like the input, its partial products are all-reduced (reduce-scattered over the sequence under
  SP), and ``B`` [out, r] is replicated; under SP each rank's ``B`` gradient covers its slice of
  the sequence, so ``B`` is marked ``sequence_parallel`` and ``finalize_model_grads`` sums it
  over TP, as it does for norm weights.

An adapter is a sibling of its projection (``self_attention.linear_qkv_lora`` next to
``self_attention.linear_qkv``) called from a forward hook on it, so the base layer's forward and
checkpoint keys are untouched; its ``sharded_state_dict`` shards ``A``/``B`` as above (``B`` of the
gated ``linear_fc1`` as the checkpoint stores fc1: all gate rows, then all up rows), so adapter
checkpoints reshard to any layout. ``A`` is drawn from a generator seeded by (seed, layer, target)
over its global shape and then sliced, so every layout starts from the same adapters; ``B`` starts
at zero, so step 0 is the base model exactly.

Per-projection targets (PEFT's layout, ``lora_targets``: ``q_proj`` ... ``up_proj``) put a
:class:`SplitAdapter` next to the fused projection instead: one column adapter per member, each
with its own ``A`` and its ``B`` split over TP as the member's rows are (q, k and v rows of this
rank's query groups; gate and up rows of this rank's slice), whose outputs are laid out as this
rank's fused output (QKV interleaved per local query group, ``hf.mapping.qkv_to_mcore``; fc1 gate
then up). A member that is not a target adds zeros.

On a mixture-of-experts model only the attention projections are targets
(``lora_targets.check_model``: its MLPs are routed experts). Its attention is not split over
expert parallelism, so the adapters are sharded as in a dense model; its checkpoint keys are per
layer (``decoder.layers.{i}.``), which Megatron's block passes as the prefix with no layer
offset, so :meth:`LoraAdapter.sharded_state_dict` serves both key layouts unchanged.
"""

import contextlib
import math
import zlib

import torch
import torch.nn.functional as F

from megasimpo import lora_targets
from megasimpo.config import LoraConfig

COLUMN_TARGETS = lora_targets.COLUMN  # fused column projections and the per-projection members
ROW_TARGETS = ("linear_proj", "linear_fc2")
SUFFIX = "_lora"  # the adapter of ``linear_qkv`` is the sibling ``linear_qkv_lora``


def _global_a(rank: int, fan_in: int, seed: int, layer: int, target: str) -> torch.Tensor:
    """[r, fan_in] fp32: kaiming-uniform(a=sqrt 5) as ``nn.Linear`` and PEFT draw ``lora_A``,
    from a generator that depends only on (seed, layer, target)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{layer}/{target}".encode()))
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(rank, fan_in, generator=g, dtype=torch.float64) * 2 - 1).mul_(bound).float()


class LoraAdapter(torch.nn.Module):
    """The adapter of one projection ``base`` (a Megatron Column/RowParallelLinear, or TE's)."""

    def __init__(self, base, target: str, cfg: LoraConfig, *, tp_group, layer: int, seed: int,
                 gated: bool = False, out_features: int = 0):
        super().__init__()
        self.target, self.column, self.gated = target, target in COLUMN_TARGETS, gated
        self.config = cfg
        self.tp_group = tp_group if tp_group is not None else getattr(base, "tp_group", None)
        tp_group = self.tp_group
        self.tp = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
        tp_rank = torch.distributed.get_rank(tp_group) if tp_group is not None else 0
        self.sequence_parallel = bool(getattr(base, "sequence_parallel", False)) and self.tp > 1
        self.scale = cfg.scale
        self.dropout = torch.nn.Dropout(cfg.dropout) if cfg.dropout else torch.nn.Identity()
        self.norm = base if hasattr(base, "layer_norm_weight") else None  # TE's fused norm+linear
        weight = base.weight
        dtype, device = weight.dtype, weight.device
        out_local, in_local = weight.shape
        if out_features:  # a per-projection member: its rows of the fused (column) output
            out_local = out_features // self.tp
        r = cfg.rank
        if self.column:
            full_a = _global_a(r, in_local, seed, layer, target)
            b_shape = (out_local, r)
        else:
            full_a = _global_a(r, in_local * self.tp, seed, layer, target)
            full_a = full_a[:, tp_rank * in_local:(tp_rank + 1) * in_local]
            b_shape = (out_local, r)
        self.lora_a = torch.nn.Parameter(full_a.to(device=device, dtype=dtype).contiguous())
        self.lora_b = torch.nn.Parameter(torch.zeros(b_shape, device=device, dtype=dtype))
        # Which tensor is split over TP, for Megatron's grad-norm (a split tensor counts on every
        # rank, a replicated one once) and its optimizer: column B on dim 0, row A on dim 1.
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        set_tensor_model_parallel_attributes(self.lora_b, self.column and self.tp > 1, 0, 1)
        set_tensor_model_parallel_attributes(self.lora_a, not self.column and self.tp > 1, 1, 1)
        if self.sequence_parallel:  # its gradient covers this rank's part of the sequence:
            (self.lora_b if not self.column else self.lora_a).sequence_parallel = True
            # finalize_model_grads sums it over TP, as it does for the norm weights
        self.enabled = True

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        """The input of TE's fused norm + linear after its RMSNorm (what its GEMM sees)."""
        w = self.norm.layer_norm_weight
        if getattr(self.norm, "zero_centered_gamma", False):
            w = w + 1
        return F.rms_norm(x, (x.shape[-1],), w, self.norm.eps)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the projection's GEMM sees of its input ``x`` (after TE's fused norm, if any)."""
        return self._normed(x) if self.column and self.norm is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: the projection's input ([s(/tp), b, in(/tp)]); returns the delta of its output."""
        return self.delta(self.inputs(x))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * B A x`` of the GEMM's input ``x`` (:meth:`inputs`)."""
        from megatron.core.tensor_parallel import mappings

        if self.column:
            a = F.linear(self.dropout(x), self.lora_a)
            if self.sequence_parallel:  # [s/tp, b, r] -> [s, b, r]; backward sums B's parts
                a = mappings.gather_from_sequence_parallel_region(a, group=self.tp_group)
            elif self.tp > 1:  # backward: all-reduce (each rank's B shard adds its part)
                a = mappings.copy_to_tensor_model_parallel_region(a, group=self.tp_group)
        else:
            a = F.linear(self.dropout(x), self.lora_a)
            if self.tp > 1 and self.sequence_parallel:
                a = mappings.reduce_scatter_to_sequence_parallel_region(a, group=self.tp_group)
            elif self.tp > 1:
                a = mappings.reduce_from_tensor_model_parallel_region(a, group=self.tp_group)
        return F.linear(a, self.lora_b) * self.scale

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """``A``/``B`` as ShardedTensors: TP axis 0 of column ``B``, axis 1 of row ``A``, the rest
        replicated; the gated fc1's ``B`` through Megatron's swiglu factory (gate rows, up rows)."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import (ensure_metadata_has_dp_cp_group,
                                                     make_sharded_tensors_for_checkpoint)

        # The DP (x CP) group sets each replica's id: without it every DP rank would claim to
        # be the main replica of the same shard, which dist_checkpointing rejects.
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        axis = {"lora_b": 0} if self.column else {"lora_a": 1}
        state = {"lora_a": self.lora_a, "lora_b": self.lora_b}
        out = make_sharded_tensors_for_checkpoint(state, prefix, axis, sharded_offsets,
                                                  tp_group=self.tp_group,
                                                  dp_cp_group=metadata["dp_cp_group"])
        if self.gated:
            key = f"{prefix}lora_b"
            out[key] = apply_swiglu_sharded_factory(out[key], sharded_offsets)
        return out


class SplitAdapter(torch.nn.Module):
    """The per-projection adapters of one fused column projection ``base`` (``linear_qkv``:
    q/k/v, ``linear_fc1``: gate/up): the targeted members of ``cfg.targets``, each a column
    :class:`LoraAdapter` over its rows (global widths ``widths``, member -> out features)."""

    def __init__(self, base, projection: str, cfg: LoraConfig, *, tp_group, layer: int,
                 seed: int, widths: dict, groups: int):
        super().__init__()
        self.projection, self.config = projection, cfg
        self.members = lora_targets.SPLIT[projection]
        self.parts = torch.nn.ModuleDict({
            m: LoraAdapter(base, m, cfg, tp_group=tp_group, layer=layer, seed=seed,
                           out_features=widths[m])
            for m in lora_targets.members(projection, cfg.targets)})
        first = next(iter(self.parts.values()))
        self.tp = first.tp
        self.local = {m: widths[m] // self.tp for m in self.members}  # this rank's rows of each
        self.groups = groups // self.tp  # query groups on this rank (QKV's interleave unit)

    @property
    def enabled(self) -> bool:
        """Whether any member adds its delta (``disabled`` switches them all)."""
        return any(p.enabled for p in self.parts.values())

    def assemble(self, outs: list) -> torch.Tensor:
        """The members' outputs (last dim: each member's local rows) -> this rank's fused
        output rows: QKV interleaved per local query group, fc1 gate then up."""
        from megasimpo.hf.mapping import qkv_to_mcore

        if self.projection == "linear_qkv":
            return qkv_to_mcore(*(o.movedim(-1, 0) for o in outs), self.groups).movedim(0, -1)
        return torch.cat(outs, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: the projection's input; returns the delta of its (local, fused) output."""
        x = next(iter(self.parts.values())).inputs(x)  # TE's fused norm once for all members
        outs = {m: p.delta(x) for m, p in self.parts.items() if p.enabled}
        ref = next(iter(outs.values()))
        return self.assemble([outs[m] if m in outs else ref.new_zeros(*ref.shape[:-1],
                                                                      self.local[m])
                              for m in self.members])

    @torch.no_grad()
    def weight_delta(self) -> torch.Tensor:
        """``scale * B A`` of every member as the fused weight's local rows [out, in] (fp32)."""
        ref = next(iter(self.parts.values())).lora_a
        rows = [(self.parts[m].lora_b.float() @ self.parts[m].lora_a.float()
                 * self.parts[m].scale) if m in self.parts
                else ref.new_zeros(self.local[m], ref.shape[1], dtype=torch.float32)
                for m in self.members]
        return self.assemble([r.t() for r in rows]).t()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Each member's ``A``/``B`` under ``{prefix}parts.{member}.`` (B split on axis 0)."""
        out = {}
        for m, part in self.parts.items():
            out.update(part.sharded_state_dict(f"{prefix}parts.{m}.", sharded_offsets, metadata))
        return out


def _hook(adapter: LoraAdapter):
    def add_delta(module, args, output):
        if not adapter.enabled:
            return output
        out, bias = output
        return out + adapter(args[0]).to(out.dtype), bias
    return add_delta


def _targets(layer):
    """(parent module, attribute name) of each projection of a TransformerLayer."""
    return {"linear_qkv": (layer.self_attention, "linear_qkv"),
            "linear_proj": (layer.self_attention, "linear_proj"),
            "linear_fc1": (layer.mlp, "linear_fc1"),
            "linear_fc2": (layer.mlp, "linear_fc2")}


def check_fits(cfg: LoraConfig, model) -> None:
    """ValueError when a target does not exist in ``model`` (an MLP target of a
    mixture-of-experts model: ``lora_targets.check_model``) or the rank exceeds a target's width
    (in or out features), naming it."""
    from megasimpo.shapes import layer_shapes

    lora_targets.check_model(cfg.targets, model)
    shapes = layer_shapes(model)
    for target in cfg.targets:
        n_in, n_out = lora_targets.gemm(shapes, target)
        if cfg.rank > min(n_in, n_out):
            raise ValueError(f"--lora-rank {cfg.rank} exceeds {target}'s width ({n_in} in, "
                             f"{n_out} out): use a rank <= {min(n_in, n_out)}")


def apply(chunks: list, cfg: LoraConfig, *, seed: int, tp_group=None) -> list:
    """Freezes every parameter of ``chunks`` (unwrapped GPTModels) and adds the adapters of
    ``cfg.targets`` to each transformer layer (TP group: each projection's own, unless given);
    returns ``chunks``."""
    if adapters(chunks):
        raise ValueError("this model already has LoRA adapters")
    for chunk in chunks:
        for p in chunk.parameters():
            p.requires_grad_(False)
        c = chunk.config
        gated, d = c.gated_linear_unit, c.kv_channels
        widths = {"q_proj": c.num_attention_heads * d, "k_proj": c.num_query_groups * d,
                  "v_proj": c.num_query_groups * d, "gate_proj": c.ffn_hidden_size,
                  "up_proj": c.ffn_hidden_size}
        for layer in chunk.decoder.layers:
            for target, (parent, name) in _targets(layer).items():
                if not lora_targets.members(target, cfg.targets):
                    continue  # (an MoE layer's mlp has no linear_fc1: never looked up)
                base = getattr(parent, name, None)
                if base is None:
                    raise ValueError(f"layer {layer.layer_number} has no {target} to adapt "
                                     f"(its MLP is routed experts). {lora_targets.MOE_FIX}")
                if lora_targets.is_split(cfg.targets, target):
                    adapter = SplitAdapter(base, target, cfg, tp_group=tp_group,
                                           layer=layer.layer_number, seed=seed, widths=widths,
                                           groups=c.num_query_groups)
                else:
                    adapter = LoraAdapter(base, target, cfg, tp_group=tp_group,
                                          layer=layer.layer_number, seed=seed,
                                          gated=gated and target == "linear_fc1")
                parent.add_module(name + SUFFIX, adapter)
                base.register_forward_hook(_hook(adapter))
    return chunks


def adapters(chunks: list) -> list:
    """Every LoraAdapter of ``chunks`` (wrapped or not)."""
    return [m for c in chunks for m in c.modules() if isinstance(m, LoraAdapter)]


@contextlib.contextmanager
def disabled(chunks: list):
    """Within the block the model is its base (adapters add nothing): the live reference of
    DPO/IPO/R-DPO with LoRA, with no second copy of the weights."""
    found = adapters(chunks)
    for a in found:
        a.enabled = False
    try:
        yield
    finally:
        for a in found:
            a.enabled = True


def parameter_counts(chunks: list) -> tuple:
    """(trainable, total) parameters of this rank's chunks."""
    params = [p for c in chunks for p in c.parameters()]
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@torch.no_grad()
def merge_(chunks: list) -> None:
    """Adds ``scale * B A`` into each adapted base weight and removes nothing: for exports at
    TP=1 (``B A`` is then the whole delta); the adapters are switched off afterwards."""
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            for target, (parent, name) in _targets(layer).items():
                adapter = getattr(parent, name + SUFFIX, None)
                if adapter is None:
                    continue
                if adapter.tp != 1:
                    raise ValueError("merging LoRA adapters needs the model at TP=1")
                base = getattr(parent, name)
                if isinstance(adapter, SplitAdapter):
                    delta = adapter.weight_delta()
                    for part in adapter.parts.values():
                        part.enabled = False
                else:
                    delta = adapter.lora_b.float() @ adapter.lora_a.float() * adapter.scale
                    adapter.enabled = False
                base.weight.add_(delta.to(base.weight.dtype))
