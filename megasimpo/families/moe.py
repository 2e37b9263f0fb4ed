"""What the mixture-of-experts families share: routed SwiGLU experts in Megatron-Core's MoE layer.

An MoE layer replaces the dense MLP by a router (a [E, h] linear, softmax over the E experts,
top-k per token, dropless) and E SwiGLU experts of width ``moe_ffn_hidden_size``; some families
keep a dense MLP on chosen layers (``ModelConfig.dense_layers``). Megatron-Core builds these layers
from ``moe_layer_freq`` given as a per-layer list, and a model whose layers differ stores each
layer under its own key (``decoder.layers.{i}.``, not a stacked axis), the experts on an expert
axis (``mlp.experts.experts.linear_fc1.weight`` [E, 2F, h], fc1 as gate and up row blocks as in
a dense layer). Every MoE model here is built with the list form, so every MoE checkpoint uses
per-layer keys whether or not it has dense layers.

A subclass names its HF tensors (``router``, ``expert_prefix``, ``expert_names``) and reads its
``config.json`` (``moe_fields``).
"""

from dataclasses import replace

from megasimpo.families.base import EXTRA_STATE_MODULES, LAYERS, Family, Piece


class MoeFamily(Family):
    """A decoder in the Llama layout whose MLPs are routed SwiGLU experts."""

    moe = True
    router = "mlp.gate.weight"  # HF name under the layer prefix
    expert_prefix = "mlp.experts.{e}."  # HF prefix of expert e under the layer prefix
    expert_names = ("gate_proj", "up_proj", "down_proj")  # HF (gate, up, down) projections

    def moe_fields(self, hf: dict, source: str) -> dict:
        """The ``ModelConfig`` MoE fields from ``config.json``: ``num_experts``,
        ``experts_per_token``, ``moe_ffn_hidden_size``, ``moe_norm_topk_prob``, ``dense_layers``."""
        raise NotImplementedError

    def config_fields(self, hf: dict, source: str) -> dict:
        """The dense fields of the base family and the MoE fields, checked."""
        fields = dict(super().config_fields(hf, source), **self.moe_fields(hf, source))
        e, k = fields["num_experts"], fields["experts_per_token"]
        if not 1 <= k <= e:
            raise ValueError(f"{source}: num_experts_per_tok={k} must be between 1 and the "
                             f"{e} experts")
        return fields

    def spec_flags(self, m) -> dict:
        """The dense switches plus Megatron's MoE fields: E experts of width F, top-k of a
        softmax (renormalised over the k unless ``moe_norm_topk_prob`` is false: Megatron's
        ``moe_router_pre_softmax``), the per-layer MoE/dense list."""
        return dict(super().spec_flags(m), num_moe_experts=m.num_experts,
                    moe_router_topk=m.experts_per_token,
                    moe_ffn_hidden_size=m.moe_ffn_hidden_size,
                    moe_router_pre_softmax=not m.moe_norm_topk_prob,
                    moe_layer_freq=[0 if i in m.dense_layers else 1
                                    for i in range(m.num_layers)])

    def shape_fields(self, m, layer: int = 0) -> dict:
        """A dense layer's fields, and for an MoE layer its experts, top-k and expert width."""
        fields = super().shape_fields(m, layer)
        if layer in m.dense_layers:
            return fields
        return dict(fields, experts=m.num_experts, topk=m.experts_per_token,
                    expert_ffn=m.moe_ffn_hidden_size)

    def layer_pieces(self, m, i: int) -> list:
        """Attention pieces as in a dense layer, then the dense MLP (``dense_layers``) or the
        pre-MLP norm, the router and each expert's fc1 (gate, up) and fc2, all under
        ``decoder.layers.{i}.``."""
        own = f"decoder.layers.{i}."
        dense = [replace(p, key=p.key.replace(LAYERS, own), stacked=False)
                 for p in super().layer_pieces(m, i)]
        if i in m.dense_layers:
            return dense
        out = [p for p in dense if ".mlp." not in p.key]
        h, f, n = m.hidden_size, m.moe_ffn_hidden_size, m.num_experts
        p = self.layer_prefix(i)
        gate, up, down = self.expert_names
        out += [Piece(own + "pre_mlp_layernorm.weight", i, (h,),
                      (p + "post_attention_layernorm.weight",), stacked=False),
                Piece(own + "mlp.router.weight", i, (n, h), (p + self.router,), stacked=False)]
        key = own + "mlp.experts.experts."
        for e in range(n):
            x = p + self.expert_prefix.format(e=e)
            out += [Piece(key + "linear_fc1.weight", i, (f, h), (x + gate + ".weight",),
                          part=(0, 2), stacked=False, expert=(e, n)),
                    Piece(key + "linear_fc1.weight", i, (f, h), (x + up + ".weight",),
                          part=(1, 2), stacked=False, expert=(e, n)),
                    Piece(key + "linear_fc2.weight", i, (h, f), (x + down + ".weight",),
                          stacked=False, expert=(e, n))]
        return out

    def extra_states(self, m) -> list:
        """Per layer: one object per attention (and dense MLP) module; the experts' fc1 and fc2
        one per expert on their expert axis."""
        out = []
        for i in range(m.num_layers):
            own = f"decoder.layers.{i}."
            dense = i in m.dense_layers
            out += [(own + mod + "._extra_state", (1,), (0,)) for mod in EXTRA_STATE_MODULES
                    if dense or not mod.startswith("mlp.")]
            if not dense:
                out += [(own + f"mlp.experts.experts.linear_fc{j}._extra_state", (m.num_experts,),
                         (e,)) for j in (1, 2) for e in range(m.num_experts)]
        return out
