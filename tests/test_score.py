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
        outs[name] = (_read(path), stdout)
        assert not os.path.exists(path + ".partial")
    rows, stdout = outs["tp1"]
    data = PairDataset(train)
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
        other, _ = outs[name]
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


def test_dpo_precomputed_reference_equals_live(inputs, tmp_path):
    ckpt, train, held_out = inputs
    files = []
    for prefix, name in ((train, "train"), (held_out, "eval")):
        files.append(str(tmp_path / f"{name}.ref.jsonl"))
        _score_cli(["--load", ckpt, "--data", prefix, "--out", files[-1]])
    live = run_ranks(_dpo, 1, ckpt, train, held_out, str(tmp_path / "live"), "live", [])[0]
    pre = run_ranks(_dpo, 1, ckpt, train, held_out, str(tmp_path / "pre"), "precomputed", files)[0]
    assert live[1][0] == pytest.approx(math.log(2), abs=1e-6)  # held-out loss before training
    for a, b in zip(live[0] + live[1], pre[0] + pre[1]):
        assert (a is None) == (b is None)
        if a is not None:
            assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
