"""Mixture-of-experts training across layouts against the single-rank run (fp32, gloo).

A tiny Qwen3-MoE (4 experts, top-2 renormalised, layer 0 dense, q/k norms) trains 3 steps of
SimPO and of DPO with a live reference, with the load-balancing loss on, at EP=2 under both
token dispatchers, at TP=2 + EP=2 (4 ranks, sequence parallel, experts split over ETP=2) and at
PP=2; losses, grad norms, ``moe/aux_loss`` and ``moe/load_imbalance`` equal the single-rank
run's. Routing is discrete, so the single-rank run first checks that every token's
top-k experts win by a margin well above fp32 layout noise (``MIN_MARGIN``): the same weights, to
1e-6, route every token alike at every layout. Stop and resume at EP=2 is bit-exact, and the
checkpoint saved at EP=2 loads at EP=1.
"""

import dataclasses

import pytest
import torch

from fixtures import TINY
from multirank import run_ranks
from test_resume import _final_params, _losses, _train_in_ranks

MOE = dataclasses.replace(TINY, architecture="Qwen3MoeForCausalLM", qk_norm=True, num_experts=4,
                          experts_per_token=2, moe_ffn_hidden_size=32, dense_layers=(0,))
STEPS = 3
# Smallest gap allowed between a token's k-th and (k+1)-th router logit: the layouts' logits
# (|logit| < 1) agree to ~1e-7 (their losses do), so a gap 100x that routes alike everywhere.
MIN_MARGIN = 1e-5
# Layouts against single rank: name -> (world size, TrainConfig layout fields).
LAYOUTS = {
    "ep2_alltoall": (2, dict(ep=2)),
    "ep2_allgather": (2, dict(ep=2, moe_dispatcher="allgather")),
    "tp2_ep2": (4, dict(tp=2, ep=2)),
    "pp2": (2, dict(pp=2)),
}
# lr 2e-2 (the dense parity tests') makes the third step amplify fp32 layout noise to 2e-5 in
# the grad norm once the aux loss is on (1e-7 at step 1 with a coefficient of 10); 1e-2 keeps
# every step within 1e-6.
LR = 1e-2
AUX = 0.1  # every run here adds the load-balancing loss (its gradient must agree too)
TRAIN_FLAGS = {"moe_aux_loss_coeff": AUX}


def _margins(chunks, k: int) -> list:
    """Forward hooks on every router recording, per call, the smallest gap between the k-th
    and (k+1)-th largest logit of any token."""
    from megasimpo.model import unwrap

    gaps = []

    def hook(router, inputs, output):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
        top = (x @ router.weight.detach().t()).topk(k + 1, dim=-1).values
        gaps.append((top[:, k - 1] - top[:, k]).min().item())

    for chunk in chunks:
        for layer in unwrap(chunk).decoder.layers:
            if hasattr(layer.mlp, "router"):
                layer.mlp.router.register_forward_hook(hook)
    return gaps


def _train(rank, world, ckpt, data, out, loss, layout_kw, measure_margin):
    from megasimpo.config import LossConfig, TrainConfig
    from megasimpo.trainer import Trainer

    cfg = TrainConfig(load=ckpt, data=(data,), out=out, loss=LossConfig(name=loss),
                      steps=STEPS, global_batch_size=8, micro_batch_size=2, lr=LR,
                      warmup_ratio=0.0, precision="fp32", seed=7, **TRAIN_FLAGS, **layout_kw)
    trainer = Trainer(cfg)
    gaps = _margins(trainer.model, MOE.experts_per_token) if measure_margin else []
    rows = trainer.run()
    return ([r["loss"] for r in rows], [r["grad_norm"] for r in rows], gaps,
            [(r["moe/aux_loss"], r["moe/load_imbalance"]) for r in rows])


@pytest.fixture(scope="module")
def inputs(shared_inputs):
    return shared_inputs(model=MOE)


@pytest.fixture(scope="module")
def single(inputs, tmp_path_factory):
    """``single(loss)``: the single-rank run's (losses, grad norms), run once per loss, its
    routing margins checked."""
    ckpt, data, _ = inputs
    done = {}

    def get(loss):
        if loss not in done:
            losses, norms, gaps, moe = run_ranks(_train, 1, ckpt, data,
                                                 str(tmp_path_factory.mktemp(f"single_{loss}")),
                                                 loss, {}, True)[0]
            assert gaps and min(gaps) > MIN_MARGIN, (loss, min(gaps))
            done[loss] = losses, norms, moe
        return done[loss]

    return get


CASES = [pytest.param(name, loss, marks=[pytest.mark.fast] if (name, loss) == (
    "ep2_alltoall", "simpo") else []) for loss in ("simpo", "dpo") for name in LAYOUTS]


@pytest.mark.parametrize("name,loss", CASES)
def test_moe_layout_matches_single_rank(name, loss, inputs, single, tmp_path):
    ckpt, data, _ = inputs
    world, layout = LAYOUTS[name]
    results = run_ranks(_train, world, ckpt, data, str(tmp_path / "run"), loss, layout, False)
    losses, norms, _, moe = results[-1]  # the last rank is on the last pipeline stage
    want_losses, want_norms, want_moe = single(loss)
    assert losses == pytest.approx(want_losses, rel=1e-5), (name, loss, losses, want_losses)
    assert norms == pytest.approx(want_norms, rel=1e-5), (name, loss, norms, want_norms)
    for (aux, imbalance), (want_aux, want_imbalance) in zip(moe, want_moe):
        assert aux == pytest.approx(want_aux, rel=1e-5) and imbalance == want_imbalance


def _cmd(ckpt, data, out, *flags):
    return ["megasimpo", "train", "--load", ckpt, "--data", data, "--out", str(out), "--steps",
            "6", "--global-batch-size", "8", "--micro-batch-size", "2", "--lr", "1e-2", "--seed",
            "3", "--precision", "fp32", "--ep", "2", "--moe-aux-loss-coeff", str(AUX), *flags]


def test_stop_resume_at_ep2_is_bit_exact_and_loads_at_ep1(inputs, tmp_path):
    ckpt, data, _ = inputs
    _train_in_ranks(_cmd(ckpt, data, tmp_path / "straight"))
    resumed = tmp_path / "resumed"
    cmd = _cmd(ckpt, data, resumed, "--exit-interval", "3")
    assert "stopping after step 3" in _train_in_ranks(cmd)
    assert "after step 3" in _train_in_ranks(cmd)  # the same command resumes
    straight, again = _losses(tmp_path / "straight"), _losses(resumed)
    for step in (4, 5, 6):
        assert again[step] == straight[step], (step, again[step], straight[step])
    # Saved at EP=2 (each rank wrote its two experts), loaded whole on one rank.
    a = run_ranks(_final_params, 1, str(tmp_path / "straight" / "final_model"))[0]
    b = run_ranks(_final_params, 1, str(resumed / "final_model"))[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    experts = [k for k in a if ".mlp.experts.local_experts." in k]
    assert len(experts) == 2 * MOE.num_experts * (MOE.num_layers - len(MOE.dense_layers))
    # The EP=2 step-3 checkpoint (weights and optimizer state) resumes at EP=1, DP=2.
    relayout = tmp_path / "relayout"
    _train_in_ranks(_cmd(ckpt, data, relayout, "--exit-interval", "3"))
    _train_in_ranks(_cmd(ckpt, data, relayout, "--ep", "1"))
    again = _losses(relayout)
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(straight[step], rel=1e-5), step
