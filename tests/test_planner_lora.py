"""LoRA in the planner and memory model: a frozen base is bf16 weights only, the adapters are the
trainable parameters (gradients, fp32 main weights and Adam moments), so 70B plans on one node.

Pure arithmetic, no process group; the shapes of the hand formulas are written out here.
"""

import argparse
import json
import os

import pytest

from test_planner import LLAMA3_8B, REPO, _run_plan

from megasimpo import memory_model, plan_cmd, planner
from megasimpo.config import LORA_TARGETS, LoraConfig, ModelConfig

pytestmark = pytest.mark.fast  # in `make test-fast`

LLAMA3_70B_JSON = os.path.join(REPO, "examples", "configs", "llama3_70b.json")
R16 = LoraConfig(rank=16)


def llama3_70b() -> ModelConfig:
    return ModelConfig.from_hf(LLAMA3_70B_JSON)


def hand_trainable_70b(r: int) -> int:
    """sum over QKV, proj, fc1 (gate + up), fc2 of r x (in + out), 80 layers, Llama-3-70B."""
    h, f, layers = 8192, 28672, 80
    q, kv = 64 * 128, 2 * 8 * 128  # 64 heads, 8 KV heads (K and V), head_dim 128
    per_layer = r * (h + q + kv) + r * (q + h) + r * (h + 2 * f) + r * (f + h)
    return layers * per_layer


def test_70b_lora_r16_fits_on_one_node_of_80gb_and_full_fine_tuning_does_not():
    model = llama3_70b()
    p = planner.plan(model, 8, gpu_mem_gb=80.0, seq_length=4096, lora=R16)
    assert p.world_size == 8 and p.memory.total <= 0.9 * 80.0
    assert p.layout.tp * p.layout.pp * p.layout.cp * p.layout.dp == 8
    with pytest.raises(ValueError, match="needs at least (16|24|32|64) GPUs"):
        planner.plan(model, 8, gpu_mem_gb=80.0, seq_length=4096)
    d = p.to_dict()
    assert d["lora_rank"] == 16 and d["lora_alpha"] == 32.0
    assert d["lora_targets"] == list(LORA_TARGETS)
    assert d["trainable_parameters"] == hand_trainable_70b(16) == 175_636_480
    assert d["total_parameters"] == model.num_parameters + hand_trainable_70b(16)
    line = next(r for r in p.reasons if r.startswith("LoRA r=16 on "))
    assert "175,636,480 trainable of" in line and "(0.25%)" in line


def test_lora_base_has_no_gradient_or_optimizer_bytes():
    model = llama3_70b()
    p = planner.plan(model, 8, lora=R16)
    lay = p.layout
    split = dict(tp=lay.tp, pp=lay.pp, vpp=lay.vpp, cp=lay.cp, dp=lay.dp,
                 micro_batch_size=p.micro_batch_size, num_microbatches=p.num_microbatches,
                 recompute=p.recompute)
    full = memory_model.stage_breakdowns(model, **split)
    for stage, (lora, base) in enumerate(zip(p.stages, full)):
        # Weights: the same bf16 base plus the bf16 adapters held by this GPU.
        adapters = model.num_layers // lay.pp * memory_model.lora_layer_parameters(model, R16, lay.tp)
        assert lora.weights == pytest.approx(base.weights + 2 * adapters / 1e9)
        # Gradients and optimizer state are the adapters' only: 4 B and 12 B / (DP x CP) each.
        assert lora.grads == pytest.approx(4 * adapters / 1e9)
        assert lora.optimizer == pytest.approx(12 * adapters / (lay.dp * lay.cp) / 1e9)
        assert lora.grads < 0.01 * base.grads and lora.optimizer < 0.01 * base.optimizer


def test_adapter_sharding_over_tp_by_hand():
    """Column targets (QKV, fc1): A [r, in] whole, B [out/tp, r]; row (proj, fc2): A [r, in/tp],
    B [out, r] whole; at TP 1 the sum is shapes' r x (in + out)."""
    model, r, tp = llama3_70b(), 16, 8
    h, f, q, kv = 8192, 28672, 8192, 2048
    by_hand = (r * h + (q + kv) // tp * r) + (r * q // tp + h * r) + (r * h + 2 * f // tp * r) \
        + (r * f // tp + h * r)
    assert memory_model.lora_layer_parameters(model, R16, tp) == by_hand
    assert memory_model.lora_layer_parameters(model, R16, 1) == hand_trainable_70b(r) // 80
    only_attention = LoraConfig(rank=8, targets=("linear_qkv", "linear_proj"))
    assert memory_model.lora_layer_parameters(model, only_attention, 1) == 8 * (h + q + kv + q + h)
    assert memory_model.lora_layer_parameters(model, LoraConfig(rank=0), 4) == 0
    assert memory_model.model_parameters(model, None) == (model.num_parameters,) * 2


def test_the_column_split_is_lora_py_s():
    from megasimpo import lora  # (imports torch; the rest of this file does not)

    assert memory_model.LORA_COLUMN_TARGETS == lora.COLUMN_TARGETS
    assert set(LORA_TARGETS) - set(lora.COLUMN_TARGETS) == set(lora.ROW_TARGETS)


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_live_reference_under_lora_is_the_base_not_a_copy(loss):
    p = planner.plan(LLAMA3_8B, 8, loss=loss, ref="live", lora=R16)
    full = planner.plan(LLAMA3_8B, 8, loss=loss, ref="live")
    assert p.memory.reference == 0 < full.memory.reference
    assert any("adapters switched off, no second copy" in r for r in p.reasons)


def test_lora_activations_are_the_base_s_plus_small_adapter_tensors():
    model = llama3_70b()
    common = dict(tokens=8192, tp=8, sequence_parallel=True, recompute=False, seq=4096)
    base = memory_model.layer_activation_bytes(model, attention_backend="sdpa", **common)
    local = memory_model.layer_activation_bytes(model, attention_backend="sdpa", lora=R16,
                                                **common)
    # Local spec, every target adapted: the adapters keep the very inputs the trainable base
    # kept, plus [s, b, r] bf16 products: whole sequence for QKV/fc1, SP-split for proj/fc2.
    assert local - base == pytest.approx(8192 * 2 * 16 * (2 + 2 / 8))
    te = memory_model.layer_activation_bytes(model, attention_backend="te", lora=R16, **common)
    # TE's fused norm + linear: the adapter re-normalises the norm input (fp32 + bf16 result)
    # for QKV and fc1 instead of sharing the norm output: 4 B per element more, SP-split.
    assert te - local == pytest.approx(8192 * 2 * 4 * 8192 / 8)
    attention_only = LoraConfig(rank=16, targets=("linear_qkv", "linear_proj"))
    lean = memory_model.layer_activation_bytes(model, attention_backend="sdpa",
                                               lora=attention_only, **common)
    # Frozen fc1 and fc2 keep no inputs: fc1's [s/tp, b, h] and fc2's [s, b, f/tp] are gone.
    assert base - lean == pytest.approx(8192 * (2 * 8192 / 8 + 2 * 28672 / 8) - 8192 * 2 * 16
                                        * (1 + 1 / 8))


def test_plan_cli_lora_json_and_table(capsys):
    argv = ["--hf-config", LLAMA3_70B_JSON, "--gpus", "8", "--lora-rank", "16"]
    rc, out, err = _run_plan(argv + ["--json"], capsys)
    assert rc == 0, err
    d = json.loads(out)
    assert d["gpus"] == 8 and d["lora_rank"] == 16
    assert d["trainable_parameters"] == hand_trainable_70b(16)
    assert d["memory_gb"]["total"] <= d["memory_budget_gb"]
    rc, table, err = _run_plan(argv + ["--lora-alpha", "8", "--lora-targets", "linear_qkv",
                                       "linear_fc2"], capsys)
    assert rc == 0, err
    trainable = 80 * 16 * ((8192 + 8192 + 2048) + (28672 + 8192))
    assert f"{trainable:,} trainable of" in table and "LoRA r=16 alpha 8 on linear_qkv" in table
    rc, _, err = _run_plan(["--hf-config", LLAMA3_70B_JSON, "--gpus", "8"], capsys)
    assert rc == 2 and "needs at least" in err


@pytest.mark.parametrize("flags, msg", [(["--lora-rank", "-1"], "--lora-rank -1 must be >= 0"),
                                        (["--lora-rank", "8", "--lora-targets", "linear_q"],
                                         "--lora-targets linear_q")])
def test_plan_cli_bad_lora_flags_exit_2(capsys, flags, msg):
    rc, _, err = _run_plan(["--hf-config", LLAMA3_70B_JSON, "--gpus", "8"] + flags, capsys)
    assert rc == 2 and msg in err


def test_make_plan_without_lora_flags_is_full_fine_tuning():
    args = argparse.Namespace(gpus=8, gpus_per_node=8, gpu_mem_gb=80.0, seq_length=4096,
                              loss="simpo", ref="live", global_batch_size=128, logprob_chunk=1024,
                              attention_backend="te", tp=None, pp=None, vpp=None, cp=None,
                              micro_batch_size=None, recompute=None, sequence_parallel=None)
    p = plan_cmd.make_plan(args, LLAMA3_8B)
    assert p.lora is None and p.to_dict()["lora_rank"] == 0
    assert p.trainable_parameters == p.total_parameters == LLAMA3_8B.num_parameters
