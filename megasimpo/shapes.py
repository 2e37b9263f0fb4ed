"""The model's stored shapes as plain arithmetic (no torch): padded vocabulary and one layer's GEMMs.

One home for the numbers that the parameter count (``ModelConfig.num_parameters``), the memory
model (``memory_model.stage_parameters``) and the FLOP count (``metrics``) all derive from, and
that the built model (``model.build_chunks``) and the HF mapping store. What a family adds to a
layer (QKV bias, q/k norms) comes from its ``shape_fields`` (``megasimpo/families/``).
"""

import math
from dataclasses import dataclass

from megasimpo.families.registry import family_of

VOCAB_MULTIPLE = 128  # embedding rows are padded to this so checkpoints reshard to any TP <= 128


def padded_vocab_size(vocab_size: int) -> int:
    """Embedding/output rows as stored: vocab rounded up to VOCAB_MULTIPLE (padding never scores)."""
    return math.ceil(vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


@dataclass(frozen=True)
class LayerShapes:
    """One transformer layer of a GQA SwiGLU decoder (RMSNorm, no linear biases but optional QKV
    bias): the widths its weight GEMMs map between."""

    hidden: int  # h
    q: int  # query width: heads x head_dim (also the attention output width)
    kv: int  # key + value width: 2 x query groups x head_dim
    ffn: int  # f: SwiGLU width (fc1 produces 2f: gate and up)
    qkv_bias: bool
    head_dim: int = 0  # d, counted only with qk_norm
    qk_norm: bool = False  # Qwen3: an RMSNorm weight [d] on queries and one on keys
    experts: int = 0  # E routed SwiGLU experts replace the dense MLP (0: a dense layer)
    topk: int = 0  # experts each token is sent to
    expert_ffn: int = 0  # F: each expert's SwiGLU width

    @property
    def gemms(self) -> dict:
        """{name: (in, out)} of the tensor-parallel weight GEMMs: QKV, output projection and, in a
        dense layer, fc1 (gate + up) and fc2."""
        h, f = self.hidden, self.ffn
        out = {"qkv": (h, self.q + self.kv), "proj": (self.q, h)}
        if not self.experts:
            out.update(fc1=(h, 2 * f), fc2=(f, h))
        return out

    @property
    def expert_gemms(self) -> dict:
        """{name: (in, out)} of one expert's GEMMs (empty for a dense layer)."""
        h, f = self.hidden, self.expert_ffn
        return {"expert_fc1": (h, 2 * f), "expert_fc2": (f, h)} if self.experts else {}

    @property
    def expert_weights(self) -> int:
        """One expert's weight elements (0 for a dense layer)."""
        return sum(i * o for i, o in self.expert_gemms.values())

    @property
    def router_parameters(self) -> int:
        """The router's [E, h] weight (every TP rank holds it whole)."""
        return self.experts * self.hidden

    @property
    def gemm_weights(self) -> int:
        """Weight-matrix elements of the layer: its GEMMs, the router and all E experts."""
        return (sum(i * o for i, o in self.gemms.values()) + self.router_parameters
                + self.experts * self.expert_weights)

    @property
    def active_gemm_weights(self) -> int:
        """Multiply-adds per token of the layer's weight GEMMs: a token passes its top-k experts
        only (all of the layer when dense)."""
        return (sum(i * o for i, o in self.gemms.values()) + self.router_parameters
                + self.topk * self.expert_weights)

    @property
    def sharded_parameters(self) -> int:
        """Parameters split over tensor parallelism: the TP GEMM weights and the QKV bias."""
        return sum(i * o for i, o in self.gemms.values()) + (self.q + self.kv if self.qkv_bias
                                                             else 0)

    @property
    def expert_parameters(self) -> int:
        """The E experts' weights, split over expert (and expert tensor) parallelism."""
        return self.experts * self.expert_weights

    @property
    def replicated_parameters(self) -> int:
        """Parameters every TP rank holds whole: the two RMSNorm weights (and the q/k norms, the
        router)."""
        return (2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
                + self.router_parameters)

    @property
    def parameters(self) -> int:
        """All of the layer's parameters."""
        return self.sharded_parameters + self.expert_parameters + self.replicated_parameters

    def lora_parameters(self, rank: int, targets) -> int:
        """Adapter parameters of the layer: r x (in + out) per target (``linear_qkv``, ``q_proj``
        ...: ``lora_targets.gemm``)."""
        from megasimpo.lora_targets import gemm

        return sum(rank * sum(gemm(self, t)) for t in targets)


def layer_shapes(model, layer: int = 0) -> LayerShapes:
    """The shapes of layer ``layer`` of a ``config.ModelConfig``, as its family states them."""
    return LayerShapes(**family_of(model).shape_fields(model, layer))
