"""Transformer Engine paths on one CUDA GPU (skipped without CUDA + TE): THD packing, FP8.

Each run is the CLI in a child process (Megatron keeps global state per process). The tiny model
is TE-friendly (hidden 32, FFN 64, head_dim 8, sequences rounded to 16 positions).
"""

import json
import os
import subprocess
import sys

import pytest
import torch


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _have_te() -> bool:
    from megasimpo.model import have_te

    return have_te()


def _train(ckpt, data, eval_data, out, *flags):
    cmd = [sys.executable, "-m", "megasimpo", "train", "--load", ckpt, "--data", data,
           "--eval-data", eval_data, "--out", str(out), "--steps", "3",
           "--global-batch-size", "8", "--micro-batch-size", "2", "--lr", "1e-2",
           "--warmup-ratio", "0", "--seed", "3", *flags]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


@pytest.fixture(scope="module")
def inputs(shared_inputs):
    if not _have_te():
        pytest.skip("needs Transformer Engine")
    return shared_inputs()


def test_thd_packing_matches_padded_rows(inputs, tmp_path):
    ckpt, data, eval_data = inputs
    padded, padded_eval = _train(ckpt, data, eval_data, tmp_path / "pad", "--precision", "fp32",
                                 "--no-pack")
    packed, packed_eval = _train(ckpt, data, eval_data, tmp_path / "pack", "--precision", "fp32",
                                 "--pack")
    for a, b in zip(padded + padded_eval, packed + packed_eval):
        for key in ("loss", "grad_norm", "eval_loss", "eval_rank_accuracy"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-3), (key, a, b)
    assert packed[-1]["tflops_per_gpu"] * packed[-1]["step_time_s"] < \
        padded[-1]["tflops_per_gpu"] * padded[-1]["step_time_s"]


def test_fused_logprobs_match_full_logits_in_bf16(inputs, tmp_path):
    ckpt, data, eval_data = inputs
    fused, _ = _train(ckpt, data, eval_data, tmp_path / "fused", "--precision", "bf16")
    plain, _ = _train(ckpt, data, eval_data, tmp_path / "plain", "--precision", "bf16",
                      "--logprob-chunk", "0")
    assert [r["loss"] for r in fused] == pytest.approx([r["loss"] for r in plain], rel=2e-2)


def test_fp8_step_is_finite_and_trains(inputs, tmp_path):
    ckpt, data, eval_data = inputs
    rows, evals = _train(ckpt, data, eval_data, tmp_path / "fp8", "--precision", "fp8")
    assert all(r["skipped"] == 0 for r in rows)
    assert all(abs(r["loss"]) < 1e3 for r in rows)
    assert evals and evals[-1]["eval_loss"] < evals[0]["eval_loss"] + 1e-3
