"""Model families (``megasimpo/families/``): the registry covers exactly the supported
architectures, everything else gets the one error, and each family's config reads back.

transformers' own architecture <-> model_type table is the independent reference for the names.
"""

import glob
import os

import pytest
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from megasimpo.families import registry
from megasimpo.hf.mapping import hf_config
from megasimpo.model_config import ModelConfig

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
             "Qwen3MoeForCausalLM", "MixtralForCausalLM")
DENSE = SUPPORTED[:4]
BASE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 100}


def test_registry_covers_exactly_the_supported_architectures():
    assert registry.SUPPORTED_ARCHITECTURES == SUPPORTED
    for fam in registry.FAMILIES:
        assert registry.family(fam.architecture) is fam
        assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[fam.model_type] == fam.architecture
        # Looked up by model_type alone (a config.json without architectures).
        assert registry.for_hf(dict(BASE, model_type=fam.model_type)) is fam
    assert not set(registry.UNSUPPORTED) & set(SUPPORTED)
    # Outside megasimpo/families/, no module tests for a family by its name.
    pkg = os.path.dirname(os.path.dirname(registry.__file__))
    for path in glob.glob(os.path.join(pkg, "**", "*.py"), recursive=True):
        if os.sep + "families" + os.sep not in path:
            src = open(path).read()
            assert not [a for a in SUPPORTED if a in src], path


@pytest.mark.parametrize("arch", ["Qwen2MoeForCausalLM", "DeepseekV3ForCausalLM",
                                  "GptOssForCausalLM", "Gemma2ForCausalLM", "GPT2LMHeadModel"])
def test_unsupported_architecture_gets_the_one_error(arch):
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf_dict(dict(BASE, architectures=[arch]), source="x/config.json")
    msg = str(e.value)
    assert msg.startswith(f"x/config.json: architectures=['{arch}'] is not supported")
    assert msg.endswith("supported: " + ", ".join(SUPPORTED))
    if arch in registry.UNSUPPORTED:
        assert registry.UNSUPPORTED[arch] in msg
    # The same without architectures, by model_type (transformers' name for it).
    model_type = {v: k for k, v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}[arch]
    with pytest.raises(ValueError, match=f"model_type='{model_type}' .* supported: llama "):
        ModelConfig.from_hf_dict(dict(BASE, model_type=model_type), source="x/config.json")


@pytest.mark.parametrize("arch", DENSE)
def test_each_family_reads_back_its_exported_config(arch):
    hf = dict(BASE, architectures=[arch], sliding_window=32)
    m = ModelConfig.from_hf_dict(hf)
    assert (m.qkv_bias, m.qk_norm) == (arch == "Qwen2ForCausalLM", arch == "Qwen3ForCausalLM")
    # A window given is the model's, except Qwen's, which also needs use_sliding_window.
    assert m.sliding_window == (None if arch.startswith("Qwen") else 32)
    out = hf_config(m, hf)
    assert out["model_type"] == registry.family(arch).model_type
    assert ModelConfig.from_hf_dict(out) == m
    assert ModelConfig.from_hf_dict({k: v for k, v in out.items() if k != "architectures"}) == m


@pytest.mark.parametrize("arch, hf", [
    ("Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                 decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=False,
                                 num_hidden_layers=5, head_dim=16)),
    ("MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=32)),
])
def test_moe_families_read_their_experts_as_transformers_builds_them(arch, hf):
    import torch
    import transformers

    hf = dict(BASE, architectures=[arch], **hf)
    m = ModelConfig.from_hf_dict(hf)
    config_class = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    with torch.device("meta"):
        ref = getattr(transformers, arch)(config_class(**hf))
    # Which layers keep a dense MLP: transformers' own decision (a layer without experts).
    assert m.dense_layers == tuple(i for i, layer in enumerate(ref.model.layers)
                                   if not hasattr(layer.mlp, "experts"))
    experts = next(layer.mlp for layer in ref.model.layers if hasattr(layer.mlp, "experts"))
    assert (m.num_experts, m.experts_per_token) == (4, 2)
    assert m.moe_norm_topk_prob == (arch == "MixtralForCausalLM")
    # The parameter count is transformers' (its fused experts hold the same elements).
    assert m.num_parameters == sum(p.numel() for p in ref.parameters())
    assert experts is not None
    out = hf_config(m, hf)
    assert ModelConfig.from_hf_dict(out) == m
    assert ModelConfig.from_hf_dict({k: v for k, v in out.items() if k != "architectures"}) == m


def test_moe_config_errors_name_the_field():
    hf = dict(BASE, architectures=["MixtralForCausalLM"], num_local_experts=4,
              num_experts_per_tok=6)
    with pytest.raises(ValueError, match="x/config.json: num_experts_per_tok=6 must be between 1 "
                                         "and the 4 experts"):
        ModelConfig.from_hf_dict(hf, source="x/config.json")
    with pytest.raises(ValueError, match="router_jitter_noise=0.1 is not supported"):
        ModelConfig.from_hf_dict(dict(hf, num_experts_per_tok=2, router_jitter_noise=0.1),
                                 source="x/config.json")
    qwen = dict(BASE, architectures=["Qwen3MoeForCausalLM"], num_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=16, mlp_only_layers=[7])
    with pytest.raises(ValueError, match=r"mlp_only_layers \[7\] are not layers of the 2-layer"):
        ModelConfig.from_hf_dict(qwen, source="x/config.json")
