"""tools/convert_hf.py with LoRA checkpoints: merged export against transformers, --adapter-only
against peft.PeftModel, import --adapter back to the same adapters, and the refusals.

LoRA checkpoints are made by megasimpo itself (TP=1 with some targets, TP=2 with all), B nonzero;
"ours" is megasimpo's forward of that model (fp32, gloo)."""

import json
import os
import shutil
import zlib

import pytest
import torch

from hf_models import build, load
from multirank import run_ranks
from test_convert import cli, export_hf, hf_logprobs, import_hf, safetensors_dir

SEQ = 40
CASES = {"tp1": (1, ("linear_qkv", "linear_fc2")),
         "tp2": (2, ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"))}


def _lora_logprobs(rank, world, ckpt, ids, save_to, targets):
    """Log-probs [b, s-1] of ``ids`` (rank 0) under checkpoint ``ckpt`` at TP=world; with
    ``save_to``: first adds adapters on ``targets`` with random nonzero B and saves them there."""
    from megasimpo import checkpoint, lora, lora_checkpoint
    from megasimpo.config import Layout, LoraConfig
    from megasimpo.model import Precision, build_chunks
    from megasimpo.parallel import groups

    model = checkpoint.model_config(ckpt)
    layout = Layout.resolve(model, world, tp=world)
    g = groups.initialize(layout, 0)
    chunk = build_chunks(model, layout, Precision(name="fp32"), seed=1)[0]
    checkpoint.load_model([chunk], ckpt)
    if save_to:
        lora.apply([chunk], LoraConfig(rank=4, alpha=6.0, targets=targets), seed=7)
        for layer in chunk.decoder.layers:
            for a in (m for m in layer.modules() if isinstance(m, lora.LoraAdapter)):
                # row-parallel B is replicated: the same on every rank; column B: this rank's rows
                seed = zlib.crc32(f"{layer.layer_number}/{a.target}/{g.tp_rank * a.column}".encode())
                gen = torch.Generator().manual_seed(seed)
                a.lora_b.data.copy_(torch.randn(a.lora_b.shape, generator=gen) * 0.3)
        checkpoint.save_model([chunk], model, save_to, base=lora_checkpoint.base_record(ckpt))
    b, s = ids.shape
    with torch.no_grad():
        logits = chunk(ids, torch.arange(s).expand(b, s), None)
    parts = [torch.empty_like(logits) for _ in range(world)]
    torch.distributed.all_gather(parts, logits.contiguous(), group=g.tp)
    logits = torch.cat(parts, -1).double()
    logits[..., model.vocab_size:] = float("-inf")
    lp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    return lp if rank == 0 else None


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_build):
    """The HF base, its checkpoint, token ids, and per case (LoRA checkpoint, our log-probs)."""
    root = tmp_path_factory.mktemp("lora")
    hf = shared_build(("hf", "llama3"), lambda path: build("llama3", path))
    base = str(root / "base.ckpt")
    import_hf(hf, base)
    ids = torch.randint(0, 200, (2, SEQ), generator=torch.Generator().manual_seed(0))
    cases = {}
    for name, (world, targets) in CASES.items():
        ckpt = str(root / f"lora_{name}")
        cases[name] = (ckpt, run_ranks(_lora_logprobs, world, base, ids, ckpt, targets)[0])
    return {"root": root, "hf": hf, "base": base, "ids": ids, "cases": cases}


def _rel(a, b):
    return ((a - b).abs() / b.abs()).max().item()


def _peft_logprobs(hf, adapter, ids):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load(hf, torch.float32), adapter).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    return torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]


@pytest.mark.parametrize("case", list(CASES))
def test_merged_export_matches_our_forward(setup, case, tmp_path):
    ckpt, ours = setup["cases"][case]
    base_lp = hf_logprobs(setup["hf"], setup["ids"])
    assert (ours - base_lp).abs().max() > 0.05, "the adapters barely change the model"
    out = str(tmp_path / "merged")
    export_hf(ckpt, out)
    assert _rel(hf_logprobs(out, setup["ids"]), ours) <= 1e-5
    src, got = safetensors_dir(setup["hf"]), safetensors_dir(out)
    assert src.keys() == got.keys() and all(t.dtype == torch.float32 for t in got.values())
    adapted = {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
               "linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",)}
    modules = [m for t in CASES[case][1] for m in adapted[t]]
    for k in src:  # adapted weights moved, everything else is the base bit for bit
        changed = not torch.equal(src[k], got[k])
        assert changed == any(f".{m}." in k for m in modules), k


@pytest.fixture(scope="module")
def peft_dirs(setup):
    """Each case's --adapter-only export."""
    out = {}
    for case, (ckpt, _) in setup["cases"].items():
        out[case] = str(setup["root"] / f"peft_{case}")
        if case == "tp2":
            assert "wrote" in cli("export", "--load", ckpt, "--out", out[case],
                                  "--adapter-only").stdout
        else:
            export_hf(ckpt, out[case], adapter_only=True)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_only_loads_in_peft(setup, peft_dirs, case):
    from safetensors.torch import load_file

    _, ours = setup["cases"][case]
    with open(os.path.join(peft_dirs[case], "adapter_config.json")) as f:
        cfg = json.load(f)
    want = ["q_proj", "k_proj", "v_proj", "down_proj"] if case == "tp1" else \
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert cfg["target_modules"] == want and cfg["r"] == 4 and cfg["lora_alpha"] == 6
    assert cfg["base_model_name_or_path"] == os.path.abspath(setup["hf"])
    tensors = load_file(os.path.join(peft_dirs[case], "adapter_model.safetensors"))
    assert len(tensors) == 4 * 2 * len(want)
    p = "base_model.model.model.layers.3.self_attn."
    assert torch.equal(tensors[p + "q_proj.lora_A.weight"], tensors[p + "v_proj.lora_A.weight"])
    assert tensors[p + "k_proj.lora_B.weight"].shape == (32, 4)  # 2 KV heads x 16
    assert _rel(_peft_logprobs(setup["hf"], peft_dirs[case], setup["ids"]), ours) <= 1e-5


def _adapters(ckpt):
    """{(layer, target): (A, B)} of a LoRA checkpoint, read as export reads them."""
    from megasimpo import safe_load
    from megasimpo.hf import lora_export, output

    src = lora_export.source(ckpt)
    with output.single_process_group(), safe_load.guard(ckpt):
        stored = lora_export.stored_adapters(src)
        return src, {(i, t): ab for i in range(src.model.num_layers)
                     for t, ab in lora_export.read_layer(src, i, stored).items()}


def test_adapter_import_round_trip(setup, peft_dirs, tmp_path):
    """TP=2 LoRA checkpoint -> PEFT -> import --adapter: the same adapter tensors, loaded at
    TP=1 by checkpoint.load_model (its base in CKPT/base) to the same log-probs."""
    ckpt, ours = setup["cases"]["tp2"]
    back = str(tmp_path / "back")
    import_hf(setup["hf"], back, adapter=peft_dirs["tp2"])
    with open(os.path.join(back, "megasimpo.json")) as f:
        meta = json.load(f)
    assert meta["base"]["path"] == os.path.join(os.path.realpath(back), "base")
    src, want = _adapters(ckpt)
    got_src, got = _adapters(back)
    assert got_src.cfg == src.cfg and want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k][0], got[k][0]) and torch.equal(want[k][1], got[k][1]), k
    lp = run_ranks(_lora_logprobs, 1, back, setup["ids"], None, None)[0]
    assert _rel(lp, ours) <= 1e-5


# ----- refusals ------------------------------------------------------------------------------

def _edited(src, dst, config=None, rename=None):
    """A copy of PEFT dir ``src`` with config fields replaced and/or a tensor renamed."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    path = os.path.join(dst, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(config or {})
    with open(path, "w") as f:
        json.dump(cfg, f)
    if rename:
        wpath = os.path.join(dst, "adapter_model.safetensors")
        tensors = load_file(wpath)
        tensors[rename[1]] = tensors.pop(rename[0])
        save_file(tensors, wpath)
    return str(dst)


def test_adapter_only_needs_a_lora_checkpoint(setup, tmp_path):
    proc = cli("export", "--load", setup["base"], "--out", str(tmp_path / "a"), "--adapter-only",
               check=False)
    assert proc.returncode == 2 and "is not a LoRA checkpoint" in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "a.partial")


def test_adapter_for_another_base_is_refused(setup, peft_dirs, tmp_path):
    other = build("llama_tied", str(tmp_path / "other"), tokenizer=False)  # hidden 32, 2 layers
    with pytest.raises(ValueError, match="made for another base"):
        import_hf(other, str(tmp_path / "o1"), adapter=peft_dirs["tp1"])
    renamed = _edited(peft_dirs["tp1"], tmp_path / "renamed", rename=(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"))
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.qkv_proj\.lora_A\.weight in .*"
                                         "not a LoRA tensor of a module megasimpo adapts"):
        import_hf(setup["hf"], str(tmp_path / "o2"), adapter=renamed)
    hinted = _edited(peft_dirs["tp1"], tmp_path / "hinted",
                     {"base_model_name_or_path": "meta-llama/Meta-Llama-3-8B"})
    proc = cli("import", "--hf", setup["hf"], "--adapter", hinted, "--out",
               str(tmp_path / "o3"), check=False)
    assert proc.returncode == 2 and "Meta-Llama-3-8B" in proc.stderr \
        and "--ignore-base-name" in proc.stderr, proc.stderr
    import_hf(setup["hf"], str(tmp_path / "o3"), adapter=hinted, ignore_base_name=True)
    assert os.path.isfile(tmp_path / "o3" / "base" / "megasimpo.json")
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_unknown_target_modules_are_refused(setup, peft_dirs, tmp_path):
    bad = _edited(peft_dirs["tp1"], tmp_path / "bad",
                  {"target_modules": ["q_proj", "k_proj", "v_proj", "down_proj", "lm_head"]})
    with pytest.raises(ValueError, match="target module.* lm_head unknown to megasimpo"):
        import_hf(setup["hf"], str(tmp_path / "out"), adapter=bad)


@pytest.mark.parametrize("option,why", [
    ({"use_dora": True}, "DoRA's magnitude vector"),
    ({"bias": "lora_only"}, "trains the base biases"),
    ({"modules_to_save": ["lm_head"]}, r"\[\"lm_head\"\] is not supported \(it trains those modules "
                                       "whole"),
    ({"rank_pattern": {"q_proj": 8}}, "one rank"),
    ({"alpha_pattern": {"q_proj": 8}}, "one lora_alpha")],
    ids=["use_dora", "bias", "modules_to_save", "rank_pattern", "alpha_pattern"])
def test_unsupported_options_are_refused(setup, peft_dirs, tmp_path, option, why):
    bad = _edited(peft_dirs["tp1"], tmp_path / "bad", option)
    with pytest.raises(ValueError, match=next(iter(option)) + ".*" + why) as e:
        import_hf(setup["hf"], str(tmp_path / "out"), adapter=bad)
    assert "\n" not in str(e.value)
