"""The planner and memory model on mixture-of-experts models: experts sharded by EP x ETP and their
optimizer state by the expert-DP group, EP chosen by the planner, the bundled MoE configs planned.

Pure arithmetic; the shapes are the bundled published configs (checked against their published
parameter counts in test_model_configs.py)."""

import dataclasses
import os

import pytest

from megasimpo import memory_model, planner
from megasimpo.config import Layout, LoraConfig, ModelConfig
from megasimpo.shapes import layer_shapes

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                       "configs")


def _model(name):
    return ModelConfig.from_hf(os.path.join(CONFIGS, f"{name}.json"))


def test_experts_are_sharded_by_ep_and_etp_and_their_optimizer_by_expert_dp():
    m = _model("qwen3_30b_a3b")  # 48 MoE layers, no dense layer
    moe = layer_shapes(m, 0)
    tp, pp, dp, ep, etp = 2, 2, 4, 4, 1  # world 16; expert-DP = 16 / (1 * 4 * 2) = 2
    mem = memory_model.stage_memory(m, tp=tp, pp=pp, vpp=None, cp=1, dp=dp,
                                    sequence_parallel=True, seq_length=4096, micro_batch_size=1,
                                    num_microbatches=8, loss="simpo", recompute=False, stage=0,
                                    ep=ep, etp=etp)
    layers = 24
    dense = layers * (moe.sharded_parameters / tp + moe.replicated_parameters) + (
        memory_model.padded_vocab_size(m.vocab_size) * m.hidden_size / tp)  # embedding, stage 0
    experts = layers * 128 * 3 * 2048 * 768 / (ep * etp)
    assert mem.weights == pytest.approx(2 * (dense + experts) / 1e9, rel=1e-9)
    assert mem.grads == pytest.approx(4 * (dense + experts) / 1e9, rel=1e-9)
    assert mem.optimizer == pytest.approx((12 * dense / dp + 12 * experts / 2) / 1e9, rel=1e-9)
    assert mem.imbalance > 0 and "imbalance" in mem.to_dict()
    # ETP splits each expert as well: half the expert bytes per GPU at ETP 2
    etp2 = memory_model.stage_memory(m, tp=tp, pp=pp, vpp=None, cp=1, dp=dp,
                                     sequence_parallel=True, seq_length=4096, micro_batch_size=1,
                                     num_microbatches=8, loss="simpo", recompute=False, stage=0,
                                     ep=ep, etp=2)
    assert etp2.grads == pytest.approx(4 * (dense + experts / 2) / 1e9, rel=1e-9)


def test_dense_layers_of_an_moe_model_keep_the_dense_price():
    m = dataclasses.replace(_model("qwen3_30b_a3b"), dense_layers=(0, 1))
    dense, moe = memory_model.layer_kinds(m)
    assert not dense.experts and moe.experts == 128
    assert memory_model.stage_moe_layers(m, (24, 24), 0) == 22
    assert memory_model.stage_moe_layers(m, (24, 24), 1) == 24
    assert memory_model.stage_moe_layers(m, (12, 12, 12, 12), 1, vpp=2) == 12  # chunks 1 and 5


def test_the_planner_chooses_ep_inside_a_node_that_divides_the_experts():
    m = _model("mixtral_8x22b")
    p = planner.plan(m, 64)
    lay = p.layout
    assert m.num_experts % lay.ep == 0 and 64 % (lay.expert_tp * lay.ep * lay.pp) == 0
    assert 1 < lay.ep * lay.expert_tp <= 8 and lay.etp == 1
    assert p.memory.total <= 72.0 and any(r.startswith(f"EP={lay.ep} ETP=1") for r in p.reasons)
    assert Layout.resolve(m, 64, tp=lay.tp, pp=lay.pp, ep=lay.ep, etp=lay.etp,
                          first_stage_layers=lay.first_stage_layers,
                          last_stage_layers=lay.last_stage_layers).ep == lay.ep
    fixed = planner.plan(m, 64, overrides={"ep": 4, "tp": 8, "pp": 8})
    wider = planner.plan(m, 64, overrides={"ep": 8, "tp": 8, "pp": 8})
    assert fixed.layout.ep == 4 and fixed.memory.grads > wider.memory.grads
    d = fixed.to_dict()
    assert d["ep"] == 4 and d["moe_dispatcher"] == "alltoall"
    with pytest.raises(ValueError, match="--ep 3 does not divide the model's 8 experts"):
        planner.plan(m, 64, overrides={"ep": 3})


def test_qwen3_235b_plans_on_64_gpus():
    # full fine-tuning needs 18 B per parameter: 4.2 TB, more than 64 x 72 GB can hold beside the
    # activations; with LoRA (attention adapters) the frozen bf16 base plans on 64 GPUs
    m = _model("qwen3_235b_a22b")
    lora = LoraConfig(rank=16, targets=("linear_qkv", "linear_proj"))
    p = planner.plan(m, 64, lora=lora, overrides={"pp": 2})
    assert p.world_size == 64 and p.memory.total <= 72.0 and p.layout.ep > 1
    assert m.num_experts % p.layout.ep == 0
    with pytest.raises(ValueError, match="needs at least"):
        planner.plan(m, 64, overrides={"pp": 8, "tp": 4})
