"""Adapters made by ``peft`` itself (#25): ``LoraConfig`` + ``get_peft_model`` on the tiny HF
Llama, random nonzero B, ``save_pretrained``; one on q_proj + v_proj, one on all-linear with
rsLoRA. Each imports (``import --adapter``: per-projection targets, a separate A per module),
scores like ``peft.PeftModel`` over the HF base, trains 2 steps at TP=2, and exports
(``--adapter-only``) to a PEFT adapter that ``peft`` loads and that scores like ``megasimpo
score`` of the trained checkpoint, as its merged export does. (TP=2 against TP=1 for these
adapters: tests/test_lora_split.py.)"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from hf_models import MODELS, build, load
from multirank import run_ranks
from test_convert import cli, export_hf
from test_lora_roundtrip import _megasimpo, _pairs, _rel, _scored, _sums

VOCAB = MODELS["llama3"][1]["vocab_size"]
CASES = {"qv": dict(target_modules=["q_proj", "v_proj"]),
         "all": dict(target_modules="all-linear", use_rslora=True)}
TARGETS = {"qv": ["q_proj", "v_proj"],
           "all": ["q_proj", "k_proj", "v_proj", "linear_proj", "gate_proj", "up_proj",
                   "linear_fc2"]}


def _make_peft(hf, out, seed, **options):
    """A peft adapter (r 4, alpha 8) over HF model ``hf`` with B drawn nonzero, saved to ``out``."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load(hf), LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                                **options))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(out)
    return out


def _train(rank, world, ckpt, data, out, targets, rslora):
    """2 LoRA SimPO steps at TP=world from the imported LoRA checkpoint ``ckpt``; returns the
    adapters' targets and how far each B moved (rank 0)."""
    from megasimpo import lora
    from megasimpo.config import LoraConfig, LossConfig, TrainConfig
    from megasimpo.trainer import Trainer

    cfg = TrainConfig(load=ckpt, data=(data,), out=out, loss=LossConfig(name="simpo"),
                      lora=LoraConfig(rank=4, alpha=8.0, targets=targets, rslora=rslora),
                      steps=2, global_batch_size=4, micro_batch_size=4, lr=5e-2,
                      warmup_ratio=0.0, precision="fp32", seed=7, tp=world)
    trainer = Trainer(cfg)
    found = lora.adapters(trainer.model)
    before = [a.lora_b.detach().clone() for a in found]
    trainer.run()
    moved = [(a.lora_b - b0).abs().max().item() for a, b0 in zip(found, before)]
    return sorted({a.target for a in found}), moved


@pytest.fixture(scope="module")
def tree(tmp_path_factory, shared_build):
    """The HF base and the pairs."""
    from megasimpo.data.indexed import write_pairs

    root = tmp_path_factory.mktemp("peft")
    hf = shared_build(("hf", "llama3"), lambda path: build("llama3", path))
    pairs = _pairs(n=4, seed=1)
    write_pairs(str(root / "data"), pairs, VOCAB)
    return {"hf": hf, "data": str(root / "data"), "pairs": pairs}


def _score(ckpt, data, out, tp=1):
    """``megasimpo score`` of ``ckpt`` at TP=tp: [(chosen, rejected)] log-prob sums."""
    _megasimpo("score", "--load", ckpt, "--data", data, "--out", out, "--precision", "fp32", tp=tp)
    return _scored([json.loads(line) for line in open(out)])


def _peft_sums(hf, adapter, pairs):
    from peft import PeftModel

    return _sums(PeftModel.from_pretrained(load(hf), adapter).eval(), pairs)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_imports_trains_and_exports(tree, case, tmp_path):
    hf, data, pairs = tree["hf"], tree["data"], tree["pairs"]
    adapter = _make_peft(hf, str(tmp_path / "peft"), seed=len(case), **CASES[case])
    ckpt = str(tmp_path / "ckpt")
    assert "wrote" in cli("import", "--hf", hf, "--adapter", adapter, "--out", ckpt).stdout
    with open(os.path.join(ckpt, "megasimpo.json")) as f:
        lora = json.load(f)["lora"]
    assert lora["targets"] == TARGETS[case] and lora["rslora"] == (case == "all")
    scored = _score(ckpt, data, str(tmp_path / "imported.jsonl"))
    assert _rel(scored, _sums(load(hf), pairs)) > 1e-3, "the adapter adds nothing"
    assert _rel(scored, _peft_sums(hf, adapter, pairs)) <= 1e-5  # (2) scores like PeftModel

    run = str(tmp_path / "run")  # (3) trains at TP=2: every adapter's B moves
    kinds, moved = run_ranks(_train, 2, ckpt, data, run, TARGETS[case], case == "all")[0]
    assert kinds == sorted(TARGETS[case]) and all(m > 0 for m in moved), (kinds, moved)

    trained, out = os.path.join(run, "final_model"), str(tmp_path / "adapter")  # (4) exports
    scored = _score(trained, data, str(tmp_path / "trained.jsonl"), tp=2)
    assert "wrote" in cli("export", "--load", trained, "--out", out, "--adapter-only").stdout
    with open(os.path.join(out, "adapter_config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        given = json.load(f)
    assert sorted(cfg["target_modules"]) == sorted(given["target_modules"])
    assert cfg["use_rslora"] == given["use_rslora"] and cfg["r"] == 4
    assert _rel(_peft_sums(hf, out, pairs), scored) <= 1e-5
    assert {t.dtype for t in load_file(os.path.join(out, "adapter_model.safetensors")).values()} \
        == {torch.float32}  # the adapters' saved dtype; --dtype chooses another
    cli("export", "--load", trained, "--out", out + "16", "--adapter-only", "--dtype", "bf16")
    halved = load_file(os.path.join(out + "16", "adapter_model.safetensors"))
    assert {t.dtype for t in halved.values()} == {torch.bfloat16}, "--dtype ignored"
    export_hf(trained, str(tmp_path / "merged"))  # each member's B A added at its rows
    assert _rel(_sums(load(str(tmp_path / "merged")), pairs), scored) <= 1e-5
