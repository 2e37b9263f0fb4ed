"""Qwen2 and Qwen2.5 (``Qwen2ForCausalLM``): Llama's layout with biases on Q, K and V.

Every Qwen2 has the Q/K/V biases (its config has no switch for them); ``sliding_window`` counts
only with ``use_sliding_window: true`` (the published configs carry a window they do not use).
"""

from megasimpo.families.base import Family


class Qwen2(Family):
    """``Qwen2ForCausalLM``."""

    architecture = "Qwen2ForCausalLM"
    model_type = "qwen2"
    qkv_bias = True
    allows_bias_fields = True  # read as the fixed Q/K/V biases, as transformers does
    window_needs_flag = True


QWEN2 = Qwen2()
