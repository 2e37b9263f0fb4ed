"""The model's architecture as read from an HF ``config.json``: ``ModelConfig`` and its RoPE scaling.

Validated in ``__post_init__`` (the value in the message); ``from_hf`` names the file and the
field for anything missing or unsupported. The fields every family shares (shape, RoPE, norms,
dtype) are read here; what a family adds or refuses is its ``config_fields``
(``megasimpo/families/``). Shape arithmetic (parameter counts, GEMMs, the padded
vocabulary) lives in ``megasimpo/shapes.py``.
"""

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

from megasimpo.families import registry

# The families and the unsupported architectures live in megasimpo/families/; named here too,
# where callers look for them.
SUPPORTED_ARCHITECTURES = registry.SUPPORTED_ARCHITECTURES
MISSING = registry.UNSUPPORTED


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (HF ``rope_scaling`` with ``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a decoder of a supported family (``megasimpo/families/``), as read from an
    HF ``config.json``."""

    architecture: str = registry.DEFAULT.architecture  # HF architectures[0] (Llama by default)
    num_layers: int  # transformer layers
    hidden_size: int  # model width
    ffn_hidden_size: int  # SwiGLU intermediate size
    num_attention_heads: int  # query heads
    num_query_groups: int  # KV heads (GQA); == num_attention_heads for MHA
    head_dim: int  # per-head width (kv_channels)
    vocab_size: int  # embedding rows (unpadded, as in the checkpoint)
    max_position_embeddings: int  # longest sequence the model was built for
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: Optional[RopeScaling] = None  # Llama-3 scaling, None for plain RoPE
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_word_embeddings: bool = False  # output layer shares the input embedding
    # Set by the family (Family.config_fields) when read from config.json:
    qkv_bias: bool = False  # Qwen2-style bias on Q, K, V projections
    qk_norm: bool = False  # Qwen3-style RMSNorm on each head's queries and keys
    sliding_window: Optional[int] = None  # Mistral/Qwen2 windowed attention; runs must fit in it
    # Mixture of experts (families/moe.py; 0 experts = a dense model):
    num_experts: int = 0  # routed experts per MoE layer
    experts_per_token: int = 0  # top-k experts each token is sent to
    moe_ffn_hidden_size: Optional[int] = None  # each expert's SwiGLU width
    moe_norm_topk_prob: bool = True  # the k routing weights are renormalised to sum to 1
    dense_layers: tuple = ()  # layers (0-based) that keep a dense MLP in an MoE model
    dtype: str = "bfloat16"  # dtype the weights were stored in

    def __post_init__(self):
        registry.family(self.architecture)  # ValueError naming the supported ones
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "head_dim", "vocab_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model config: {name}={getattr(self, name)} must be positive")
        object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers))
        if self.num_experts:
            if not 1 <= self.experts_per_token <= self.num_experts:
                raise ValueError(f"model config: experts_per_token={self.experts_per_token} must "
                                 f"be between 1 and num_experts={self.num_experts}")
            if not self.moe_ffn_hidden_size or self.moe_ffn_hidden_size <= 0:
                raise ValueError(f"model config: moe_ffn_hidden_size={self.moe_ffn_hidden_size} "
                                 "must be positive for a mixture-of-experts model")
            if len(self.dense_layers) == self.num_layers:
                raise ValueError("model config: every layer is dense (dense_layers); a model "
                                 "without MoE layers is not a mixture-of-experts model")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model config: num_attention_heads={self.num_attention_heads} is not a multiple "
                f"of num_key_value_heads={self.num_query_groups}"
            )

    @property
    def is_moe(self) -> bool:
        """Whether the MLPs (but ``dense_layers``) are routed experts."""
        return self.num_experts > 0

    @property
    def num_parameters(self) -> int:
        """Total parameter count (embeddings counted once when tied, at the HF vocabulary size)."""
        from megasimpo.shapes import layer_shapes

        h, v = self.hidden_size, self.vocab_size
        return (sum(layer_shapes(self, i).parameters for i in range(self.num_layers)) + h
                + v * h * (1 if self.tie_word_embeddings else 2))

    @classmethod
    def from_hf(cls, path: str) -> "ModelConfig":
        """Reads an HF ``config.json`` (or the directory holding it)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
        return cls.from_hf_dict(hf, source=path)

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Builds a ModelConfig from the parsed HF config dictionary."""
        family = registry.for_hf(hf, source)  # the one error for unsupported architectures
        family_fields = family.config_fields(hf, source)

        def need(key):
            if key not in hf:
                raise ValueError(f"{source}: missing field {key!r}")
            return hf[key]

        heads = need("num_attention_heads")
        rope = hf.get("rope_scaling") or None
        rope_theta = hf.get("rope_theta", 10000.0)
        if rope is None and isinstance(hf.get("rope_parameters"), dict):  # transformers >= 5 layout
            params = hf["rope_parameters"]
            rope_theta = params.get("rope_theta", rope_theta)
            rope = params if params.get("rope_type", "default") != "default" else None
        scaling = None
        if rope is not None:
            kind = rope.get("rope_type", rope.get("type"))
            if kind != "llama3":
                raise ValueError(
                    f"{source}: rope_scaling type {kind!r} is not supported (supported: llama3)"
                )
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(
                    rope.get("original_max_position_embeddings", 8192)
                ),
            )
        hidden = need("hidden_size")
        return cls(
            architecture=family.architecture,
            num_layers=need("num_hidden_layers"),
            hidden_size=hidden,
            ffn_hidden_size=need("intermediate_size"),
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            vocab_size=need("vocab_size"),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"),
            **family_fields,
        )

    def to_dict(self) -> dict:
        """Plain-dict form for metadata files and config.yaml (JSON's types: lists, not tuples,
        so a dict read back from a file compares equal)."""
        return dict(dataclasses.asdict(self), dense_layers=list(self.dense_layers))

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)
