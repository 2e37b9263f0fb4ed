"""Layer specs and attention backends: Transformer Engine, PyTorch SDPA, Megatron's unfused.

``--attention-backend``:

* ``te``: Transformer Engine's layer spec (fused norms + linears, cuDNN/flash attention, FP8);
* ``sdpa``: Megatron's local (pure PyTorch) spec with :class:`SdpaAttention`, a core attention
  on ``torch.nn.functional.scaled_dot_product_attention`` (flash / cuDNN / memory-efficient
  kernels on GPU, the fused flash kernel on CPU): no [b, heads, s, s] score matrix is kept;
  context parallelism by K/V all-gather (``parallel/cp_attention.py``);
* ``unfused``: the local spec with Megatron's own ``DotProductAttention`` (baddbmm + softmax +
  bmm: the score matrix is materialised and saved for backward); no context parallelism;
* ``auto`` (default): ``te`` when Transformer Engine imports on a GPU, else ``sdpa``.

The local spec's norms (:class:`TorchRMSNorm`) and SwiGLU come from ``local_kernels.py``: they save
for backward what fused GPU kernels save. The norm supports sequence parallelism: under SP
a norm sees only this rank's [s/tp, b, h] slice, so its weight gradient is partial; marking the
weight ``sequence_parallel`` makes Megatron's ``finalize_model_grads`` all-reduce it over TP (as
it does for TE's and apex's norms). Both local variants save the TE spec's checkpoint keys.
"""

import copy
import functools
import inspect
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F

from megasimpo.config import ATTENTION_BACKENDS
from megasimpo.local_kernels import SwiGLU, rms_norm
from megasimpo.parallel.cp_attention import context_parallel_attention


def have_te() -> bool:
    """Whether Transformer Engine's PyTorch extension imports here, on a CUDA device."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a TE core without a loadable torch extension
        return False
    return torch.cuda.is_available()


def resolve_attention_backend(requested: Optional[str] = None) -> str:
    """``auto``/None -> ``te`` or ``sdpa``; ValueError for an unknown or unusable backend."""
    requested = requested or "auto"
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention-backend {requested!r} is not one of "
                         + ", ".join(ATTENTION_BACKENDS))
    if requested == "auto":
        return "te" if have_te() else "sdpa"
    if requested == "te" and not have_te():
        raise ValueError("--attention-backend te needs Transformer Engine on a CUDA GPU "
                         "(`pip install -e .[te]`); use sdpa here")
    return requested


class TorchRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built from a TransformerConfig, usable with sequence parallelism,
    computed by ``local_kernels.rms_norm`` (saves the input and 1/rms only)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps)
        # Megatron all-reduces the gradients of parameters marked so over TP under SP.
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., h] -> [..., h]."""
        return rms_norm(x, self.weight, self.eps)


def block_causal_mask(cu_seqlens: torch.Tensor, device) -> torch.Tensor:
    """[T, T] bool, True = may attend: causal inside each segment of a packed row
    (``cu_seqlens`` [n + 1] boundaries, T = cu_seqlens[-1])."""
    seg = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=device),
                                  cu_seqlens.diff().to(device).long())
    causal = torch.ones(seg.numel(), seg.numel(), dtype=torch.bool, device=device).tril()
    return causal & (seg[:, None] == seg[None, :])


def _varlen(q, k, v, params, scale: float) -> torch.Tensor:
    """THD attention on CUDA: ``torch.nn.attention.varlen.varlen_attn`` (flash), causal."""
    from torch.nn.attention.varlen import varlen_attn

    kwargs = {"scale": scale}
    names = inspect.signature(varlen_attn).parameters
    if "is_causal" in names:  # torch 2.10/2.11
        kwargs["is_causal"] = True
    else:  # later releases take a window: (-1, 0) = everything before, nothing after
        kwargs["window_size"] = (-1, 0)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in names:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    cu_q = params.cu_seqlens_q.to(torch.int32)
    cu_k = params.cu_seqlens_kv.to(torch.int32)
    return varlen_attn(q, k, v, cu_q, cu_k, int(params.max_seqlen_q), int(params.max_seqlen_kv),
                       **kwargs)


@functools.lru_cache(maxsize=None)
def _dot_product_attention():
    """The SdpaAttention class (built once: Megatron is imported only when a model is built)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class SdpaAttention(DotProductAttention):
        """Megatron core attention on ``F.scaled_dot_product_attention`` (causal, GQA).

        query [sq, b, np, hn], key/value [sk, b, ng, hn] (np/ng heads of this TP rank) ->
        [sq, b, np*hn]. Packed rows arrive in THD form ([t, np, hn], ``packed_seq_params`` with
        ``cu_seqlens``): on CUDA they go to the variable-length flash kernel, elsewhere to SDPA
        with a block-diagonal causal mask. A boolean ``attention_mask`` (True = masked, Megatron's
        convention) replaces the causal mask.

        With context parallelism (the CP group of Megatron's attention, ``pg_collection.cp``)
        each rank holds its load-balanced share of the sequence (of each packed segment) and
        attends over K and V all-gathered from the CP group (``parallel/cp_attention.py``);
        ``attention_mask`` is then ``model.context_parallel_mask``'s additive [s/cp, s] mask.
        """

        def __init__(self, config, *args, **kwargs):
            # Megatron's DotProductAttention refuses CP in its constructor (only TE had it);
            # this class brings its own, so the parent sees a copy of the config without CP.
            parent = copy.copy(config)
            parent.context_parallel_size = 1
            super().__init__(parent, *args, **kwargs)
            self.config = config
            self.cp_group = self.pg_collection.cp if config.context_parallel_size > 1 else None

        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None):
            assert attention_bias is None, "SdpaAttention takes no attention bias"
            gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
            if self.cp_group is not None:  # the mask: model.context_parallel_mask
                assert attention_mask is not None, "context parallelism needs its global mask"
                out = context_parallel_attention(query, key, value, attention_mask,
                                                 cp_group=self.cp_group, scale=self.softmax_scale)
                return out.reshape(*out.shape[:-2], self.hidden_size_per_partition)
            if packed_seq_params is not None:  # THD: [t, heads, hn]
                t = query.shape[0]
                if query.is_cuda:
                    out = _varlen(query, key, value, packed_seq_params, self.softmax_scale)
                    return out.reshape(t, -1)
                allowed = block_causal_mask(packed_seq_params.cu_seqlens_q, query.device)
                q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                                     scale=self.softmax_scale, enable_gqa=gqa)
                return out[0].transpose(0, 1).reshape(t, -1)
            sq, b = query.shape[:2]
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, hn]
            mask = None if attention_mask is None else ~attention_mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
            return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    return SdpaAttention


def block_spec(backend: str, config, vp_stage: Optional[int]):
    """The ``transformer_layer_spec`` GPTModel takes for ``backend`` ("te", "sdpa", "unfused").

    An MoE model (``config.num_moe_experts``) gets Megatron's MoE layer where
    ``config.moe_layer_freq`` (a per-layer list) says 1 and the dense layer elsewhere.
    """
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    qk_norm = bool(config.qk_layernorm)
    experts = config.num_moe_experts
    if backend == "te":
        if experts:
            return specs.get_gpt_decoder_block_spec(config, use_transformer_engine=True,
                                                    normalization="RMSNorm",
                                                    qk_layernorm=qk_norm, vp_stage=vp_stage)
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_norm)
    dense = _local_layer(backend, qk_norm, None)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    if not experts:
        layers = [dense] * num_layers
    else:
        moe = _local_layer(backend, qk_norm, experts)
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
        pattern = config.moe_layer_freq[offset:offset + num_layers]
        layers = [moe if is_moe else dense for is_moe in pattern]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=TorchRMSNorm)


def _local_layer(backend: str, qk_norm: bool, experts: Optional[int]):
    """One layer of Megatron's local spec with this module's norms, SwiGLU and core attention;
    with ``experts``, its MoE layer (SequentialMLP experts, each with the same SwiGLU). The
    checkpoint keys are the TE spec's: an MoE layer's pre-MLP norm stays ``pre_mlp_layernorm``
    (TE has no fused fc1 there to fold it into)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    layer = specs.get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False,
                                           normalization="RMSNorm", qk_layernorm=qk_norm)
    sub = layer.submodules
    attention = sub.self_attention
    if backend == "sdpa":
        attention = replace(attention, submodules=replace(
            attention.submodules, core_attention=_dot_product_attention()))
    if qk_norm:  # Qwen3: RMSNorm over each head's d channels of the queries and the keys
        attention = replace(attention, submodules=replace(
            attention.submodules, q_layernorm=TorchRMSNorm, k_layernorm=TorchRMSNorm))
    keys = dict(sub.sharded_state_dict_keys_map)
    if experts:
        expert_spec = sub.mlp.submodules.experts
        expert_spec = replace(expert_spec, submodules=replace(expert_spec.submodules,
                                                              activation_func=SwiGLU))
        mlp = replace(sub.mlp, submodules=replace(sub.mlp.submodules, experts=expert_spec))
        keys.pop("pre_mlp_layernorm.", None)
    else:
        mlp = replace(sub.mlp, submodules=replace(sub.mlp.submodules, activation_func=SwiGLU))
    return replace(layer, submodules=replace(sub, input_layernorm=TorchRMSNorm,
                                             pre_mlp_layernorm=TorchRMSNorm,
                                             self_attention=attention, mlp=mlp,
                                             sharded_state_dict_keys_map=keys))
