"""HF transformers checkpoints <-> megasimpo (Megatron dist_checkpointing) checkpoints.

``mapping``: names and tensor layouts (pure). ``convert``: streamed import / export.
"""

from megasimpo.hf.convert import export_hf, import_hf, parse_size

__all__ = ["import_hf", "export_hf", "parse_size"]
