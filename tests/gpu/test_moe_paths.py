"""Mixture-of-experts paths that only a CUDA GPU with Transformer Engine runs (skipped elsewhere):
TE's grouped-GEMM experts (``moe_grouped_gemm`` with the TE layer spec) against the local spec's
sequential experts, and Megatron's alltoall token dispatcher with its real CUDA side stream for
the device-to-host split sizes (on CPU both are stand-ins: ``parallel/cpu.py``).

The tiny Qwen3-MoE has one dense layer and three MoE layers (4 experts, top-2). One GPU: EP=1,
so the dispatcher's collectives are trivial but its permutation, streams and events are real.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from fixtures import TINY

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MOE = dataclasses.replace(TINY, architecture="Qwen3MoeForCausalLM", qk_norm=True, num_experts=4,
                          experts_per_token=2, moe_ffn_hidden_size=32, dense_layers=(0,))


def _train(ckpt, data, out, *flags):
    cmd = [sys.executable, "-m", "megasimpo", "train", "--load", ckpt, "--data", data,
           "--out", str(out), "--steps", "3", "--global-batch-size", "8",
           "--micro-batch-size", "2", "--lr", "1e-2", "--warmup-ratio", "0", "--seed", "3",
           "--moe-dispatcher", "alltoall", *flags]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))
            if '"loss"' in line]


@pytest.fixture(scope="module")
def inputs(shared_inputs):
    from megasimpo.model import have_te

    if not have_te():
        pytest.skip("needs Transformer Engine")
    return shared_inputs(model=MOE)


def test_grouped_gemm_experts_match_sequential_experts(inputs, tmp_path):
    ckpt, data, _ = inputs
    te = _train(ckpt, data, tmp_path / "te", "--precision", "fp32", "--attention-backend", "te")
    local = _train(ckpt, data, tmp_path / "sdpa", "--precision", "fp32",
                   "--attention-backend", "sdpa")
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in te] == pytest.approx([r[key] for r in local], rel=1e-3), key


def test_bf16_moe_step_trains(inputs, tmp_path):
    ckpt, data, _ = inputs
    rows = _train(ckpt, data, tmp_path / "bf16", "--precision", "bf16")
    assert all(r["skipped"] == 0 and abs(r["loss"]) < 1e3 for r in rows)
