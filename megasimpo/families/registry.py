"""The supported families, their lookup, and the one error for everything else.

Lookup is by ``architectures[0]`` of a ``config.json`` (a ``ModelConfig.architecture``), or by
``model_type`` when a config names no architecture; a config naming neither is read as Llama.
Adding a family: its module in ``megasimpo/families/``, one entry in ``FAMILIES`` (and its
removal from ``UNSUPPORTED``), and its tests (``docs/architecture.md``, "Model families").
"""

from megasimpo.families.base import Family
from megasimpo.families.llama import LLAMA, MISTRAL
from megasimpo.families.mixtral import MIXTRAL
from megasimpo.families.qwen2 import QWEN2
from megasimpo.families.qwen3 import QWEN3
from megasimpo.families.qwen3_moe import QWEN3_MOE

FAMILIES = (LLAMA, MISTRAL, QWEN2, QWEN3, QWEN3_MOE, MIXTRAL)
SUPPORTED_ARCHITECTURES = tuple(f.architecture for f in FAMILIES)
_BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES}
_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES}
DEFAULT = LLAMA  # a config.json that names neither an architecture nor a model_type

# Architectures users bring that the engine does not build yet, and what each would need.
UNSUPPORTED = {
    "Gemma2ForCausalLM": "logit soft-capping, GeGLU, pre- and post-norms around each block and "
                         "alternating sliding-window layers",
    "Gemma3ForCausalLM": "GeGLU, pre- and post-norms around each block, q/k norms with (1 + w) "
                         "and interleaved local/global attention",
    "Qwen2MoeForCausalLM": "a shared expert beside the routed ones (with its own sigmoid gate) "
                           "and Q/K/V biases",
    "DeepseekV3ForCausalLM": "multi-latent attention (compressed, decoupled-RoPE K/V), a shared "
                             "expert and sigmoid group-limited routing with a score correction "
                             "bias",
    "GptOssForCausalLM": "attention sinks, clamped SwiGLU experts with biases, and alternating "
                         "sliding-window layers",
    "Qwen3NextForCausalLM": "hybrid linear attention (Gated DeltaNet) and a shared expert",
    "Phi3ForCausalLM": "fused qkv_proj/gate_up_proj tensors and its rope scaling",
}


def unsupported_message(arch: str, source: str, architectures) -> str:
    """The one error for an architecture no family claims, naming what it lacks and what is
    supported."""
    need = UNSUPPORTED.get(arch)
    why = f" (it needs {need}, which the engine does not implement)" if need else ""
    return (f"{source}: architectures={architectures} is not supported{why}; supported: "
            + ", ".join(SUPPORTED_ARCHITECTURES))


def family(architecture: str) -> Family:
    """The family claiming HF architecture ``architecture`` (ValueError naming the supported
    ones otherwise)."""
    found = _BY_ARCHITECTURE.get(architecture)
    if found is None:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: "
                         + ", ".join(SUPPORTED_ARCHITECTURES))
    return found


def family_of(model) -> Family:
    """The family of a ``ModelConfig``."""
    return family(model.architecture)


def for_hf(hf: dict, source: str = "config.json") -> Family:
    """The family of a parsed HF ``config.json`` (``source`` names it in the error)."""
    architectures = hf.get("architectures")
    if architectures:
        arch = architectures[0]
        if arch not in _BY_ARCHITECTURE:
            raise ValueError(unsupported_message(arch, source, architectures))
        return _BY_ARCHITECTURE[arch]
    model_type = hf.get("model_type")
    if model_type is None:
        return DEFAULT
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(f"{source}: model_type={model_type!r} (and no architectures) is not "
                         "supported; supported: " + ", ".join(
                             f"{t} ({f.architecture})" for t, f in _BY_MODEL_TYPE.items()))
    return _BY_MODEL_TYPE[model_type]
