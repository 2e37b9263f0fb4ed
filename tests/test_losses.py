"""Preference losses against independent hand computations (Python ``math``, never torch).

Inputs are dyadic (exact in float32 and mostly in bf16) so the float32 module can be held to rel 1e-6.
"""

import math

import pytest
import torch

from megasimpo.config import LOSSES, LossConfig
from megasimpo.losses import (
    PairLogps,
    metric_names,
    alphapo_loss,
    cpo_loss,
    dpo_loss,
    dpo_norm_loss,
    ipo_loss,
    orpo_loss,
    preference_loss,
    rdpo_loss,
    simpo_loss,
)

pytestmark = pytest.mark.fast  # in `make test-fast`

# (s_w, s_l, n_w, n_l, r_w, r_l): summed policy logps, response token counts, summed reference logps.
# Token counts differ within and across pairs; the last pair is separated widely enough that hinge is 0.
PAIRS = [
    (-12.5, -20.0, 10, 16, -13.0, -18.5),
    (-30.0, -9.0, 24, 6, -28.25, -10.0),
    (-4.0, -7.75, 4, 31, -4.5, -7.0),
    (-2.0, -40.0, 8, 10, -3.0, -37.0),
]
REL = 1e-6


def make(pairs=PAIRS, dtype=torch.float32, with_ref=True, requires_grad=False):
    col = list(zip(*pairs))

    def t(i, grad=False):
        return torch.tensor(col[i], dtype=dtype, requires_grad=grad)

    return PairLogps(
        chosen_logps=t(0, requires_grad),
        rejected_logps=t(1, requires_grad),
        chosen_tokens=torch.tensor(col[2]),  # int64, as the data path produces them
        rejected_tokens=torch.tensor(col[3]),
        ref_chosen_logps=t(4) if with_ref else None,
        ref_rejected_logps=t(5) if with_ref else None,
    )


def logsig(z):
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def bt(z, ls=0.0, hinge=False):
    """Bradley-Terry term on the scaled margin z, written out by hand."""
    if hinge:
        return max(0.0, 1.0 - z)
    return -(1.0 - ls) * logsig(z) - ls * logsig(-z)


# ---- hand formulas, one per loss: (s_w, s_l, n_w, n_l, r_w, r_l) -> per-pair loss ----
def ref_simpo(p, beta, gbr, ls=0.0, hinge=False, sft=0.0):
    s_w, s_l, n_w, n_l, _, _ = p
    return bt(beta * (s_w / n_w - s_l / n_l - gbr), ls, hinge) + sft * (-s_w / n_w)


def ref_dpo(p, beta, ls=0.0, hinge=False):
    s_w, s_l, _, _, r_w, r_l = p
    return bt(beta * ((s_w - r_w) - (s_l - r_l)), ls, hinge)


def ref_ipo(p, beta):
    s_w, s_l, _, _, r_w, r_l = p
    return ((s_w - r_w) - (s_l - r_l) - 1.0 / (2.0 * beta)) ** 2


def ref_cpo(p, beta, alpha, ls=0.0, hinge=False):
    s_w, s_l, n_w, _, _, _ = p
    return bt(beta * (s_w - s_l), ls, hinge) + alpha * (-s_w / n_w)


def log_odds(a):
    return a - math.log(-math.expm1(a))  # log(p / (1 - p)), p = e^a


def ref_orpo(p, beta):
    s_w, s_l, n_w, n_l, _, _ = p
    a_w, a_l = s_w / n_w, s_l / n_l
    return -a_w - beta * logsig(log_odds(a_w) - log_odds(a_l))


def ref_rdpo(p, beta, alpha, ls=0.0, hinge=False):
    s_w, s_l, n_w, n_l, r_w, r_l = p
    return bt(beta * ((s_w - r_w) - (s_l - r_l)) + alpha * (n_w - n_l), ls, hinge)


def ref_dpo_norm(p, beta):
    # TRL DPOTrainer loss_type="sigmoid_norm": each summed log-ratio over its own response length.
    s_w, s_l, n_w, n_l, r_w, r_l = p
    return -logsig(beta * ((s_w - r_w) / n_w - (s_l - r_l) / n_l))


def alphapo_reward(a, alpha):
    # AlphaPO (arXiv 2501.03884, TRL CPOTrainer): r = (1 - p^(-alpha)) / alpha of p = exp(avg logp).
    return a if alpha == 0 else (1.0 - math.exp(a) ** (-alpha)) / alpha


def ref_alphapo(p, beta, gamma, alpha, ls=0.0):
    # TRL: logits = r_w - r_l - simpo_gamma / beta; label-smoothed sigmoid of beta * logits.
    s_w, s_l, n_w, n_l, _, _ = p
    logits = alphapo_reward(s_w / n_w, alpha) - alphapo_reward(s_l / n_l, alpha) - gamma / beta
    return bt(beta * logits, ls)


CASES = [  # (LossConfig kwargs, per-loss function, hand formula)
    (dict(name="simpo", beta=2.0, gamma_beta_ratio=0.5), simpo_loss,
     lambda p: ref_simpo(p, 2.0, 0.5)),
    (dict(name="simpo", beta=2.5, gamma_beta_ratio=0.3, label_smoothing=0.2), simpo_loss,
     lambda p: ref_simpo(p, 2.5, 0.3, ls=0.2)),
    (dict(name="simpo", beta=2.0, gamma_beta_ratio=0.5, loss_type="hinge"), simpo_loss,
     lambda p: ref_simpo(p, 2.0, 0.5, hinge=True)),
    (dict(name="simpo", beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.7), simpo_loss,
     lambda p: ref_simpo(p, 2.0, 0.5, sft=0.7)),
    (dict(name="dpo", beta=0.1), dpo_loss, lambda p: ref_dpo(p, 0.1)),
    (dict(name="dpo", beta=0.3, label_smoothing=0.1), dpo_loss, lambda p: ref_dpo(p, 0.3, ls=0.1)),
    (dict(name="dpo", beta=0.6, loss_type="hinge"), dpo_loss, lambda p: ref_dpo(p, 0.6, hinge=True)),
    (dict(name="ipo", beta=0.1), ipo_loss, lambda p: ref_ipo(p, 0.1)),
    (dict(name="ipo", beta=0.5), ipo_loss, lambda p: ref_ipo(p, 0.5)),
    (dict(name="cpo", beta=0.1), cpo_loss, lambda p: ref_cpo(p, 0.1, 1.0)),
    (dict(name="cpo", beta=0.2, cpo_alpha=0.5, label_smoothing=0.1), cpo_loss,
     lambda p: ref_cpo(p, 0.2, 0.5, ls=0.1)),
    (dict(name="cpo", beta=0.1, loss_type="hinge"), cpo_loss, lambda p: ref_cpo(p, 0.1, 1.0, hinge=True)),
    (dict(name="orpo", beta=0.1), orpo_loss, lambda p: ref_orpo(p, 0.1)),
    (dict(name="orpo", beta=0.25), orpo_loss, lambda p: ref_orpo(p, 0.25)),
    (dict(name="rdpo", beta=0.1, rdpo_alpha=0.05), rdpo_loss, lambda p: ref_rdpo(p, 0.1, 0.05)),
    (dict(name="rdpo", beta=0.2, rdpo_alpha=-0.02, label_smoothing=0.15), rdpo_loss,
     lambda p: ref_rdpo(p, 0.2, -0.02, ls=0.15)),
    (dict(name="rdpo", beta=0.6, rdpo_alpha=0.01, loss_type="hinge"), rdpo_loss,
     lambda p: ref_rdpo(p, 0.6, 0.01, hinge=True)),
    (dict(name="dpo_norm", beta=0.1), dpo_norm_loss, lambda p: ref_dpo_norm(p, 0.1)),
    (dict(name="dpo_norm", beta=3.0), dpo_norm_loss, lambda p: ref_dpo_norm(p, 3.0)),
    # TRL's simpo_gamma is absolute: gamma = beta x gamma_beta_ratio (2.0 x 0.5 = 1.0 here).
    (dict(name="alphapo", beta=2.0, gamma_beta_ratio=0.5), alphapo_loss,
     lambda p: ref_alphapo(p, 2.0, 1.0, 0.0)),
    (dict(name="alphapo", beta=2.5, gamma_beta_ratio=0.4, alphapo_alpha=0.25), alphapo_loss,
     lambda p: ref_alphapo(p, 2.5, 1.0, 0.25)),
    (dict(name="alphapo", beta=2.0, gamma_beta_ratio=0.5, alphapo_alpha=-0.5, label_smoothing=0.1),
     alphapo_loss, lambda p: ref_alphapo(p, 2.0, 1.0, -0.5, ls=0.1)),
]
CASE_IDS = [kw["name"] + "-" + ",".join(f"{k}={v}" for k, v in kw.items() if k != "name")
            for kw, _, _ in CASES]


@pytest.mark.parametrize("kw,fn,ref", CASES, ids=CASE_IDS)
def test_per_pair_and_sum_match_hand_computation(kw, fn, ref):
    cfg = LossConfig(**kw)
    expected = [ref(p) for p in PAIRS]
    per_pair, _ = fn(cfg, make())
    assert per_pair.shape == (len(PAIRS),) and per_pair.dtype == torch.float32
    assert per_pair.tolist() == pytest.approx(expected, rel=REL, abs=1e-7)
    loss_sum, _ = preference_loss(cfg, make())
    assert loss_sum.dim() == 0
    assert loss_sum.item() == pytest.approx(math.fsum(expected), rel=REL)


def test_hinge_cases_cover_the_flat_region():
    # Guards the fixture: the hinge cases above must see both a zero and a positive hinge.
    z_simpo = [2.0 * (p[0] / p[2] - p[1] / p[3] - 0.5) for p in PAIRS]
    z_dpo = [0.6 * ((p[0] - p[4]) - (p[1] - p[5])) for p in PAIRS]
    for z in (z_simpo, z_dpo):
        assert any(v > 1 for v in z) and any(v < 1 for v in z)


def test_simpo_uses_response_token_averages():
    # Chosen has the LOWER sum but the HIGHER per-token average: a_w = -10/20 = -0.5, a_l = -6/4 = -1.5.
    pair = [(-10.0, -6.0, 20, 4, 0.0, 0.0)]
    cfg = LossConfig(name="simpo", beta=2.0, gamma_beta_ratio=0.5)
    got = preference_loss(cfg, make(pair, with_ref=False))[0].item()
    expected = -logsig(2.0 * (-0.5 - (-1.5) - 0.5))  # z = 1 -> log(1 + e^-1) ~ 0.313
    on_sums = -logsig(2.0 * (-10.0 - (-6.0) - 0.5))  # z = -9 -> ~9.0
    with_prompt = -logsig(2.0 * (-10.0 / 50 - (-6.0 / 34) - 0.5))  # 30 prompt tokens counted -> ~1.40
    assert got == pytest.approx(expected, rel=REL)
    assert abs(got - on_sums) > 8.0 and abs(got - with_prompt) > 1.0
    rewards = simpo_loss(cfg, make(pair, with_ref=False))[1]
    assert rewards["rewards/accuracies"].tolist() == [1.0]  # a sum-based reward would rank it wrong
    assert rewards["rewards/chosen"].tolist() == pytest.approx([-1.0], rel=REL)


def test_dpo_policy_equal_to_reference_is_log2():
    same = [(s_w, s_l, n_w, n_l, s_w, s_l) for s_w, s_l, n_w, n_l, _, _ in PAIRS]
    per_pair, m = dpo_loss(LossConfig(name="dpo", beta=0.1), make(same))
    assert per_pair.tolist() == pytest.approx([math.log(2.0)] * len(same), rel=1e-7)
    assert m["rewards/margins"].tolist() == [0.0] * len(same)
    assert m["rewards/accuracies"].tolist() == [0.0] * len(same)  # a tie is not a win


def test_dpo_metrics_hand_case():
    # h_w = s_w - r_w = 0.5, -1.75, 0.5, 1; h_l = s_l - r_l = -1.5, 1, -0.75, -3; beta = 0.1.
    loss_sum, m = preference_loss(LossConfig(name="dpo", beta=0.1), make())
    assert m["rewards/chosen"].item() == pytest.approx(0.05 - 0.175 + 0.05 + 0.1, rel=REL)
    assert m["rewards/rejected"].item() == pytest.approx(-0.15 + 0.1 - 0.075 - 0.3, rel=REL)
    assert m["rewards/margins"].item() == pytest.approx(0.2 - 0.275 + 0.125 + 0.4, rel=REL)
    assert m["rewards/accuracies"].item() == 3.0
    assert m["logps/chosen"].item() == pytest.approx(-12.5 - 30 - 4 - 2, rel=REL)
    assert m["logps/rejected"].item() == pytest.approx(-20 - 9 - 7.75 - 40, rel=REL)


def expected_metrics(name, beta, p, alpha=0.0):
    """Per-pair TRL metrics for one pair, by hand."""
    s_w, s_l, n_w, n_l, r_w, r_l = p
    a_w, a_l = s_w / n_w, s_l / n_l
    if name in ("simpo", "orpo"):
        rc, rr, lc, lr = beta * a_w, beta * a_l, a_w, a_l
    elif name == "alphapo":  # TRL: beta x the shaped reward; logps are the averages
        rc, rr, lc, lr = beta * alphapo_reward(a_w, alpha), beta * alphapo_reward(a_l, alpha), a_w, a_l
    elif name == "cpo":
        rc, rr, lc, lr = beta * s_w, beta * s_l, s_w, s_l
    else:
        rc, rr, lc, lr = beta * (s_w - r_w), beta * (s_l - r_l), s_w, s_l
    m = {"rewards/chosen": rc, "rewards/rejected": rr, "rewards/margins": rc - rr,
         "rewards/accuracies": float(rc > rr), "logps/chosen": lc, "logps/rejected": lr}
    if name in ("cpo", "orpo"):
        m["nll_loss"] = -a_w
    if name == "orpo":
        m["log_odds_ratio"] = log_odds(a_w) - log_odds(a_l)
    return m


@pytest.mark.parametrize("name,alpha", [(n, 0.0) for n in ("simpo", "dpo", "ipo", "cpo", "orpo",
                                                             "rdpo", "dpo_norm", "alphapo")]
                         + [("alphapo", 0.3)])
def test_metric_sums_match_hand_computation(name, alpha):
    # dpo_norm's rewards are TRL's: beta x the SUMMED log-ratio (only the loss is per token).
    extra = {"alphapo_alpha": alpha} if alpha else {}
    cfg = LossConfig(name=name, beta=0.3, **extra)
    per = [expected_metrics(name, 0.3, p, alpha) for p in PAIRS]
    loss_sum, sums = preference_loss(cfg, make(requires_grad=True))
    assert loss_sum.requires_grad
    assert set(sums) == set(per[0])
    for k, v in sums.items():
        assert v.dim() == 0 and not v.requires_grad, k
        assert v.item() == pytest.approx(math.fsum(m[k] for m in per), rel=REL, abs=1e-6), k


def test_simpo_sft_weight_adds_chosen_nll_metric():
    cfg = LossConfig(name="simpo", sft_weight=0.5)
    _, m = preference_loss(cfg, make())
    assert m["nll_loss"].item() == pytest.approx(math.fsum(-p[0] / p[2] for p in PAIRS), rel=REL)
    assert "nll_loss" not in preference_loss(LossConfig(name="simpo"), make())[1]


def grads(cfg, fn, pairs=PAIRS):
    x = make(pairs, requires_grad=True)
    fn(cfg, x)[0].sum().backward()
    return x.chosen_logps.grad.tolist(), x.rejected_logps.grad.tolist()


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_simpo_sigmoid_gradient(ls):
    beta, gbr, sft = 2.0, 0.5, 0.3
    cfg = LossConfig(name="simpo", beta=beta, gamma_beta_ratio=gbr, label_smoothing=ls, sft_weight=sft)
    g_w, g_l = grads(cfg, simpo_loss)
    exp_w, exp_l = [], []
    for s_w, s_l, n_w, n_l, _, _ in PAIRS:
        z = beta * (s_w / n_w - s_l / n_l - gbr)
        dz = -(1 - ls) * sig(-z) + ls * sig(z)  # d bt / dz
        exp_w.append(dz * beta / n_w - sft / n_w)
        exp_l.append(-dz * beta / n_l)
    assert g_w == pytest.approx(exp_w, rel=1e-6, abs=1e-9)
    assert g_l == pytest.approx(exp_l, rel=1e-6, abs=1e-9)


def test_simpo_hinge_gradient():
    g_w, _ = grads(LossConfig(name="simpo", beta=2.0, loss_type="hinge"), simpo_loss)
    expected = [-2.0 / n_w if 2.0 * (s_w / n_w - s_l / n_l - 0.5) < 1 else 0.0
                for s_w, s_l, n_w, n_l, _, _ in PAIRS]
    assert g_w == pytest.approx(expected, rel=1e-6)


def test_dpo_gradient():
    beta = 0.1
    g_w, g_l = grads(LossConfig(name="dpo", beta=beta), dpo_loss)
    hs = [(s_w - r_w) - (s_l - r_l) for s_w, s_l, _, _, r_w, r_l in PAIRS]
    assert g_w == pytest.approx([-beta * sig(-beta * h) for h in hs], rel=1e-6)
    assert g_l == pytest.approx([beta * sig(-beta * h) for h in hs], rel=1e-6)


@pytest.mark.parametrize("name", ["dpo", "ipo", "rdpo", "dpo_norm"])
def test_missing_reference_raises(name):
    with pytest.raises(ValueError, match=name):
        preference_loss(LossConfig(name=name), make(with_ref=False))
    half = make()
    half.ref_rejected_logps = None
    with pytest.raises(ValueError, match=name):
        preference_loss(LossConfig(name=name), half)


@pytest.mark.parametrize("name", ["simpo", "cpo", "orpo", "alphapo"])
def test_reference_free_losses_need_no_reference(name):
    loss_sum, _ = preference_loss(LossConfig(name=name), make(with_ref=False))
    assert math.isfinite(loss_sum.item())


def test_orpo_stable_near_zero_logp():
    # a_w = -1e-6: p = 1 - 1e-6, so a naive log(1 - exp(a)) in float32 loses most digits or hits log(0).
    pairs = [(-1e-6, -2.0, 1, 1, 0.0, 0.0), (-8e-6, -0.5, 8, 4, 0.0, 0.0)]
    cfg = LossConfig(name="orpo", beta=0.1)
    x = make(pairs, with_ref=False, requires_grad=True)
    per_pair, m = orpo_loss(cfg, x)
    per_pair.sum().backward()
    assert torch.isfinite(per_pair).all() and torch.isfinite(x.chosen_logps.grad).all()
    assert per_pair.tolist() == pytest.approx([ref_orpo(p, 0.1) for p in pairs], rel=1e-5)
    assert m["log_odds_ratio"].tolist() == pytest.approx(
        [log_odds(p[0] / p[2]) - log_odds(p[1] / p[3]) for p in pairs], rel=1e-5)
    # An average of exactly 0 (certain response) must not produce inf/nan either.
    x0 = make([(0.0, -1.0, 3, 2, 0.0, 0.0)], with_ref=False, requires_grad=True)
    loss0, _ = preference_loss(cfg, x0)
    loss0.backward()
    assert math.isfinite(loss0.item()) and torch.isfinite(x0.chosen_logps.grad).all()


def test_low_precision_inputs_are_computed_in_float32():
    # a = -3/7 is not representable in bf16; a bf16 computation would be off by ~1e-3 relative.
    pair = [(-3.0, -5.0, 7, 3, 0.0, 0.0)]
    cfg = LossConfig(name="simpo")
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        loss_sum, m = preference_loss(cfg, make(pair, dtype=dtype, with_ref=False))
        assert loss_sum.dtype == torch.float32 and m["logps/chosen"].dtype == torch.float32
        assert loss_sum.item() == pytest.approx(ref_simpo(pair[0], 2.0, 0.5), rel=REL)


@pytest.mark.parametrize("kw", [
    dict(name="ipo", loss_type="hinge"),
    dict(name="orpo", loss_type="hinge"),
    dict(name="orpo", label_smoothing=0.1),
    dict(name="ipo", label_smoothing=0.1),
    dict(name="dpo", loss_type="hinge", label_smoothing=0.1),
    dict(name="dpo", sft_weight=0.5),
    # TRL's sigmoid_norm is a plain -logsigmoid: label smoothing and hinge would be ignored.
    dict(name="dpo_norm", loss_type="hinge"),
    dict(name="dpo_norm", label_smoothing=0.1),
    dict(name="alphapo", loss_type="hinge"),  # TRL's AlphaPO is its sigmoid "simpo" form only
    dict(name="alphapo", sft_weight=0.5),  # TRL's AlphaPO sets cpo_alpha = 0
    dict(name="simpo", alphapo_alpha=0.25),
    dict(name="dpo_norm", alphapo_alpha=-0.5),
])
def test_options_the_loss_would_ignore_raise(kw):
    # Refused when the configuration is built (a flag or config.yaml), before any model exists.
    with pytest.raises(ValueError, match=r"--(loss-type|label-smoothing|sft-weight|alphapo-alpha) "
                                         r".* --loss|simpo only"):
        LossConfig(**kw)


@pytest.mark.parametrize("kw", [dict(name=n) for n in LOSSES] + [dict(name="simpo", sft_weight=0.5),
                                                                 dict(name="alphapo", alphapo_alpha=0.3)])
def test_declared_metric_names_are_the_ones_returned(kw):
    cfg = LossConfig(**kw)
    _, metrics = preference_loss(cfg, make(with_ref=cfg.needs_reference))
    assert tuple(sorted(metrics)) == metric_names(cfg)
    assert ("nll_loss" in metric_names(cfg)) == (cfg.name in ("cpo", "orpo", "sft") or cfg.sft_weight > 0)


def test_mismatched_shapes_raise():
    x = make()
    x.rejected_logps = x.rejected_logps[:2]
    with pytest.raises(ValueError, match="shape"):
        preference_loss(LossConfig(name="simpo"), x)


def test_sft_loss_is_mean_chosen_nll_by_hand():
    from megasimpo.losses import sft_loss

    cfg = LossConfig(name="sft")
    x = PairLogps(torch.tensor([-6.0, -3.0]), torch.tensor([-2.0, -9.0]),
                  torch.tensor([3.0, 2.0]), torch.tensor([1.0, 3.0]))
    loss, m = sft_loss(cfg, x)
    assert loss.tolist() == [2.0, 1.5]  # -(-6/3), -(-3/2)
    assert m["rewards/accuracies"].tolist() == [0.0, 1.0]  # -2 vs -2/1; -1.5 vs -3
    total, sums = preference_loss(cfg, x)
    assert total.item() == 3.5 and sums["nll_loss"].item() == 3.5


def test_dpo_norm_divides_each_log_ratio_by_its_own_response_length():
    # Summed log-ratios favour the rejected response (1 < 3); per token the chosen one (1/2 > 3/30).
    pair = [(-9.0, -20.0, 2, 30, -10.0, -23.0)]
    cfg = LossConfig(name="dpo_norm", beta=2.0)
    loss, m = dpo_norm_loss(cfg, make(pair))
    assert loss.item() == pytest.approx(-logsig(2.0 * (0.5 - 0.1)), rel=REL)
    dpo = dpo_loss(LossConfig(name="dpo", beta=2.0), make(pair))[0].item()
    assert dpo == pytest.approx(-logsig(2.0 * (1.0 - 3.0)), rel=REL) and dpo > loss.item() + 1.0
    # TRL logs the unnormalised rewards: beta x summed log-ratio, so the reward "accuracy" is 0 here
    assert m["rewards/chosen"].item() == pytest.approx(2.0, rel=REL)
    assert m["rewards/rejected"].item() == pytest.approx(6.0, rel=REL)
    assert m["rewards/accuracies"].item() == 0.0
    assert m["logps/chosen"].item() == -9.0  # summed, as TRL's DPO logs them


def test_dpo_norm_gradient():
    beta = 1.5
    g_w, g_l = grads(LossConfig(name="dpo_norm", beta=beta), dpo_norm_loss)
    exp_w, exp_l = [], []
    for s_w, s_l, n_w, n_l, r_w, r_l in PAIRS:
        d = (s_w - r_w) / n_w - (s_l - r_l) / n_l
        exp_w.append(-beta * sig(-beta * d) / n_w)
        exp_l.append(beta * sig(-beta * d) / n_l)
    assert g_w == pytest.approx(exp_w, rel=1e-6)
    assert g_l == pytest.approx(exp_l, rel=1e-6)


def test_alphapo_at_alpha_zero_is_simpo():
    kw = dict(beta=2.5, gamma_beta_ratio=0.3, label_smoothing=0.1)
    a_loss, a_m = alphapo_loss(LossConfig(name="alphapo", **kw), make(with_ref=False))
    s_loss, s_m = simpo_loss(LossConfig(name="simpo", **kw), make(with_ref=False))
    assert a_loss.tolist() == s_loss.tolist()
    assert {k: v.tolist() for k, v in a_m.items()} == {k: v.tolist() for k, v in s_m.items()}


@pytest.mark.parametrize("alpha", [0.25, -0.5])
def test_alphapo_gradient(alpha):
    # du/da = p^(-alpha) = exp(-alpha a); z = beta (u_w - u_l - gbr); d bt / dz = -sigmoid(-z).
    beta, gbr = 2.0, 0.5
    cfg = LossConfig(name="alphapo", beta=beta, gamma_beta_ratio=gbr, alphapo_alpha=alpha)
    g_w, g_l = grads(cfg, alphapo_loss)
    exp_w, exp_l = [], []
    for s_w, s_l, n_w, n_l, _, _ in PAIRS:
        a_w, a_l = s_w / n_w, s_l / n_l
        z = beta * (alphapo_reward(a_w, alpha) - alphapo_reward(a_l, alpha) - gbr)
        exp_w.append(-sig(-z) * beta * math.exp(-alpha * a_w) / n_w)
        exp_l.append(sig(-z) * beta * math.exp(-alpha * a_l) / n_l)
    assert g_w == pytest.approx(exp_w, rel=1e-5)
    assert g_l == pytest.approx(exp_l, rel=1e-5)


def test_alphapo_alpha_must_be_finite():
    with pytest.raises(ValueError, match="--alphapo-alpha"):
        LossConfig(name="alphapo", alphapo_alpha=float("nan"))


def test_new_losses_defaults_and_reference():
    assert LossConfig(name="dpo_norm").beta == 0.1 and LossConfig(name="dpo_norm").needs_reference
    cfg = LossConfig(name="alphapo")
    assert (cfg.beta, cfg.alphapo_alpha, cfg.gamma) == (2.0, 0.0, 1.0) and not cfg.needs_reference


@pytest.mark.parametrize("name", LOSSES)
def test_planner_budgets_a_live_reference_copy_for_reference_losses(name):
    # The memory model reads REFERENCE_LOSSES: a new reference loss gets its frozen copy budgeted.
    from megasimpo import memory_model
    from megasimpo.config import REFERENCE_LOSSES, ModelConfig

    model = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                        num_query_groups=2, head_dim=16, vocab_size=128, max_position_embeddings=64)
    live = memory_model.memory_breakdown(model, seq_length=64, loss=name, ref="live")
    pre = memory_model.memory_breakdown(model, seq_length=64, loss=name, ref="precomputed")
    assert (live.reference > 0) == (name in REFERENCE_LOSSES) and pre.reference == 0
    assert LossConfig(name=name).needs_reference == (name in REFERENCE_LOSSES)
