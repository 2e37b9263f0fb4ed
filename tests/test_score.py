"""`megasimpo score` (contract output, layout invariance) and DPO with precomputed references."""

import json
import math
import os

import numpy as np
import pytest

from multirank import run_main, run_ranks


def _score_cli(args, nproc=None):
    p = run_main("megasimpo", ["score"] + args, world_size=nproc or 1, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def inputs(shared_inputs):
    return shared_inputs(num_pairs=24)


def _read(path):
    return [json.loads(line) for line in open(path)]


def test_score_contract_and_layout_invariance(inputs, tmp_path):
    from megasimpo.data.indexed import PairDataset

    ckpt, train, _ = inputs
    outs = {}
    for name, flags, nproc in (("tp1", [], None), ("tp2", ["--tp", "2"], 2),
                               ("pp2", ["--pp", "2"], 2), ("dp2", [], 2)):
        path = str(tmp_path / f"{name}.jsonl")
        stdout = _score_cli(["--load", ckpt, "--data", train, "--out", path,
                             "--micro-batch-size", "5"] + flags, nproc)
        outs[name] = (_read(path), stdout, json.load(open(path + ".meta.json")))
        assert not os.path.exists(path + ".partial")
    rows, stdout, meta = outs["tp1"]
    data = PairDataset(train)
    # The sidecar: the model's identity is the same at every layout it was scored at.
    assert {n: o[2]["model"]["weights"] for n, o in outs.items()} == \
        dict.fromkeys(outs, meta["model"]["weights"])
    assert meta["model"]["adapter"] is None and meta["model"]["load"] == os.path.abspath(ckpt)
    assert meta["data"] == {"prefix": os.path.abspath(train), "fingerprint": data.fingerprint,
                            "num_pairs": len(data)}
    assert meta["scores"]["pairs"] == len(data) and meta["megasimpo_version"]
    assert outs["tp2"][2]["layout"] == {"tp": 2, "pp": 1, "dp": 1}
    assert [r["index"] for r in rows] == list(range(len(data)))  # dataset order, none dropped
    for r, pair in zip(rows, (data[i] for i in range(len(data)))):
        assert set(r) == {"index", "chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens"}
        assert (r["chosen_tokens"], r["rejected_tokens"]) == (len(pair.chosen_ids), len(pair.rejected_ids))
        assert r["chosen_logps"] < 0 and r["rejected_logps"] < 0
    # A random 64-token model: per-token log-probs are near -log(64).
    mean = np.mean([r["chosen_logps"] / r["chosen_tokens"] for r in rows])
    assert abs(mean + math.log(64)) < 0.5
    acc = np.mean([r["chosen_logps"] / r["chosen_tokens"] > r["rejected_logps"] / r["rejected_tokens"]
                   for r in rows])
    assert f"likelihood-ranking accuracy {acc:.4f}" in stdout
    for name in ("tp2", "pp2", "dp2"):
        other = outs[name][0]
        for a, b in zip(rows, other):
            assert a["index"] == b["index"]
            for k in ("chosen_logps", "rejected_logps"):
                assert b[k] == pytest.approx(a[k], rel=1e-5), (name, a, b)


def test_read_scores_rejects_mismatched_files(inputs, tmp_path):
    from megasimpo.data.batches import ConcatPairs
    from megasimpo.score import read_scores

    ckpt, train, _ = inputs
    data = ConcatPairs([train])
    lengths = data.lengths()
    good = [{"index": i, "chosen_logps": -1.0, "rejected_logps": -2.0,
             "chosen_tokens": int(lengths[i, 1]), "rejected_tokens": int(lengths[i, 2])}
            for i in range(len(data))]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good))
    assert read_scores(str(path), data).shape == (len(data), 2)
    bad = [dict(r) for r in good]
    bad[3]["chosen_tokens"] += 1
    path.write_text("".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(ValueError, match=r"s.jsonl:4: chosen_tokens"):
        read_scores(str(path), data)
    path.write_text("".join(json.dumps(r) + "\n" for r in good[:-1]))
    with pytest.raises(ValueError, match="23 scored pairs, the dataset has 24"):
        read_scores(str(path), data)


def _dpo(rank, world, ckpt, data, held_out, out, ref, ref_files):
    from megasimpo.config import LossConfig, TrainConfig
    from megasimpo.trainer import Trainer

    cfg = TrainConfig(load=ckpt, data=(data,), eval_data=(held_out,), out=out,
                      loss=LossConfig(name="dpo"), ref=ref, ref_logps=tuple(ref_files), steps=3,
                      global_batch_size=8, micro_batch_size=2, lr=1e-2, warmup_ratio=0.0,
                      precision="fp32", seed=5)
    rows = Trainer(cfg).run()
    return [r.get("loss") for r in rows], [r.get("eval_loss") for r in rows]


def _dpo_error(rank, world, *args):
    try:
        _dpo(rank, world, *args)
    except ValueError as e:
        return str(e)
    return None


def test_dpo_precomputed_reference_equals_live(inputs, identities, tmp_path):
    ckpt, train, held_out = inputs
    files = []
    for prefix, name in ((train, "train"), (held_out, "eval")):
        files.append(str(tmp_path / f"{name}.ref.jsonl"))
        _score_cli(["--load", ckpt, "--data", prefix, "--out", files[-1]])
    live = run_ranks(_dpo, 1, ckpt, train, held_out, str(tmp_path / "live"), "live", [])[0]
    pre = run_ranks(_dpo, 1, ckpt, train, held_out, str(tmp_path / "pre"), "precomputed", files)[0]
    # The same files, their sidecar naming another checkpoint's weights: refused before step 1.
    meta = json.load(open(files[1] + ".meta.json"))
    meta["model"].update(identities["other"], load="/ckpts/other")
    json.dump(meta, open(files[1] + ".meta.json", "w"))
    error = run_ranks(_dpo_error, 1, ckpt, train, held_out, str(tmp_path / "other"),
                      "precomputed", files)[0]
    assert error and error.startswith(f"{files[1]}.meta.json: field 'model.weights' is "
                                      f"{identities['other']['weights']} (/ckpts/other)"), error
    assert f"re-run `megasimpo score --load {ckpt} --data {held_out}" in error
    assert not os.path.exists(tmp_path / "other" / "metrics.jsonl")
    assert live[1][0] == pytest.approx(math.log(2), abs=1e-6)  # held-out loss before training
    for a, b in zip(live[0] + live[1], pre[0] + pre[1]):
        assert (a is None) == (b is None)
        if a is not None:
            assert b == pytest.approx(a, rel=1e-5, abs=1e-6)


# ----- the sidecar: which model and data a score file comes from (megasimpo/score_meta.py) -----

def _identities(rank, world, ckpt, other, saved):
    """weights_identity of ``ckpt`` at three layouts and two precisions, of a copy of it saved at
    TP=2 and read back at PP=2, of ``other``, and of ``ckpt`` with LoRA adapters."""
    import torch
    from megatron.core import parallel_state

    from megasimpo import checkpoint, lora
    from megasimpo.config import Layout, LoraConfig
    from megasimpo.model import Precision, build_chunks
    from megasimpo.parallel import groups
    from megasimpo.score_meta import weights_identity

    found = {}
    for name, path, layout_kw, precision in (
            ("tp2", ckpt, {"tp": 2}, "fp32"), ("tp2_bf16", ckpt, {"tp": 2}, "bf16"),
            ("dp2", ckpt, {}, "fp32"), ("saved_pp2", saved, {"pp": 2}, "fp32"),
            ("other", other, {"tp": 2}, "fp32")):
        model = checkpoint.model_config(path)
        layout = Layout.resolve(model, world, **layout_kw)
        groups.initialize(layout, 0)
        chunks = build_chunks(model, layout, Precision(name=precision))
        checkpoint.load_model(chunks, path)
        found[name] = weights_identity(chunks)
        if name == "tp2":
            checkpoint.save_model(chunks, model, saved, source=ckpt)
        if name == "dp2":  # adapters with B != 0: a model of their own, over the same base
            lora.apply(chunks, LoraConfig(rank=2, alpha=4.0), seed=0)
            for adapter in lora.adapters(chunks):
                torch.nn.init.normal_(adapter.lora_b, generator=torch.Generator().manual_seed(1))
            found["lora"] = weights_identity(chunks)
        parallel_state.destroy_model_parallel()
    return found


@pytest.fixture(scope="module")
def identities(inputs, shared_inputs, tmp_path_factory):
    import dataclasses

    from fixtures import TINY

    other = shared_inputs(model=dataclasses.replace(TINY, tie_word_embeddings=True))[0]
    saved = str(tmp_path_factory.mktemp("saved") / "tp2")
    return run_ranks(_identities, 2, inputs[0], other, saved)[0]


def test_weights_identity_is_the_same_at_every_layout_and_precision(identities):
    same = identities["tp2"]
    assert same["weights"].startswith("w1-") and same["adapter"] is None
    for name in ("tp2_bf16", "dp2", "saved_pp2"):
        assert identities[name] == same, name
    assert identities["other"]["weights"] != same["weights"]
    lora = identities["lora"]  # the base is unchanged, the adapters are named apart
    assert lora["weights"] == same["weights"] and lora["adapter"] not in (None, same["weights"])


def _write_score_file(path, dataset, meta=None):
    from megasimpo.score import write_scores

    lengths = dataset.lengths()
    write_scores(str(path), np.array([[-1.0, -2.0, c, r] for _, c, r in lengths]), meta)
    return str(path)


def test_reference_file_of_other_data_or_without_sidecar(inputs, tmp_path, capsys):
    from megasimpo import score_meta
    from megasimpo.data.batches import ConcatPairs
    from megasimpo.score import read_reference

    ckpt, train, held_out = inputs
    data, other = ConcatPairs([train]), ConcatPairs([held_out])
    ident = {"weights": "w1-0123456789abcdef", "adapter": None}
    good = _write_score_file(tmp_path / "good.jsonl", data, score_meta.build(
        load=ckpt, identity=ident, prefix=train, dataset=data))
    assert read_reference(good, data)[1]["model"]["weights"] == ident["weights"]
    # Scored on the held-out set, read as the training set's reference: refused, field named.
    wrong = _write_score_file(tmp_path / "wrong.jsonl", data, score_meta.build(
        load=ckpt, identity=ident, prefix=held_out, dataset=other))
    with pytest.raises(ValueError, match=r"wrong.jsonl.meta.json: field 'data.fingerprint' .* "
                       r"other data .*re-run `megasimpo score --load .* --data .*train"):
        read_reference(wrong, data)
    # A JSONL changed after scoring no longer matches its sidecar.
    with open(good, "a") as f:
        f.write("\n")
    with pytest.raises(ValueError, match=r"field 'scores.blake2b' does not match"):
        read_reference(good, data)
    # No sidecar: accepted, with one line saying what could not be checked.
    bare = _write_score_file(tmp_path / "bare.jsonl", data)
    capsys.readouterr()
    scores, meta = read_reference(bare, data)
    assert meta is None and scores.shape == (len(data), 2)
    note = capsys.readouterr().out
    assert note.count("\n") == 1 and "bare.jsonl has no bare.jsonl.meta.json" in note


def test_reference_file_of_another_model_is_refused(identities, tmp_path):
    from megasimpo.score_meta import check_model

    same, other = identities["tp2"], identities["other"]
    meta = {"model": {"load": "/ckpts/other", **other}}
    with pytest.raises(ValueError, match=r"ref.jsonl.meta.json: field 'model.weights' .*another "
                       r"model; re-run `megasimpo score --load /ckpts/base --data /d/train"):
        check_model([("ref.jsonl", "/d/train", meta)], same, "/ckpts/base")
    # A LoRA checkpoint scored with its adapters on is not a LoRA run's reference (its base is).
    meta = {"model": {"load": "/ckpts/lora", **identities["lora"]}}
    with pytest.raises(ValueError, match=r"field 'model.adapter' is set.*base model /ckpts/base"):
        check_model([("ref.jsonl", "/d/train", meta)], same, "/ckpts/base")
    check_model([("ref.jsonl", "/d/train", {"model": dict(same)}), ("x", "/d/eval", None)],
                same, "/ckpts/base")


def test_score_out_is_checked_before_any_work(inputs, tmp_path):
    ckpt, train, _ = inputs
    missing = str(tmp_path / "no-such-checkpoint")  # the output is refused before --load is read
    existing = tmp_path / "s.jsonl"
    existing.write_text("kept\n")
    for out, why in ((existing, "already exists; pass --force to replace it"),
                     (existing / "out.jsonl", f"{existing} is not a directory")):
        p = run_main("megasimpo", ["score", "--load", missing, "--data", train, "--out", out])
        assert p.returncode == 2 and why in p.stderr, p.stderr[-2000:]
        assert p.stderr.strip().count("\n") == 0, p.stderr  # one line
    assert existing.read_text() == "kept\n"
    from megasimpo.atomic import check_output

    check_output(str(existing), force=True)  # --force: replaced once the new one is complete
    if os.geteuid() != 0:  # root may write in a read-only directory
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(ValueError, match=r"--out .*locked/s.jsonl: cannot write in"):
            check_output(str(locked / "s.jsonl"), force=False)
