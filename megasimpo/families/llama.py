"""Llama (2, 3, 3.1, 3.2, 3.3) and Mistral: the base family as it is.

They differ only in names and in two config fields: a Llama ``config.json`` says
``attention_bias`` (written back on export; ``true`` is refused on import, since it also puts a
bias on o_proj), and Mistral's ``sliding_window`` is always its window. Llama-3.1 RoPE scaling
is generic (``model_config``'s ``rope_scaling``), not a family choice.
"""

from megasimpo.families.base import Family


class Llama(Family):
    """``LlamaForCausalLM``."""

    architecture = "LlamaForCausalLM"
    model_type = "llama"

    def hf_config_fields(self, m) -> dict:
        """Llama's config says whether it has attention biases (Qwen2 always has Q/K/V biases,
        Mistral never)."""
        return dict(super().hf_config_fields(m), attention_bias=m.qkv_bias)


class Mistral(Family):
    """``MistralForCausalLM``: Llama's layout; its ``sliding_window`` is the model's window."""

    architecture = "MistralForCausalLM"
    model_type = "mistral"


LLAMA = Llama()
MISTRAL = Mistral()
