"""What a model family is: the one place that knows an HF architecture.

A :class:`Family` says, for one HF ``architectures[0]`` (and its ``model_type``):

- **config**: which ``ModelConfig`` fields its ``config.json`` sets beyond the generic ones
  (``config_fields``), and what it refuses (MoE fields under a dense name, output/MLP biases);
  what an exported ``config.json`` must say about it (``hf_config_fields``);
- **layer spec**: the Megatron ``TransformerConfig`` switches its layers need (``spec_flags``:
  QKV bias, q/k norms), which ``model.transformer_config`` passes on and ``layer_spec`` reads;
- **HF tensor names**: the checkpoint pieces of a layer (``layer_pieces``) and of the embedding,
  final norm and output layer (``outer_pieces``), with how fused QKV (kind ``"qkv"``) and
  gate/up (two row blocks of fc1) are split and joined;
- **arithmetic**: the fields of ``shapes.LayerShapes`` (``shape_fields``), from which the
  parameter count, the memory model and the FLOP count all derive.

The base class is the dense GQA SwiGLU decoder in the Llama layout (RMSNorm, RoPE, no linear
biases); a family overrides only what differs. Pure Python: no torch, no other megasimpo module
(``shapes``, ``model_config``, ``hf.mapping`` and ``model`` ask a family; it asks none of them).
Families are looked up in ``families/registry.py``.
"""

from dataclasses import dataclass
from typing import Optional

LAYERS = "decoder.layers."  # the stacked per-layer keys of a GPTModel checkpoint
# config.json fields that mean a mixture-of-experts MLP (refused by every dense family).
MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")
# A layer's GEMM modules with an ``_extra_state`` in the checkpoint.
EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv",
                       "mlp.linear_fc1", "mlp.linear_fc2")


@dataclass(frozen=True)
class Piece:
    """One stored block of a checkpoint tensor and the HF tensors it is made from.

    ``part = (i, n)``: the piece is row block i of n equal blocks of the (per-layer) tensor.
    ``stacked``: the key holds every layer on a leading axis (dense models); False for the
    per-layer keys (``decoder.layers.{i}.``) Megatron uses when layers differ (MoE models).
    ``expert = (e, E)``: block e of the E experts' axis that follows the layer axis.
    """

    key: str  # sharded key in the checkpoint
    layer: Optional[int]  # the layer (position on the stacked axis); None for non-layer tensors
    shape: tuple  # the piece, without the layer and expert axes
    hf: tuple  # HF tensor names, in the order ``hf.mapping.to_mcore`` takes them
    kind: str = "copy"  # "copy" | "qkv" | "vocab"
    part: tuple = (0, 1)
    stacked: bool = True
    expert: Optional[tuple] = None

    def prepended(self, num_layers: int) -> list:
        """``(axis, index, size)`` of each axis the checkpoint tensor has before the piece's own:
        the stacked layer axis, then the expert axis."""
        out = []
        if self.layer is not None and self.stacked:
            out.append((0, self.layer, num_layers))
        if self.expert is not None:
            out.append((len(out), *self.expert))
        return out


class Family:
    """A dense GQA SwiGLU decoder in the Llama layout; subclasses set what their family fixes."""

    architecture: str = ""  # HF architectures[0] this family claims
    model_type: str = ""  # HF model_type written on export (and looked up when architectures is absent)
    qkv_bias: bool = False  # every model of the family has Q/K/V biases (Qwen2)
    qk_norm: bool = False  # every model has an RMSNorm on each head's queries and keys (Qwen3)
    # Whether config.json's attention_bias / mlp_bias are tolerated (read as the family's fixed
    # biases) instead of refused as biases the GPTModel here does not have.
    allows_bias_fields: bool = False
    # Whether sliding_window counts only with use_sliding_window: true (Qwen's configs carry a
    # window they do not use); otherwise any sliding_window given is the model's (Mistral).
    window_needs_flag: bool = False
    moe: bool = False  # the family's MLPs are routed experts (``families/moe.py``)
    # HF names outside the layers.
    embedding: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"

    def __repr__(self) -> str:
        return f"<family {self.architecture}>"

    # ----- config.json ---------------------------------------------------------------------

    def config_fields(self, hf: dict, source: str) -> dict:
        """The family's ``ModelConfig`` fields from the parsed ``config.json`` (``source`` names
        it in errors): QKV bias, q/k norms, the sliding window. Refuses what it cannot build."""
        for key in () if self.moe else MOE_FIELDS:
            if (hf.get(key) or 0) > 1:
                raise ValueError(f"{source}: {key}={hf[key]}: mixture-of-experts MLPs are not "
                                 f"supported (only dense {self.architecture} models are)")
        if not self.allows_bias_fields:
            for key in ("attention_bias", "mlp_bias"):
                if hf.get(key):
                    raise ValueError(f"{source}: {key}=true (biases on the output/MLP projections) "
                                     "is not supported: Megatron's GPTModel here has no such "
                                     "biases")
        window = hf.get("sliding_window")
        if self.window_needs_flag and not hf.get("use_sliding_window", False):
            window = None
        return {"qkv_bias": self.qkv_bias, "qk_norm": self.qk_norm,
                "sliding_window": int(window) if window else None}

    def hf_config_fields(self, m) -> dict:
        """What an exported ``config.json`` says about the family (beyond the generic shape,
        RoPE and dtype fields ``hf.mapping.hf_config`` writes for every model)."""
        return {"architectures": [self.architecture], "model_type": self.model_type}

    # ----- layer spec ----------------------------------------------------------------------

    def spec_flags(self, m) -> dict:
        """``TransformerConfig`` fields the family's layers need (``layer_spec.block_spec`` reads
        ``qk_layernorm`` to put its norms in)."""
        # qk_layernorm also makes finalize_model_grads sum the norms' grads over TP.
        return {"add_qkv_bias": m.qkv_bias, "qk_layernorm": m.qk_norm}

    # ----- arithmetic ----------------------------------------------------------------------

    def shape_fields(self, m, layer: int = 0) -> dict:
        """Keyword arguments of ``shapes.LayerShapes`` for layer ``layer`` of ``m``."""
        return {"hidden": m.hidden_size, "q": m.num_attention_heads * m.head_dim,
                "kv": 2 * m.num_query_groups * m.head_dim, "ffn": m.ffn_hidden_size,
                "qkv_bias": m.qkv_bias, "head_dim": m.head_dim, "qk_norm": m.qk_norm}

    # ----- HF tensor names -----------------------------------------------------------------

    def layer_prefix(self, i: int) -> str:
        """HF name prefix of layer ``i``."""
        return f"model.layers.{i}."

    def layer_pieces(self, m, i: int) -> list:
        """Checkpoint pieces of layer ``i`` (``hf.mapping``'s docstring draws them)."""
        h, f, d = m.hidden_size, m.ffn_hidden_size, m.head_dim
        qkv_rows = (m.num_attention_heads + 2 * m.num_query_groups) * d
        p = self.layer_prefix(i)
        a = p + "self_attn."
        out = [
            Piece(LAYERS + "self_attention.linear_qkv.layer_norm_weight", i, (h,),
                  (p + "input_layernorm.weight",)),
            Piece(LAYERS + "self_attention.linear_qkv.weight", i, (qkv_rows, h),
                  (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), "qkv"),
        ]
        if m.qkv_bias:
            out.append(Piece(LAYERS + "self_attention.linear_qkv.bias", i, (qkv_rows,),
                             (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"), "qkv"))
        if m.qk_norm:
            out += [Piece(LAYERS + f"self_attention.{x}_layernorm.weight", i, (d,),
                          (a + f"{x}_norm.weight",)) for x in ("q", "k")]
        out += [
            Piece(LAYERS + "self_attention.linear_proj.weight", i, (h, m.num_attention_heads * d),
                  (a + "o_proj.weight",)),
            Piece(LAYERS + "mlp.linear_fc1.layer_norm_weight", i, (h,),
                  (p + "post_attention_layernorm.weight",)),
            # Two row blocks, exactly as Megatron's SwiGLU sharded factory stores them.
            Piece(LAYERS + "mlp.linear_fc1.weight", i, (f, h), (p + "mlp.gate_proj.weight",),
                  part=(0, 2)),
            Piece(LAYERS + "mlp.linear_fc1.weight", i, (f, h), (p + "mlp.up_proj.weight",),
                  part=(1, 2)),
            Piece(LAYERS + "mlp.linear_fc2.weight", i, (h, f), (p + "mlp.down_proj.weight",)),
        ]
        return out

    def extra_states(self, m) -> list:
        """``(key, global shape, offset)`` of each ``_extra_state`` object a checkpoint holds
        (Megatron's per-module FP8 metadata; None without FP8): one per layer and GEMM module."""
        L = m.num_layers
        return [(LAYERS + mod + "._extra_state", (L,), (i,)) for mod in EXTRA_STATE_MODULES
                for i in range(L)]

    def outer_pieces(self, m, padded_vocab: int) -> tuple:
        """(head, tail): the embedding's pieces, and the final norm's and output layer's."""
        h = m.hidden_size
        head = [Piece("embedding.word_embeddings.weight", None, (padded_vocab, h),
                      (self.embedding,), "vocab")]
        tail = [Piece("decoder.final_layernorm.weight", None, (h,), (self.final_norm,))]
        if not m.tie_word_embeddings:
            tail.append(Piece("output_layer.weight", None, (padded_vocab, h), (self.lm_head,),
                              "vocab"))
        return head, tail
