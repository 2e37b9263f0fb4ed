"""Qwen3 (``Qwen3ForCausalLM``, dense): Llama's layout with an RMSNorm on each head's queries
and keys (``self_attn.{q,k}_norm``, Megatron's ``qk_layernorm``), usually an explicit
``head_dim``; no Q/K/V biases (``attention_bias: true`` is refused), and ``sliding_window``
counts only with ``use_sliding_window: true``.
"""

from megasimpo.families.base import Family


class Qwen3(Family):
    """``Qwen3ForCausalLM``."""

    architecture = "Qwen3ForCausalLM"
    model_type = "qwen3"
    qk_norm = True
    window_needs_flag = True


QWEN3 = Qwen3()
