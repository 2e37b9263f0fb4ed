"""Packed micro-batches train exactly like padded ones (fp32, gloo, Megatron's local spec).

On CPU the packed row's attention is confined to each sequence by a block-diagonal causal mask
(``model.packed_attention``); with Transformer Engine the same batches go through THD attention.
Losses, grad norms and held-out metrics must match the padded run's, single-rank and at TP=2 and
PP=2, for SimPO and for DPO with a live reference (whose forward also runs on packed rows).
"""

import pytest
import torch

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
def inputs(shared_inputs):
    return shared_inputs()


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


def _evaluate_in_windows(rank, world, ckpt, data, eval_data, out, pack):
    from unittest import mock

    import megasimpo.trainer as trainer_mod
    from megasimpo.config import TrainConfig

    cfg = TrainConfig(load=ckpt, data=(data,), eval_data=(eval_data,), out=out, steps=1,
                      global_batch_size=8, micro_batch_size=2, precision="fp32", seed=7, pack=pack)
    trainer = trainer_mod.Trainer(cfg)
    shapes, prepare = [], trainer._prepare

    def spy(batches):
        ready, totals = prepare(batches)
        shapes.append([tuple(b.tokens.shape) for b in ready])
        return ready, totals

    trainer._prepare = spy
    whole = trainer.evaluate(trainer.eval_data)
    with mock.patch.object(trainer_mod, "WINDOW", 3):  # the 8 eval micro-batches in windows of 3, 3 and 2
        windowed = trainer.evaluate(trainer.eval_data)
    trainer.close()
    return whole, windowed, shapes


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_evaluate_builds_one_window_at_a_time(pack, inputs, tmp_path):
    ckpt, data, eval_data = inputs
    whole, windowed, shapes = run_ranks(_evaluate_in_windows, 1, ckpt, data, eval_data,
                                        str(tmp_path / "run"), pack)[0]
    assert [len(s) for s in shapes] == [8, 3, 3, 2]
    assert all(len(set(s)) == 1 for s in shapes)  # one shape per schedule call
    if pack:  # each window packed to its own longest micro-batch, never the whole set's
        assert max(s[0][1] for s in shapes[1:]) == shapes[0][0][1]
        assert all(s[0][0] == 1 for s in shapes)
        assert whole.keys() == windowed.keys()
        assert all(windowed[k] == pytest.approx(v, rel=1e-5, abs=1e-6) for k, v in whole.items())
    else:  # the same micro-batches in the same order: the same sums
        assert windowed == whole
