"""tools/convert_hf.py: HF <-> checkpoint, against transformers and the source safetensors files.

Numerics compare Megatron GPTModel log-probs (TP=1, TP=2, PP=2, fp32, gloo) with an independent
transformers forward; round trips compare every exported tensor with the original files bit for bit.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from hf_models import MODELS, build, load, write_random_llama
from multirank import run_main, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "convert_hf.py")
SEQ = 48  # > the Llama-3 model's original_max_position_embeddings (32): the scaling matters


def cli(*args, check=True):
    """Runs tools/convert_hf.py (in a pool rank, as ``python TOOL ARGS``); the CompletedProcess."""
    proc = run_main(TOOL, [*args, "--no-progress"], cwd=ROOT, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"convert_hf {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def import_hf(hf, out, **kw):
    from megasimpo.hf import import_hf as run

    return run(hf, out, progress=False, **kw)


def export_hf(ckpt, out, **kw):
    from megasimpo.hf import export_hf as run

    return run(ckpt, out, progress=False, **kw)


def safetensors_dir(path) -> dict:
    """name -> tensor of every safetensors file in ``path`` (read with safetensors itself)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            for k, v in load_file(os.path.join(path, f)).items():
                assert k not in out, k
                out[k] = v
    return out


def hf_logprobs(path, ids):
    """Per-token log-probs [b, s-1] of the next token under the transformers model (fp32)."""
    model = load(path, torch.float32)
    with torch.no_grad():
        logits = model(ids).logits.double()
    return torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each tiny fp32 HF model, and its imported checkpoint."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name in MODELS:
        hf = build(name, str(root / name),
                   max_shard_size="60KB" if name == "llama3" else None)  # llama3: index + shards
        ckpt = str(root / f"{name}.ckpt")
        import_hf(hf, ckpt)
        out[name] = (hf, ckpt)
    assert len([f for f in os.listdir(out["llama3"][0]) if f.endswith(".safetensors")]) > 2
    return out


@pytest.fixture(scope="module")
def token_ids():
    g = torch.Generator().manual_seed(0)
    return {name: torch.randint(0, kw["vocab_size"], (2, SEQ), generator=g)
            for name, (_, kw) in MODELS.items()}


# ----- numerics against transformers -----------------------------------------------------------

def _megatron_logprobs(rank, world, cases, layouts, save_dir):
    """{(name, layout index): log-probs [b, s-1]} of each case's ids under its imported checkpoint
    at each layout (fp32), from the rank that holds the output; optionally re-saved by Megatron."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megasimpo import checkpoint
    from megasimpo.config import Layout
    from megasimpo.model import Precision, build_chunks
    from megasimpo.parallel import groups

    results = {}
    for li, layout_kw in enumerate(layouts):
        for name, ckpt, ids in cases:
            model = checkpoint.model_config(ckpt)
            layout = Layout.resolve(model, world, **layout_kw)
            g = groups.initialize(layout, 0)
            chunks = build_chunks(model, layout, Precision(name="fp32"), seed=1)
            checkpoint.load_model(chunks, ckpt)
            b, s = ids.shape
            pos = torch.arange(s).expand(b, s)
            with torch.no_grad():
                if layout.pp == 1:
                    logits = chunks[0](ids, pos, None)
                else:  # Megatron's own schedule carries the activations between stages
                    def step(it, m):
                        return m(next(it), pos, None), lambda o: (
                            o.sum() * 0, torch.tensor(1), {"logits": o.detach()})

                    outs = get_forward_backward_func()(
                        forward_step_func=step, data_iterator=iter([ids]), model=chunks,
                        num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
                    logits = outs[0]["logits"] if g.is_last_stage else None
            if logits is not None and layout.tp > 1:  # [b, s, v/tp] vocab shards, in TP order
                parts = [torch.empty_like(logits) for _ in range(layout.tp)]
                dist.all_gather(parts, logits.contiguous(), group=g.tp)
                logits = torch.cat(parts, -1)
            if logits is not None and g.tp_rank == 0:
                logits = logits.double()
                logits[..., model.vocab_size:] = float("-inf")  # padding rows never score
                lp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
                results[(name, li)] = lp
            if save_dir is not None:  # the same weights saved by Megatron itself (format check)
                checkpoint.save_model(chunks, model, os.path.join(save_dir, name))
            parallel_state.destroy_model_parallel()
    return results


@pytest.mark.parametrize("world, layouts", [(1, [dict()]), (2, [dict(tp=2), dict(pp=2)])],
                         ids=["tp1", "tp2_pp2"])
def test_logprobs_match_transformers(world, layouts, models, token_ids, tmp_path):
    cases = [(name, ckpt, token_ids[name]) for name, (_, ckpt) in models.items()]
    save_dir = str(tmp_path) if world == 1 else None
    results = run_ranks(_megatron_logprobs, world, cases, layouts, save_dir)
    merged = {k: v for r in results for k, v in r.items()}
    assert merged.keys() == {(name, li) for name in models for li in range(len(layouts))}
    for name, (hf, _) in models.items():
        ref = hf_logprobs(hf, token_ids[name])
        assert ref.std() > 0.3, "log-probs too close to uniform for the comparison to mean much"
        for li, layout in enumerate(layouts):
            rel = ((merged[(name, li)] - ref).abs() / ref.abs()).max().item()
            assert rel <= 1e-5, (name, layout, rel)
    if save_dir is not None:
        for name, (_, ckpt) in models.items():
            assert_same_format(ckpt, os.path.join(save_dir, name))


def assert_same_format(ours, megatrons):
    """Our streamed import and Megatron's own save describe the same tensors in the same blocks."""
    from torch.distributed.checkpoint import FileSystemReader

    a = FileSystemReader(ours).read_metadata().state_dict_metadata
    b = FileSystemReader(megatrons).read_metadata().state_dict_metadata
    assert a.keys() == b.keys()
    for key in a:
        if hasattr(b[key], "size"):
            assert a[key].size == b[key].size, key
            assert a[key].properties.dtype == b[key].properties.dtype, key
            assert sorted((tuple(c.offsets), tuple(c.sizes)) for c in a[key].chunks) == \
                sorted((tuple(c.offsets), tuple(c.sizes)) for c in b[key].chunks), key
    for f in ("metadata.json",):
        with open(os.path.join(ours, f)) as x, open(os.path.join(megatrons, f)) as y:
            assert json.load(x) == json.load(y)
    assert torch.load(os.path.join(ours, "common.pt")) == torch.load(
        os.path.join(megatrons, "common.pt"))


def test_llama3_rope_scaling_matters(models, token_ids):
    """Without the scaling the reference differs, so the numerics test covers it."""
    hf, _ = models["llama3"]
    ref = hf_logprobs(hf, token_ids["llama3"])
    model = load(hf, torch.float32)
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    unscaled = type(model)(model.config).eval()
    unscaled.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits = unscaled(token_ids["llama3"]).logits.double()
    ids = token_ids["llama3"]
    plain = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    assert (plain - ref).abs().max() > 1e-3


# ----- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_round_trip_bit_exact(dtype, tmp_path):
    from megasimpo.config import ModelConfig

    for name in MODELS:
        hf = build(name, str(tmp_path / name), dtype=dtype, seed=3)
        ckpt, back = str(tmp_path / f"{name}.ckpt"), str(tmp_path / f"{name}.back")
        if name == "mistral":  # a config without a dtype: the weights' own is kept
            with open(os.path.join(hf, "config.json")) as f:
                cfg = json.load(f)
            del cfg["dtype"]
            with open(os.path.join(hf, "config.json"), "w") as f:
                json.dump(cfg, f)
        assert import_hf(hf, ckpt).dtype == str(dtype).replace("torch.", "")
        export_hf(ckpt, back, max_shard_size=40_000)
        with pytest.raises(ValueError, match="--force"):
            export_hf(ckpt, back)
        src, out = safetensors_dir(hf), safetensors_dir(back)
        assert src.keys() == out.keys(), (name, src.keys() ^ out.keys())
        for k, t in src.items():
            assert out[k].dtype == t.dtype == dtype and out[k].shape == t.shape, k
            assert torch.equal(out[k].view(torch.uint8), t.view(torch.uint8)), k
        with open(os.path.join(back, "model.safetensors.index.json")) as f:
            index = json.load(f)
        assert set(index["weight_map"]) == set(src)
        want = dataclasses.replace(ModelConfig.from_hf(hf), dtype=str(dtype)[len("torch."):])
        assert ModelConfig.from_hf(back) == want
        with open(os.path.join(hf, "config.json")) as f:
            a = json.load(f)
        with open(os.path.join(back, "config.json")) as f:
            b = json.load(f)
        for key in set(a) - {"transformers_version"}:
            assert a[key] == b[key], (name, key, a[key], b[key])
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                  "generation_config.json"):
            with open(os.path.join(hf, f), "rb") as x, open(os.path.join(back, f), "rb") as y:
                assert x.read() == y.read(), f


def test_config_written_without_original(tmp_path, models):
    """A checkpoint with no original config.json still exports a config transformers reads."""
    import shutil

    from transformers import AutoConfig

    hf, ckpt = models["llama3"]
    bare = str(tmp_path / "bare.ckpt")
    shutil.copytree(ckpt, bare)
    shutil.rmtree(os.path.join(bare, "tokenizer"))
    export_hf(bare, str(tmp_path / "out"))
    got, want = AutoConfig.from_pretrained(str(tmp_path / "out")), AutoConfig.from_pretrained(hf)
    for key in ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
                "dtype"):
        assert getattr(got, key) == getattr(want, key), key


def _train(rank, world, ckpt, root):
    from megasimpo.config import LossConfig, TrainConfig
    from megasimpo.data.indexed import write_pairs
    from megasimpo.demo import synthetic_pairs
    from megasimpo.trainer import Trainer

    data = os.path.join(root, "data", "train")
    if rank == 0:
        write_pairs(data, synthetic_pairs(16, 0), 100)
    torch.distributed.barrier()
    cfg = TrainConfig(load=ckpt, data=(data,), out=os.path.join(root, "run"), tp=2, steps=2,
                      global_batch_size=4, micro_batch_size=2, lr=1e-2, warmup_ratio=0.0,
                      precision="fp32", loss=LossConfig(name="simpo"), seed=5)
    return [r["loss"] for r in Trainer(cfg).run()]


def _stored(rank, world, ckpt, keys):
    """Tensors of checkpoint ``ckpt`` as stored (Megatron names, whole, padded vocabulary)."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load_plain_tensors(ckpt)
    return {k: loaded[k] for k in keys}


def test_trained_model_exports_and_generates(tmp_path, capsys):
    """bf16 model -> import -> 2 SimPO steps at TP=2 in fp32 -> export (fp32, the trained
    weights bit for bit; --dtype bf16 rounds them) -> transformers."""
    from megasimpo.checkpoint_meta import read_meta

    hf = build("llama_tied", str(tmp_path / "hf"), dtype=torch.bfloat16, seed=7)
    ckpt = str(tmp_path / "ckpt")
    assert "wrote" in cli("import", "--hf", hf, "--out", ckpt).stdout
    assert read_meta(ckpt)["weights_dtype"] == "bfloat16"
    losses = run_ranks(_train, 2, ckpt, str(tmp_path))[0]
    assert len(losses) == 2
    final = str(tmp_path / "run" / "final_model")
    meta = read_meta(final)  # the model is a bf16 one, its trained weights are fp32
    assert (meta["model"]["dtype"], meta["weights_dtype"]) == ("bfloat16", "float32")
    out, rounded = str(tmp_path / "trained_hf"), str(tmp_path / "trained_bf16")
    proc = cli("export", "--load", final, "--out", out)
    assert "wrote" in proc.stdout and "float32)" in proc.stdout
    export_hf(final, rounded, dtype="bf16")
    src, got, bf16 = safetensors_dir(hf), safetensors_dir(out), safetensors_dir(rounded)
    assert src.keys() == got.keys() == bf16.keys()
    assert all(t.dtype == torch.float32 for t in got.values())
    stored = run_ranks(_stored, 1, final, ["embedding.word_embeddings.weight",
                                           "decoder.final_layernorm.weight"])[0]
    emb = got["model.embed_tokens.weight"]
    assert torch.equal(emb, stored["embedding.word_embeddings.weight"][:emb.shape[0]])
    assert torch.equal(got["model.norm.weight"], stored["decoder.final_layernorm.weight"])
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, got[k].to(torch.bfloat16))
               for k, t in bf16.items())
    assert any(not torch.equal(t.float(), got[k]) for k, t in bf16.items())  # rounded
    for path, dtype in ((out, "float32"), (rounded, "bfloat16")):
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        assert (config["dtype"], config["torch_dtype"]) == (dtype, dtype)
    moved = [k for k in src if not torch.equal(src[k], bf16[k])]
    assert len(moved) > len(src) // 2, "training did not change the exported weights"
    # Saved before the dtype was recorded: the model's dtype, as before, and a note saying so.
    with open(os.path.join(final, "megasimpo.json"), "w") as f:
        json.dump({k: v for k, v in meta.items() if k != "weights_dtype"}, f)
    capsys.readouterr()
    assert export_hf(final, str(tmp_path / "old"), force=True).dtype == "bfloat16"
    assert "stores float32 weights but records no weights_dtype" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok.encode("w5 w6 w7")])
    gen = model.generate(ids, max_new_tokens=4, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert gen.shape == (1, ids.shape[1] + 4) and bool((gen < 100).all())


# ----- streaming memory ------------------------------------------------------------------------

_MEASURE = """
import json, resource, sys
sys.path.insert(0, {root!r})
import torch, safetensors, megatron.core.dist_checkpointing, torch.distributed.checkpoint
import megasimpo.hf.convert as convert
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
convert.import_hf({hf!r}, {out!r}, progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"before_kb": before, "after_kb": after}}))
"""


def test_import_streams_in_bounded_memory(tmp_path):
    # A fresh interpreter on purpose: its peak RSS (ru_maxrss) must be this import's alone.
    hf, out = str(tmp_path / "big"), str(tmp_path / "big.ckpt")
    model_bytes = write_random_llama(hf, num_layers=24, hidden=512, ffn=1408, vocab=1000,
                                     heads=8, kv_heads=4, layers_per_shard=6)
    assert model_bytes > 250e6
    proc = subprocess.run([sys.executable, "-c", _MEASURE.format(root=ROOT, hf=hf, out=out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = (rss["after_kb"] - rss["before_kb"]) * 1024
    print(f"model {model_bytes / 1e6:.0f} MB, peak RSS growth {growth / 1e6:.1f} MB")
    assert model_bytes >= 3 * growth, (model_bytes, growth)
    written = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)
                  if f.endswith(".distcp"))
    assert written >= model_bytes  # everything was really written


# ----- safety ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharded_hf(tmp_path_factory):
    return build("qwen2", str(tmp_path_factory.mktemp("sharded") / "hf"), max_shard_size="30KB",
                 tokenizer=False)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_unsupported_architecture_lists_supported(tmp_path, models):
    hf = _copy(models["llama_tied"][0], tmp_path / "gpt2")
    with open(os.path.join(hf, "config.json")) as f:
        cfg = json.load(f)
    cfg["architectures"] = ["GPT2LMHeadModel"]
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump(cfg, f)
    proc = cli("import", "--hf", hf, "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("convert_hf: error:") and "GPT2LMHeadModel" in line
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert arch in line
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")


def test_missing_shard_names_file(tmp_path, sharded_hf):
    hf = _copy(sharded_hf, tmp_path / "hf")
    victim = sorted(f for f in os.listdir(hf) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(hf, victim))
    with pytest.raises(ValueError, match=victim):
        import_hf(hf, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_truncated_shard_names_file(tmp_path, sharded_hf):
    hf = _copy(sharded_hf, tmp_path / "hf")
    victim = sorted(f for f in os.listdir(hf) if f.endswith(".safetensors"))[-1]
    path = os.path.join(hf, victim)
    os.truncate(path, os.path.getsize(path) - 100)
    proc = cli("import", "--hf", hf, "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "convert_hf: error:" in proc.stderr and victim in proc.stderr
    assert not os.path.exists(tmp_path / "out")


def test_config_mismatch_names_tensor(tmp_path, models):
    hf = _copy(models["llama_tied"][0], tmp_path / "hf")
    with open(os.path.join(hf, "config.json")) as f:
        cfg = json.load(f)
    cfg["intermediate_size"] = 48
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError,
                       match=r"model\.layers\.0\.mlp\.\w+_proj\.weight in .*model\.safetensors"):
        import_hf(hf, str(tmp_path / "out"))


def test_missing_tensor_names_tensor(tmp_path, models):
    from safetensors.torch import load_file, save_file

    hf = _copy(models["mistral"][0], tmp_path / "hf")
    path = os.path.join(hf, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight: missing"):
        import_hf(hf, str(tmp_path / "out"))


def test_existing_output_needs_force(tmp_path, models):
    hf, _ = models["llama_tied"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ValueError, match="--force"):
        import_hf(hf, str(out))
    assert (out / "keep").exists()
    import_hf(hf, str(out), force=True)
    assert not (out / "keep").exists() and (out / "megasimpo.json").exists()


def test_failure_midway_leaves_nothing_complete(tmp_path, models, monkeypatch):
    from megasimpo.hf import full_import

    hf, _ = models["llama3"]
    reads = {"n": 0}
    real = full_import.HFWeights.read

    def flaky(self, name):
        reads["n"] += 1
        if reads["n"] > 6:
            raise RuntimeError("disk on fire")
        return real(self, name)

    monkeypatch.setattr(full_import.HFWeights, "read", flaky)
    out = tmp_path / "out"
    with pytest.raises(Exception, match="disk on fire"):
        import_hf(hf, str(out))
    assert reads["n"] > 6
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    # An existing checkpoint survives a failed --force replacement untouched.
    out.mkdir()
    (out / "megasimpo.json").write_text("{}")
    reads["n"] = 0
    with pytest.raises(Exception, match="disk on fire"):
        import_hf(hf, str(out), force=True)
    assert (out / "megasimpo.json").read_text() == "{}"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_export_checks_checkpoint_against_its_config(tmp_path, models):
    hf, ckpt = models["mistral"]
    bad = _copy(ckpt, tmp_path / "bad.ckpt")
    with open(os.path.join(bad, "megasimpo.json")) as f:
        meta = json.load(f)
    meta["model"]["ffn_hidden_size"] = 48
    with open(os.path.join(bad, "megasimpo.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=r"decoder\.layers\.mlp\.linear_fc1\.weight in checkpoint "
                                         + r".*bad\.ckpt: shape"):
        export_hf(bad, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")
    with pytest.raises(ValueError, match="no config.json"):
        import_hf(str(tmp_path / "nowhere"), str(tmp_path / "out"))
