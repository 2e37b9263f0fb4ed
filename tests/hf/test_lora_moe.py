"""LoRA on a mixture-of-experts model (#26): adapters on the attention projections of the tiny
transformers Qwen3-MoE (4 experts, top-2, layer 0 dense), imported. 3 SimPO steps at EP=2 equal
the single-rank run; the trained adapters (per-layer checkpoint keys, as the MoE model's) export
to a PEFT adapter that ``peft.PeftModel`` over the HF base scores like ``megasimpo score``, as
does the merged export; the PEFT adapter imports back. Adapters on the MLP are refused before
anything is built, naming the targets that work."""

import dataclasses
import json
import os

import numpy as np
import pytest

from hf_models import MODELS, build, load
from multirank import run_main, run_ranks
from test_convert import ROOT, cli, export_hf, import_hf
from test_lora_roundtrip import _rel, _scored, _sums

NAME = "qwen3_moe"
VOCAB = MODELS[NAME][1]["vocab_size"]
TARGETS = ("linear_qkv", "o_proj")  # fused QKV, and PEFT's name of linear_proj


def _pairs(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return [tuple(rng.integers(0, VOCAB, rng.integers(lo, hi)).tolist()
                  for lo, hi in ((3, 10), (2, 9), (2, 9))) for _ in range(n)]


def _train(rank, world, ckpt, data, out, layout):
    """3 LoRA SimPO steps (fp32); returns losses, grad norms and (trainable, total) parameters."""
    from megasimpo import lora
    from megasimpo.config import LoraConfig, LossConfig, TrainConfig
    from megasimpo.trainer import Trainer

    cfg = TrainConfig(load=ckpt, data=(data,), out=out, loss=LossConfig(name="simpo"),
                      lora=LoraConfig(rank=4, alpha=8.0, targets=TARGETS), steps=3,
                      global_batch_size=8, micro_batch_size=2, lr=5e-2, warmup_ratio=0.0,
                      precision="fp32", seed=7, **layout)
    trainer = Trainer(cfg)
    rows = trainer.run()
    return ([r["loss"] for r in rows if "loss" in r], [r["grad_norm"] for r in rows
                                                      if "grad_norm" in r],
            lora.parameter_counts(trainer.model))


def _score(ckpt, data, out):
    """``megasimpo score`` of ``ckpt`` (one rank): [(chosen, rejected)] log-prob sums."""
    p = run_main("megasimpo", ["score", "--load", ckpt, "--data", data, "--out", out,
                               "--precision", "fp32"], cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return _scored([json.loads(line) for line in open(out)])


@pytest.fixture(scope="module")
def tree(tmp_path_factory, shared_build):
    from megasimpo.data.indexed import write_pairs

    root = tmp_path_factory.mktemp("lora_moe")
    hf = shared_build(("hf", NAME), lambda path: build(NAME, path))
    ckpt = shared_build(("hf", NAME, "imported"), lambda path: import_hf(hf, path))
    pairs = _pairs()
    write_pairs(str(root / "data"), pairs, VOCAB)
    return {"hf": hf, "ckpt": ckpt, "data": str(root / "data"), "pairs": pairs}


def test_lora_on_moe_at_ep2_equals_single_rank_and_exports_to_peft(tree, tmp_path):
    from megasimpo.config import LoraConfig
    from megasimpo.memory_model import model_parameters
    from megasimpo.checkpoint import model_config

    hf, ckpt, data, pairs = tree["hf"], tree["ckpt"], tree["data"], tree["pairs"]
    one = run_ranks(_train, 1, ckpt, data, str(tmp_path / "one"), {})[0]
    run = str(tmp_path / "ep2")
    ep2 = run_ranks(_train, 2, ckpt, data, run, dict(ep=2))[0]
    for a, b in zip(one[:2], ep2[:2]):
        assert len(a) == len(b) == 3 and b == pytest.approx(a, rel=1e-5), (a, b)
    # The memory model's count of the adapters is the built model's (attention only).
    lora = LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
    assert model_parameters(model_config(ckpt), lora)[0] == one[2][0]

    trained = os.path.join(run, "final_model")
    scored = _score(trained, data, str(tmp_path / "trained.jsonl"))
    assert _rel(scored, _sums(load(hf), pairs)) > 1e-3, "the adapters changed nothing"
    adapter = str(tmp_path / "adapter")
    assert "wrote" in cli("export", "--load", trained, "--out", adapter, "--adapter-only").stdout
    from peft import PeftModel

    assert _rel(_sums(PeftModel.from_pretrained(load(hf), adapter).eval(), pairs), scored) <= 1e-5
    export_hf(trained, str(tmp_path / "merged"))
    assert _rel(_sums(load(str(tmp_path / "merged")), pairs), scored) <= 1e-5
    back = str(tmp_path / "back")  # PEFT -> LoRA checkpoint (per-layer adapter keys)
    assert "wrote" in cli("import", "--hf", hf, "--adapter", adapter, "--out", back).stdout
    assert _rel(_score(back, data, str(tmp_path / "back.jsonl")), scored) <= 1e-5


def test_mlp_targets_on_moe_are_refused(tree, tmp_path):
    from megasimpo import lora_targets
    from megasimpo.checkpoint import model_config
    from megasimpo.config import LoraConfig
    from megasimpo.shapes import layer_shapes

    model = model_config(tree["ckpt"])
    for targets in (("linear_fc1",), ("down_proj",), ("all-linear",), lora_targets.FUSED):
        cfg = LoraConfig(rank=4, targets=targets)
        with pytest.raises(ValueError, match="mixture-of-experts.*linear_qkv linear_proj"):
            lora_targets.check_model(cfg.targets, model)
        with pytest.raises(ValueError, match="mixture-of-experts"):  # what the planner prices
            layer_shapes(model, 1).lora_parameters(4, cfg.targets)
    lora_targets.check_model(LoraConfig(rank=4, targets=TARGETS).targets, model)
    # The default targets become the attention ones on an MoE model, and say so; others stay.
    default, note = lora_targets.for_model(LoraConfig(rank=4).targets, model)
    assert default == ("linear_qkv", "linear_proj") and "mixture of experts" in note
    assert lora_targets.for_model(("linear_fc1",), model) == (("linear_fc1",), None)
    dense = dataclasses.replace(model, num_experts=0, experts_per_token=0, dense_layers=())
    assert lora_targets.for_model(lora_targets.FUSED, dense) == (lora_targets.FUSED, None)
    # A PEFT adapter of an expert (and one of the dense layer 0's MLP) does not import.
    import torch
    from safetensors.torch import save_file

    from megasimpo.hf import peft_adapter

    for module in ("1.mlp.experts.0.gate_proj", "0.mlp.down_proj"):
        peft = tmp_path / module
        peft.mkdir()
        (peft / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["gate_proj"]}))
        save_file({f"base_model.model.model.layers.{module}.lora_{w}.weight": torch.zeros(4, 4)
                   for w in "AB"}, str(peft / "adapter_model.safetensors"))
        with pytest.raises(ValueError, match=f"{module}, an MLP module of the mixture-of-experts"):
            peft_adapter.read(str(peft), model)
    p = run_main("megasimpo", ["train", "--load", tree["ckpt"], "--data", tree["data"],
                               "--out", str(tmp_path / "o"), "--global-batch-size", "8",
                               "--lora-rank", "4", "--lora-targets", "q_proj", "gate_proj"],
                 cwd=ROOT, timeout=120)
    assert p.returncode != 0 and "gate_proj adapts the MLP" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not os.path.exists(tmp_path / "o")
