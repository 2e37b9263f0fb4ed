"""Mixtral (``MixtralForCausalLM``: 8x7B, 8x22B): Mistral's attention (its ``sliding_window`` is
the model's window) with ``num_local_experts`` SwiGLU experts of width ``intermediate_size`` in
every layer, top ``num_experts_per_tok`` of a softmax, renormalised. HF names:
``block_sparse_moe.gate.weight`` and ``block_sparse_moe.experts.{e}.{w1,w3,w2}.weight``
(gate, up, down). Router jitter noise (a training-time perturbation) is refused.
"""

from megasimpo.families.moe import MoeFamily


class Mixtral(MoeFamily):
    """``MixtralForCausalLM``."""

    architecture = "MixtralForCausalLM"
    model_type = "mixtral"
    router = "block_sparse_moe.gate.weight"
    expert_prefix = "block_sparse_moe.experts.{e}."
    expert_names = ("w1", "w3", "w2")

    def moe_fields(self, hf: dict, source: str) -> dict:
        """Experts and top-k; each expert is ``intermediate_size`` wide, no dense layers."""
        if hf.get("router_jitter_noise"):
            raise ValueError(f"{source}: router_jitter_noise={hf['router_jitter_noise']} is not "
                             "supported (set it to 0.0: the published Mixtral configs do)")
        if not hf.get("num_local_experts"):
            raise ValueError(f"{source}: missing field 'num_local_experts' (a "
                             "MixtralForCausalLM needs its expert count)")
        return {"num_experts": int(hf["num_local_experts"]),
                "experts_per_token": int(hf.get("num_experts_per_tok", 0)),
                "moe_ffn_hidden_size": int(hf.get("intermediate_size") or 0),
                "moe_norm_topk_prob": True, "dense_layers": ()}

    def hf_config_fields(self, m) -> dict:
        """Mixtral's expert fields."""
        return dict(super().hf_config_fields(m), num_local_experts=m.num_experts,
                    num_experts_per_tok=m.experts_per_token)


MIXTRAL = Mixtral()
