"""Qwen3-MoE (``Qwen3MoeForCausalLM``: Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (q/k
norms, no biases) with routed experts: ``num_experts`` (transformers 5 writes
``num_local_experts``) SwiGLU experts of width ``moe_intermediate_size``, top
``num_experts_per_tok`` of a softmax, renormalised when ``norm_topk_prob``; no shared expert.
Layer i has a dense MLP of width ``intermediate_size`` when it is in ``mlp_only_layers`` or
``(i + 1) % decoder_sparse_step != 0`` (transformers' rule). HF names:
``mlp.gate.weight`` and ``mlp.experts.{e}.{gate,up,down}_proj.weight``.
"""

from megasimpo.families.moe import MoeFamily
from megasimpo.families.qwen3 import Qwen3


class Qwen3Moe(MoeFamily, Qwen3):
    """``Qwen3MoeForCausalLM``."""

    architecture = "Qwen3MoeForCausalLM"
    model_type = "qwen3_moe"

    def moe_fields(self, hf: dict, source: str) -> dict:
        """Experts, top-k, widths and the dense layers, as transformers reads them."""
        experts = hf.get("num_experts", hf.get("num_local_experts"))
        if not experts:
            raise ValueError(f"{source}: missing field 'num_experts' (a Qwen3MoeForCausalLM "
                             "needs its expert count)")
        layers = int(hf["num_hidden_layers"])
        step = int(hf.get("decoder_sparse_step", 1) or 1)
        only = set(hf.get("mlp_only_layers") or ())
        bad = sorted(i for i in only if not 0 <= int(i) < layers)
        if bad:
            raise ValueError(f"{source}: mlp_only_layers {bad} are not layers of the "
                             f"{layers}-layer model")
        dense = tuple(i for i in range(layers) if i in only or (i + 1) % step)
        return {"num_experts": int(experts),
                "experts_per_token": int(hf.get("num_experts_per_tok", 0)),
                "moe_ffn_hidden_size": int(hf.get("moe_intermediate_size") or 0),
                "moe_norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
                "dense_layers": dense}

    def hf_config_fields(self, m) -> dict:
        """Qwen3-MoE's expert fields; dense layers as ``mlp_only_layers`` (step 1)."""
        return dict(super().hf_config_fields(m), num_experts=m.num_experts,
                    num_experts_per_tok=m.experts_per_token,
                    moe_intermediate_size=m.moe_ffn_hidden_size,
                    norm_topk_prob=m.moe_norm_topk_prob, decoder_sparse_step=1,
                    mlp_only_layers=list(m.dense_layers))


QWEN3_MOE = Qwen3Moe()
