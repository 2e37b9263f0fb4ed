"""`megasimpo score` on imported HF models equals an independent transformers forward (fp32)."""

import json

import numpy as np
import pytest
import torch

import hf_models
from multirank import run_main
from test_convert import hf_logprobs, import_hf


def _pairs(vocab, n=6, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):  # prompt and responses of different lengths, ids over the whole vocab
        yield (rng.integers(0, vocab, rng.integers(3, 12)).tolist(),
               rng.integers(0, vocab, rng.integers(2, 10)).tolist(),
               rng.integers(0, vocab, rng.integers(2, 10)).tolist())


def _hf_sums(hf_dir, pairs):
    out = []
    for prompt, chosen, rejected in pairs:
        row = []
        for resp in (chosen, rejected):
            ids = torch.tensor([prompt + resp])
            lp = hf_logprobs(hf_dir, ids)[0]  # lp[t] = log p(ids[t+1])
            row.append(lp[len(prompt) - 1:].sum().item())
        out.append(row)
    return out


@pytest.mark.parametrize("name,layouts", [("llama3", [[], ["--tp", "2"], ["--pp", "2"]]),
                                          ("qwen2", [["--tp", "2"]]),
                                          ("qwen3_untied", [[], ["--tp", "2"], ["--pp", "2"]]),
                                          ("qwen3_moe", [[], ["--ep", "2"], ["--tp", "2"],
                                                         ["--pp", "2"],
                                                         ["--ep", "2", "--moe-dispatcher",
                                                          "allgather"]]),
                                          # 3 layers: PP=2 is an uneven 1 + 2 split
                                          ("mixtral", [[], ["--ep", "2"], ["--tp", "2"],
                                                       ["--pp", "2"]])])
def test_score_equals_transformers(name, layouts, tmp_path, shared_build):
    from megasimpo.data.indexed import write_pairs

    hf_dir = shared_build(("hf", name), lambda path: hf_models.build(name, path))
    ckpt = shared_build(("hf", name, "imported"), lambda path: import_hf(hf_dir, path))
    vocab = hf_models.MODELS[name][1]["vocab_size"]
    pairs = list(_pairs(vocab))
    write_pairs(str(tmp_path / "data"), pairs, vocab)
    expected = _hf_sums(hf_dir, pairs)
    identities = set()
    for flags in layouts:
        out = str(tmp_path / f"score{len(flags)}{''.join(flags)}.jsonl")
        p = run_main("megasimpo", ["score", "--load", ckpt, "--data", str(tmp_path / "data"),
                                   "--out", out, "--precision", "fp32", *flags],
                     world_size=2 if flags else 1, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        rows = [json.loads(line) for line in open(out)]
        for r, (chosen, rejected) in zip(rows, expected):
            assert r["chosen_logps"] == pytest.approx(chosen, rel=1e-5), (flags, r, chosen)
            assert r["rejected_logps"] == pytest.approx(rejected, rel=1e-5), (flags, r, rejected)
        with open(out + ".meta.json") as f:  # the scoring model's identity, at any layout
            identities.add(json.load(f)["model"]["weights"])
    assert len(identities) == 1, identities
