"""Packed micro-batches train exactly like padded ones (fp32, gloo, Megatron's local spec).

On CPU the packed row's attention is confined to each sequence by a block-diagonal causal mask
(``model.packed_attention``); with Transformer Engine the same batches go through THD attention.
Losses, grad norms and held-out metrics must match the padded run's, single-rank and at TP=2 and
PP=2, for SimPO and for DPO with a live reference (whose forward also runs on packed rows).
"""

import pytest
import torch

from fixtures import tiny_run_inputs
from multirank import run_ranks

STEPS = 3


def _train(rank, world, ckpt, data, eval_data, out, loss, pack, layout_kw):
    from megasimpo.config import LossConfig, TrainConfig
    from megasimpo.trainer import Trainer

    cfg = TrainConfig(load=ckpt, data=(data,), eval_data=(eval_data,), out=out,
                      loss=LossConfig(name=loss), steps=STEPS, global_batch_size=8,
                      micro_batch_size=2, lr=2e-2, warmup_ratio=0.0, precision="fp32", seed=7,
                      pack=pack, **layout_kw)
    trainer = Trainer(cfg)
    assert trainer.pack is pack
    rows = trainer.run()
    keys = ("loss", "grad_norm", "rewards/margins", "eval_loss", "eval_rank_accuracy")
    flops = [r["tflops_per_gpu"] * r["step_time_s"] * world * 1e12 for r in rows if "loss" in r]
    return [[r.get(k) for k in keys] for r in rows if "loss" in r], flops


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_run_inputs(str(tmp_path_factory.mktemp("tiny")))


def _close(a, b, rel=1e-4):
    a = torch.tensor([[float("nan") if v is None else v for v in r] for r in a], dtype=torch.float64)
    b = torch.tensor([[float("nan") if v is None else v for v in r] for r in b], dtype=torch.float64)
    return torch.allclose(a, b, rtol=rel, atol=rel * 1e-2, equal_nan=True)


@pytest.mark.parametrize("loss,layouts", [
    ("simpo", [(1, {}), (2, dict(tp=2)), (2, dict(pp=2))]),
    ("dpo", [(1, {})]),
], ids=["simpo", "dpo_live"])
def test_packed_matches_padded(loss, layouts, inputs, tmp_path):
    ckpt, data, eval_data = inputs
    padded, padded_flops = run_ranks(_train, 1, ckpt, data, eval_data, str(tmp_path / "pad"),
                                      loss, False, {})[0]
    assert abs(padded[-1][0] - padded[0][0]) > 1e-3  # it trained: equality is not trivial
    for world, layout in layouts:
        out = str(tmp_path / f"pack{world}{''.join(layout)}")
        for rows, flops in run_ranks(_train, world, ckpt, data, eval_data, out, loss, True, layout):
            assert _close(rows, padded), (layout, rows, padded)
            # The tiny pairs are mostly padding at the longest pair's length: a packed step runs
            # (and counts) far fewer positions.
            assert all(f < 0.8 * p for f, p in zip(flops, padded_flops)), (flops, padded_flops)
