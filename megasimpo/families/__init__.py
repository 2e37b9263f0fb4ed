"""Model families: everything megasimpo knows about one HF architecture, in one module each.

``base.Family`` is the interface (and the dense Llama-layout decoder), ``registry`` the lookup and
the error for unsupported architectures; ``llama`` (Llama, Mistral), ``qwen2``, ``qwen3`` the
families. ``docs/architecture.md`` ("Model families") has the checklist for adding one.
"""
