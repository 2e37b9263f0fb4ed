"""HF tensors <-> Megatron-Core GPTModel checkpoint tensors: names, shapes, layouts.

Pure functions, no I/O and no process group. The HF names are the model's family's
(``Family.layer_pieces`` / ``outer_pieces``, ``megasimpo/families/``); this module holds what all
families share: the piece order, the QKV interleaving, the vocabulary padding and config.json.
The Megatron side is the *checkpoint* layout (sharded keys, layers stacked on a leading axis),
which is independent of TP/PP: dist_checkpointing reshards on load. A checkpoint tensor is
written and read as one or more :class:`Piece` s (checkpoint key [shape] <- HF tensors of layer
i, ``model.layers.{i}.``, in the Llama layout that Llama, Mistral, Qwen2 and Qwen3 share):

  embedding.word_embeddings.weight [v_pad, h]   <- model.embed_tokens.weight + zero padding rows
  decoder.layers.
    self_attention.linear_qkv.layer_norm_weight [L, h]   <- input_layernorm.weight
    self_attention.linear_qkv.weight [L, (nq + 2 nkv) d, h]  <- self_attn.{q,k,v}_proj.weight,
                                                             interleaved per KV group
    self_attention.linear_qkv.bias   [L, (nq + 2 nkv) d]     <- self_attn.{q,k,v}_proj.bias (Qwen2)
    self_attention.{q,k}_layernorm.weight [L, d]     <- self_attn.{q,k}_norm.weight (Qwen3)
    self_attention.linear_proj.weight [L, h, nq d]   <- self_attn.o_proj.weight
    mlp.linear_fc1.layer_norm_weight  [L, h]         <- post_attention_layernorm.weight
    mlp.linear_fc1.weight             [L, 2f, h]     <- mlp.gate_proj (rows :f), mlp.up_proj (f:)
    mlp.linear_fc2.weight             [L, h, f]      <- mlp.down_proj.weight
  decoder.final_layernorm.weight      [h]            <- model.norm.weight
  output_layer.weight                 [v_pad, h]     <- lm_head.weight (untied models only)

(The local layer spec stores its norms under the TE fused names above, so both specs share keys.)
"""

from typing import Optional

import torch

from megasimpo.config import ModelConfig
from megasimpo.families.base import LAYERS, Piece  # noqa: F401 (Piece: convert's, lora_export's)
from megasimpo.families.registry import family_of
from megasimpo.shapes import padded_vocab_size

# HF buffers some older checkpoints carry that are recomputed, never learned.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def pieces(m: ModelConfig) -> list:
    """Every checkpoint piece of the model: embedding, layer 0 .. L-1, final norm, output."""
    return [p for group in piece_groups(m) for p in group]


def piece_groups(m: ModelConfig) -> list:
    """Pieces in groups that export loads together (embedding, one group per layer, the rest)."""
    family = family_of(m)
    head, tail = family.outer_pieces(m, padded_vocab_size(m.vocab_size))
    return [head] + [family.layer_pieces(m, i) for i in range(m.num_layers)] + [tail]


def hf_shapes(m: ModelConfig) -> dict:
    """Name -> shape of every HF tensor the model needs (what the safetensors files must hold)."""
    h, d = m.hidden_size, m.head_dim
    shapes = {}
    for p in pieces(m):
        if p.kind == "qkv":
            tail = p.shape[1:]
            q, kv = m.num_attention_heads * d, m.num_query_groups * d
            for name, rows in zip(p.hf, (q, kv, kv)):
                shapes[name] = (rows,) + tail
        elif p.kind == "vocab":
            shapes[p.hf[0]] = (m.vocab_size, h)
        else:
            shapes[p.hf[0]] = p.shape
    return shapes


def is_ignored(name: str, m: ModelConfig) -> bool:
    """HF tensors that are present in some checkpoints but carry nothing to convert."""
    if name.endswith(IGNORED_SUFFIXES):
        return True
    # A tied model may still store lm_head (a copy of the embedding); the embedding wins.
    return m.tie_word_embeddings and name == family_of(m).lm_head


def qkv_to_mcore(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 num_query_groups: int) -> torch.Tensor:
    """HF q [nq d, ...], k/v [nkv d, ...] -> Megatron fused QKV [(nq + 2 nkv) d, ...].

    Megatron interleaves per KV group g: the group's nq/nkv query heads, then k_g, then v_g.
    """
    tail = q.shape[1:]
    g = num_query_groups
    return torch.cat([q.reshape(g, -1, *tail), k.reshape(g, -1, *tail), v.reshape(g, -1, *tail)],
                     dim=1).reshape(-1, *tail)


def qkv_from_mcore(qkv: torch.Tensor, num_heads: int, num_query_groups: int,
                   head_dim: int) -> tuple:
    """Inverse of :func:`qkv_to_mcore`: [(nq + 2 nkv) d, ...] -> (q, k, v), each contiguous."""
    tail = qkv.shape[1:]
    g = num_query_groups
    per_group = num_heads // g * head_dim
    x = qkv.reshape(g, per_group + 2 * head_dim, *tail)
    q, k, v = x.split([per_group, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *tail).clone() for t in (q, k, v))


def pad_vocab(t: torch.Tensor, rows: int) -> torch.Tensor:
    """[v, h] -> [rows, h] with zero rows appended (the padding never scores)."""
    out = t.new_zeros((rows,) + tuple(t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def to_mcore(p: Piece, hf: list, m: ModelConfig) -> torch.Tensor:
    """The checkpoint block ``p`` from its HF tensors (in ``p.hf`` order)."""
    if p.kind == "qkv":
        return qkv_to_mcore(*hf, m.num_query_groups)
    if p.kind == "vocab":
        return pad_vocab(hf[0], p.shape[0])
    return hf[0]


def to_hf(p: Piece, t: torch.Tensor, m: ModelConfig) -> dict:
    """Inverse of :func:`to_mcore`: HF name -> tensor (vocab padding rows dropped)."""
    if p.kind == "qkv":
        return dict(zip(p.hf, qkv_from_mcore(t, m.num_attention_heads, m.num_query_groups,
                                             m.head_dim)))
    if p.kind == "vocab":
        return {p.hf[0]: t[: m.vocab_size].clone()}
    return {p.hf[0]: t}


# Fields hf_config rewrites; anything else of the original config.json (token ids, Mistral's
# sliding_window, initializer_range, ...) is kept as it was.
_REWRITTEN = ("rope_scaling", "rope_parameters", "rope_theta", "torch_dtype", "dtype")


def hf_config(m: ModelConfig, base: Optional[dict] = None) -> dict:
    """config.json for ``m``: ``base`` (the original HF config when known) with every field the
    architecture depends on rewritten from ``m``.

    RoPE is written in the style of ``base`` (transformers 5 ``rope_parameters`` or the
    ``rope_theta`` + ``rope_scaling`` pair that every version reads); the dtype under both
    ``dtype`` (transformers >= 4.56) and ``torch_dtype`` (older versions).
    """
    cfg = dict(base or {})
    v5_rope = "rope_parameters" in cfg
    for k in _REWRITTEN:
        cfg.pop(k, None)
    cfg.update(
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups,
        vocab_size=m.vocab_size,
        max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_word_embeddings,
        hidden_act="silu",
        dtype=m.dtype,
        torch_dtype=m.dtype,
    )
    if cfg.get("head_dim") is not None or m.head_dim != m.hidden_size // m.num_attention_heads:
        cfg["head_dim"] = m.head_dim
    cfg.update(family_of(m).hf_config_fields(m))  # architectures, model_type, family switches
    scaling = None
    if m.rope_scaling is not None:
        s = m.rope_scaling
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_position_embeddings}
    if v5_rope:
        cfg["rope_parameters"] = dict(scaling or {"rope_type": "default"}, rope_theta=m.rope_theta)
    else:
        cfg["rope_theta"] = m.rope_theta
        cfg["rope_scaling"] = scaling
    return dict(sorted(cfg.items()))
