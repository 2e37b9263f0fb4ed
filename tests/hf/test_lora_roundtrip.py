"""A LoRA run from an HF model back to HF (#16): a tiny transformers Llama imported, 3 SimPO steps
of LoRA training (all targets, fp32, gloo) at TP=1 and at TP=2, then three readings of the
trained model that must agree: ``megasimpo score`` of the run's final checkpoint, its
``export --adapter-only`` loaded with ``peft.PeftModel`` over the HF base, and its merged export
loaded with plain transformers. Then a LoRA checkpoint moved together with its base, and the
refusals of this path, each naming the flag or file and the fix."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from hf_models import MODELS, build, load
from multirank import run_main, run_ranks
from test_convert import ROOT, cli, export_hf, import_hf

VOCAB = MODELS["llama3"][1]["vocab_size"]
LORA = dict(rank=4, alpha=8.0)
CASES = {"tp1": 1, "tp2": 2}


def _pairs(n=8, seed=0):
    """Pre-tokenized (prompt, chosen, rejected) ids of different lengths over the whole vocab."""
    rng = np.random.default_rng(seed)
    return [tuple(rng.integers(0, VOCAB, rng.integers(lo, hi)).tolist()
                  for lo, hi in ((3, 10), (2, 9), (2, 9))) for _ in range(n)]


def _train(rank, world, base, data, out):
    """3 LoRA SimPO steps at TP=world; returns how far every adapter's A and B moved (rank 0)."""
    from megasimpo import lora
    from megasimpo.config import LoraConfig, LossConfig, TrainConfig
    from megasimpo.trainer import Trainer

    cfg = TrainConfig(load=base, data=(data,), out=out, loss=LossConfig(name="simpo"),
                      lora=LoraConfig(**LORA), steps=3, global_batch_size=8, micro_batch_size=4,
                      lr=5e-2, warmup_ratio=0.0, precision="fp32", seed=7, tp=world)
    trainer = Trainer(cfg)
    found = lora.adapters(trainer.model)
    before = [(a.lora_a.detach().clone(), a.lora_b.detach().clone()) for a in found]
    trainer.run()
    moved = [((a.lora_a - a0).abs().max().item(), (a.lora_b - b0).abs().max().item())
             for a, (a0, b0) in zip(found, before)]
    return trainer.layout.tp, len(found), moved


def _megasimpo(*args, tp=1, check=True):
    """``python -m megasimpo ARGS`` (on ``tp`` ranks with ``--tp``); returns the CompletedProcess."""
    flags = ["--tp", str(tp)] if tp > 1 else []
    p = run_main("megasimpo", [*args, *flags], world_size=tp, cwd=ROOT, timeout=300)
    assert not check or p.returncode == 0, p.stderr[-3000:]
    return p


def _sums(model, pairs):
    """[(chosen, rejected)] summed response log-probs under a transformers model, as score sums
    them: log p(response token | everything before it) over the response tokens only."""
    out = []
    for prompt, *responses in pairs:
        row = []
        for resp in responses:
            ids = torch.tensor([prompt + resp])
            with torch.no_grad():
                logits = model(input_ids=ids).logits.double()
            lp = torch.log_softmax(logits, -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
            row.append(lp[len(prompt) - 1:].sum().item())
        out.append(row)
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """The HF base, its checkpoint, the pairs, and per case the trained run's final model."""
    from megasimpo.data.indexed import write_pairs

    root = tmp_path_factory.mktemp("roundtrip")
    hf = build("llama3", str(root / "hf"), seed=3)
    base = str(root / "base")
    import_hf(hf, base)
    pairs = _pairs()
    data = str(root / "data")
    write_pairs(data, pairs, VOCAB)
    runs = {}
    for case, world in CASES.items():
        out = str(root / f"run_{case}")
        tp, n, moved = run_ranks(_train, world, base, data, out)[0]
        assert tp == world and n == 4 * 4  # 4 layers x all 4 targets
        assert all(da > 0 and db > 0 for da, db in moved), moved  # A moved, B left zero
        runs[case] = os.path.join(out, "final_model")
    return {"root": root, "hf": hf, "base": base, "data": data, "pairs": pairs, "runs": runs}


@pytest.fixture(scope="module")
def readings(tree):
    """Per case: ``megasimpo score``'s rows (at the training's TP) and the two exports."""
    out = {}
    for case, world in CASES.items():
        ckpt, d = tree["runs"][case], tree["root"] / f"read_{case}"
        scores = str(d / "scores.jsonl")
        _megasimpo("score", "--load", ckpt, "--data", tree["data"], "--out", scores,
                   "--precision", "fp32", tp=world)
        adapter, merged = str(d / "adapter"), str(d / "merged")
        assert "wrote" in cli("export", "--load", ckpt, "--out", adapter, "--adapter-only").stdout
        assert "wrote" in cli("export", "--load", ckpt, "--out", merged).stdout
        out[case] = {"rows": [json.loads(line) for line in open(scores)], "adapter": adapter,
                     "merged": merged}
    return out


def _rel(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.max(np.abs(got - want) / np.abs(want)))


def _scored(rows):
    return [(r["chosen_logps"], r["rejected_logps"]) for r in rows]


@pytest.mark.parametrize("case", list(CASES))
def test_score_peft_and_merged_agree(tree, readings, case):
    from peft import PeftModel

    pairs, got = tree["pairs"], readings[case]
    assert [(r["index"], r["chosen_tokens"], r["rejected_tokens"]) for r in got["rows"]] == \
        [(i, len(c), len(r)) for i, (_, c, r) in enumerate(pairs)]
    scored = _scored(got["rows"])
    assert _rel(scored, _sums(load(tree["hf"]), pairs)) > 1e-3, "training left the model as it was"
    peft_model = PeftModel.from_pretrained(load(tree["hf"]), got["adapter"]).eval()
    assert _rel(_sums(peft_model, pairs), scored) <= 1e-5
    assert _rel(_sums(load(got["merged"]), pairs), scored) <= 1e-5


def test_tp1_and_tp2_runs_trained_alike(readings):
    assert _rel(_scored(readings["tp2"]["rows"]), _scored(readings["tp1"]["rows"])) <= 1e-4


# ----- a LoRA checkpoint and its base, moved together ----------------------------------------

def test_imported_adapter_moves_with_its_base(tree, readings, tmp_path):
    """import --adapter puts the base inside the LoRA checkpoint and records it relative to it:
    the directory renamed elsewhere still exports (merged) to the trained model."""
    from megasimpo.hf import lora_export

    first = tmp_path / "first"
    cli("import", "--hf", tree["hf"], "--adapter", readings["tp1"]["adapter"],
        "--out", str(first / "ckpt"))
    with open(first / "ckpt" / "megasimpo.json") as f:
        assert json.load(f)["base"]["relative"] == "base"
    moved = tmp_path / "moved"
    os.rename(first, moved)
    ckpt = str(moved / "ckpt")
    assert lora_export.source(ckpt).base == os.path.join(ckpt, "base")
    export_hf(ckpt, str(tmp_path / "merged"))
    scored = _scored(readings["tp1"]["rows"])
    assert _rel(_sums(load(str(tmp_path / "merged")), tree["pairs"]), scored) <= 1e-5


def test_relative_base_path_is_read_from_the_checkpoint(tree, readings, tmp_path):
    """A run's final model and its base copied elsewhere, the base's "path" edited to a relative
    one as the error advises: found from the checkpoint's directory, and loading from it
    records where the base really is."""
    from megasimpo import lora_checkpoint

    ckpt, base = tmp_path / "tree" / "run" / "final_model", tmp_path / "tree" / "base"
    shutil.copytree(tree["runs"]["tp1"], ckpt)
    shutil.copytree(tree["base"], base)
    meta_file = ckpt / "megasimpo.json"
    with open(meta_file) as f:
        meta = json.load(f)
    record = dict(meta["base"], path="/nonexistent/base")
    record.pop("relative")  # what a save records since: this test is of a hand-edited "path"
    with pytest.raises(ValueError, match=r"/nonexistent/base, which is not there: .*set \"path\" "
                                         r"under \"base\" in .*megasimpo\.json.*a relative path"):
        lora_checkpoint.check_base(record, str(ckpt))
    record["path"] = os.path.join("..", "..", "base")
    assert lora_checkpoint.check_base(record, str(ckpt)) == str(base)
    assert lora_checkpoint.rebased(record, str(ckpt)) == \
        {"path": os.path.realpath(base), "fingerprint": meta["base"]["fingerprint"]}
    meta["base"] = record
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    scores = str(tmp_path / "scores.jsonl")
    _megasimpo("score", "--load", str(ckpt), "--data", tree["data"], "--out", scores,
               "--precision", "fp32")
    rows = [json.loads(line) for line in open(scores)]
    assert _rel(_scored(rows), _scored(readings["tp1"]["rows"])) <= 1e-6


def test_run_moved_with_its_base_finds_it_without_edits(tree, tmp_path):
    """A trained run's final model records its base relative to itself as well: the run and the
    base copied together elsewhere use the copy (the original, still in place, is not read)."""
    from megasimpo import lora_checkpoint

    moved = tmp_path / "moved"
    shutil.copytree(os.path.dirname(tree["runs"]["tp1"]), moved / "run_tp1")
    shutil.copytree(tree["base"], moved / "base")
    ckpt = moved / "run_tp1" / "final_model"
    with open(ckpt / "megasimpo.json") as f:
        record = json.load(f)["base"]
    assert record["relative"] == os.path.join("..", "..", "base")
    assert lora_checkpoint.check_base(record, str(ckpt)) == str(moved / "base")


# ----- refusals ------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--lora-rank", "65"], "--lora-rank 65 exceeds linear_qkv's width (64 in, 128 out): use a "
                            "rank <= 64"),
    (["--lora-rank", "4", "--lora-targets", "q", "v_proj"],
     "--lora-targets q v_proj: each must be one of linear_qkv, linear_proj, linear_fc1, "
     "linear_fc2 (fused), q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (per "
     "projection, PEFT's names) or all-linear, not 'q'"),
], ids=["rank_too_wide", "unknown_target"])
def test_bad_lora_flags_are_refused(tree, tmp_path, flags, message):
    out = tmp_path / "run"
    p = _megasimpo("train", "--load", tree["base"], "--data", tree["data"], "--out", str(out),
                   "--steps", "1", "--global-batch-size", "8", *flags, check=False)
    assert p.returncode == 2 and f"megasimpo train: error: {message}" in p.stderr, p.stderr[-2000:]
    assert not out.exists()


def test_adapter_over_another_base_is_refused(tree, readings, tmp_path):
    other = build("llama_tied", str(tmp_path / "other"), tokenizer=False)  # hidden 32, 2 layers
    out = tmp_path / "out"
    p = cli("import", "--hf", other, "--adapter", readings["tp1"]["adapter"], "--out", str(out),
            check=False)
    assert p.returncode == 2, p.stderr
    assert "adapter_model.safetensors" in p.stderr and f"than --hf {other}" in p.stderr \
        and "import it with --hf set to the model it was trained on" in p.stderr, p.stderr
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_adapter_only_export_of_a_full_checkpoint_is_refused(tree, tmp_path):
    out = tmp_path / "peft"
    p = cli("export", "--load", tree["base"], "--out", str(out), "--adapter-only", check=False)
    assert p.returncode == 2 and "--adapter-only" in p.stderr \
        and "export it without --adapter-only" in p.stderr, p.stderr
    assert not out.exists() and not (tmp_path / "peft.partial").exists()
