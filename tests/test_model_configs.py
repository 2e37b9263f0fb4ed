"""The bundled ``examples/configs`` and the architectures ModelConfig reads or refuses.

Parameter counts are checked against the figures the model makers publish (model cards), an
independent reference for the shape arithmetic (q/k norms, explicit head_dim, QKV bias, tying).
"""

import glob
import json
import os

import pytest

from megasimpo import planner
from megasimpo.model_config import ModelConfig

pytestmark = pytest.mark.fast  # in `make test-fast`

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "examples", "configs")

# file -> (architecture, published parameter count in billions, to the digits published)
PUBLISHED = {
    "llama3_8b": ("LlamaForCausalLM", 8.03), "llama3_70b": ("LlamaForCausalLM", 70.55),
    "llama3_405b": ("LlamaForCausalLM", 405.85), "llama3.3_70b": ("LlamaForCausalLM", 70.55),
    "llama3.2_1b": ("LlamaForCausalLM", 1.24), "llama3.2_3b": ("LlamaForCausalLM", 3.21),
    "qwen2.5_7b": ("Qwen2ForCausalLM", 7.62), "qwen2.5_72b": ("Qwen2ForCausalLM", 72.71),
    "qwen3_8b": ("Qwen3ForCausalLM", 8.19), "qwen3_32b": ("Qwen3ForCausalLM", 32.76),
    "mistral_nemo_12b": ("MistralForCausalLM", 12.25),
    "qwen3_30b_a3b": ("Qwen3MoeForCausalLM", 30.53), "qwen3_235b_a22b": ("Qwen3MoeForCausalLM", 235.09),
    "mixtral_8x7b": ("MixtralForCausalLM", 46.70), "mixtral_8x22b": ("MixtralForCausalLM", 140.63),
}
# MoE model cards give total and activated parameters to two or three digits (billions)
PUBLISHED_MOE = {"qwen3_30b_a3b": (30.5, 3.3), "qwen3_235b_a22b": (235, 22),
                 "mixtral_8x7b": (46.7, 12.9), "mixtral_8x22b": (141, 39)}


@pytest.mark.parametrize("name", sorted(PUBLISHED_MOE))
def test_bundled_moe_config_has_the_published_total_and_active_size(name):
    from megasimpo.shapes import layer_shapes

    total, active = PUBLISHED_MOE[name]
    m = ModelConfig.from_hf(os.path.join(CONFIGS, f"{name}.json"))
    layers = [layer_shapes(m, i) for i in range(m.num_layers)]
    used = (sum(s.active_gemm_weights + s.replicated_parameters - s.router_parameters
                for s in layers) + m.hidden_size + 2 * m.vocab_size * m.hidden_size)
    assert m.num_parameters / 1e9 == pytest.approx(total, rel=0.01)
    assert used / 1e9 == pytest.approx(active, rel=0.025)  # 3.37 B for "3.3 B"


def test_every_bundled_config_is_covered():
    names = {os.path.basename(f)[:-len(".json")] for f in glob.glob(os.path.join(CONFIGS, "*.json"))}
    assert names == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_bundled_config_reads_with_the_published_size(name):
    arch, billions = PUBLISHED[name]
    m = ModelConfig.from_hf(os.path.join(CONFIGS, f"{name}.json"))
    assert m.architecture == arch
    assert round(m.num_parameters / 1e9, 2) == pytest.approx(billions, abs=0.006), m.num_parameters


def test_qwen3_and_nemo_shapes():
    q = ModelConfig.from_hf(os.path.join(CONFIGS, "qwen3_32b.json"))
    assert q.qk_norm and not q.qkv_bias and q.head_dim == 128 != q.hidden_size // q.num_attention_heads
    assert q.sliding_window is None and q.rope_theta == 1e6
    n = ModelConfig.from_hf(os.path.join(CONFIGS, "mistral_nemo_12b.json"))
    assert n.head_dim == 128 and n.hidden_size // n.num_attention_heads == 160 and not n.qk_norm
    qw = ModelConfig.from_hf(os.path.join(CONFIGS, "qwen2.5_72b.json"))
    assert qw.qkv_bias and qw.sliding_window is None  # use_sliding_window: false


@pytest.mark.parametrize("name", ["qwen2.5_72b", "qwen3_32b"])
def test_plan_on_64_gpus(name, capsys):
    m = ModelConfig.from_hf(os.path.join(CONFIGS, f"{name}.json"))
    p = planner.plan(m, 64, seq_length=4096)
    assert p.world_size == 64 and p.memory.total <= 0.9 * 80
    from test_planner import _run_plan

    rc, out, _ = _run_plan(["--hf-config", os.path.join(CONFIGS, f"{name}.json"), "--gpus", "64",
                            "--json"], capsys)
    assert rc == 0
    out = json.loads(out)
    assert out["tp"] == p.layout.tp and out["dp"] == p.layout.dp


def _write(tmp_path, **cfg):
    base = json.load(open(os.path.join(CONFIGS, "qwen3_8b.json")))
    base.update(cfg)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(base))
    return str(path)


@pytest.mark.parametrize("arch, missing", [
    ("Gemma2ForCausalLM", "logit soft-capping"),
    ("Qwen2MoeForCausalLM", "shared expert"),
    ("DeepseekV3ForCausalLM", "multi-latent attention"),
    ("GPT2LMHeadModel", "supported: LlamaForCausalLM"),
])
def test_unsupported_architecture_names_what_is_missing(tmp_path, arch, missing):
    path = _write(tmp_path, architectures=[arch])
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf(path)
    msg = str(e.value)
    assert path in msg and arch in msg and missing in msg and "Qwen3ForCausalLM" in msg


def test_experts_under_a_dense_name_are_refused(tmp_path):
    path = _write(tmp_path, num_experts=8)
    with pytest.raises(ValueError, match=r"num_experts=8: mixture-of-experts MLPs are not"):
        ModelConfig.from_hf(path)


def test_qwen3_output_bias_is_refused(tmp_path):
    path = _write(tmp_path, attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias=true"):
        ModelConfig.from_hf(path)
