"""Preference losses as pure functions of per-sequence log-probs.

Every loss sees only per-pair quantities, all shape ``[b]`` (b pairs): summed response log-probs, response
token counts (prompt tokens never counted) and, for dpo/ipo/rdpo/dpo_norm, the reference model's summed
log-probs.
No process groups and no model here: the last pipeline stage reduces token log-probs to these sums
(``parallel/logprobs.py``) and ``preference_loss`` returns sums over pairs, which the schedule divides by
the global number of pairs (Megatron's loss_func contract). Formulas follow the SimPO paper
(arXiv 2405.14734, Table 3) and the official ``princeton-nlp/SimPO`` trainer; metric names follow TRL.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megasimpo.config import LossConfig

# ORPO takes log(1 - p) with p = exp(avg logp); at avg logp == 0 (a response the model is certain of, or a
# bf16 sum that rounds to >= 0) that is log(0). Capping the average here keeps the loss and its gradient
# (which grows like 1/|a|) finite while leaving every realistic value untouched.
_ORPO_MAX_AVG_LOGP = -1e-7


@dataclass
class PairLogps:
    """Per-pair inputs, all shape ``[b]`` (b pairs)."""

    chosen_logps: torch.Tensor  # sum over chosen response tokens of log p
    rejected_logps: torch.Tensor  # sum over rejected response tokens of log p
    chosen_tokens: torch.Tensor  # number of chosen response tokens (float or int), > 0
    rejected_tokens: torch.Tensor  # number of rejected response tokens (float or int), > 0
    ref_chosen_logps: Optional[torch.Tensor] = None  # reference model, summed; REFERENCE_LOSSES need it
    ref_rejected_logps: Optional[torch.Tensor] = None


def _f32(t: torch.Tensor) -> torch.Tensor:
    # bf16 has 8 mantissa bits: a summed logp of -300 carries an error of ~1, larger than typical margins.
    return t.to(torch.float32)


def _policy(x: PairLogps):
    """Float32 ``(s_w, s_l, n_w, n_l)``, each ``[b]``; checks the shapes agree."""
    tensors = (x.chosen_logps, x.rejected_logps, x.chosen_tokens, x.rejected_tokens)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"PairLogps fields must all have the same shape [b]; got {sorted(shapes)}")
    return tuple(_f32(t) for t in tensors)


def _reference(cfg: LossConfig, x: PairLogps):
    """Float32 ``(r_w, r_l)``, each ``[b]``; ValueError naming the loss if either is missing."""
    if x.ref_chosen_logps is None or x.ref_rejected_logps is None:
        raise ValueError(
            f"loss {cfg.name!r} needs reference log-probs (ref_chosen_logps and ref_rejected_logps); "
            "use --ref live or --ref precomputed"
        )
    shape = x.chosen_logps.shape
    if x.ref_chosen_logps.shape != shape or x.ref_rejected_logps.shape != shape:
        raise ValueError(
            f"reference log-probs shapes {tuple(x.ref_chosen_logps.shape)}, "
            f"{tuple(x.ref_rejected_logps.shape)} do not match the policy's {tuple(x.chosen_logps.shape)}"
        )
    return _f32(x.ref_chosen_logps), _f32(x.ref_rejected_logps)


def _pairwise(cfg: LossConfig, z: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry term on the scaled margin ``z`` [b]: label-smoothed -logsigmoid, or hinge relu(1 - z)."""
    if cfg.loss_type == "hinge":
        return F.relu(1.0 - z)
    ls = cfg.label_smoothing
    # Conservative DPO: the preference label is flipped with probability ls.
    return -(1.0 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)


def _metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, **extra) -> dict:
    """Per-pair ``[b]`` TRL metrics, detached so logging never holds the graph."""
    m = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(torch.float32),
        "logps/chosen": chosen_logps,
        "logps/rejected": rejected_logps,
        **extra,
    }
    return {k: v.detach() for k, v in m.items()}


def simpo_loss(cfg: LossConfig, x: PairLogps):
    """SimPO: length-normalised (prompt-excluded average) log-prob margin against a target margin gamma.

    ``z = beta * (a_w - a_l - gamma_beta_ratio)``, ``a = s / n``. With ``sft_weight > 0`` adds
    ``sft_weight * (-a_w)``: the per-sequence mean NLL of the chosen response. The official trainer uses a
    token-mean cross-entropy over the whole batch instead; the per-sequence mean keeps the loss a sum over
    pairs, so it is independent of how pairs are split into micro-batches and ranks.
    Returns ``(loss [b], metrics {name: [b]})``.
    """
    s_w, s_l, n_w, n_l = _policy(x)
    a_w, a_l = s_w / n_w, s_l / n_l
    loss = _pairwise(cfg, cfg.beta * (a_w - a_l - cfg.gamma_beta_ratio))
    extra = {}
    if cfg.sft_weight > 0:
        loss = loss + cfg.sft_weight * (-a_w)
        extra["nll_loss"] = -a_w
    return loss, _metrics(cfg.beta * a_w, cfg.beta * a_l, a_w, a_l, **extra)


def sft_loss(cfg: LossConfig, x: PairLogps):
    """Supervised fine-tuning on the chosen responses: the per-sequence mean NLL ``-a_w``.

    Not a preference loss: it produces the SFT model the preference losses start from (the SimPO
    paper's pipeline), on the same engine and data. The rejected response is scored, not trained.
    Rewards are ``beta * a`` as for SimPO, so reward accuracy is the likelihood-ranking accuracy.
    """
    s_w, s_l, n_w, n_l = _policy(x)
    a_w, a_l = s_w / n_w, s_l / n_l
    return -a_w, _metrics(cfg.beta * a_w, cfg.beta * a_l, a_w, a_l, nll_loss=-a_w)


def dpo_loss(cfg: LossConfig, x: PairLogps):
    """DPO on summed log-probs: ``h = (s_w - r_w) - (s_l - r_l)``, pairwise term on ``beta * h``.

    Returns ``(loss [b], metrics {name: [b]})``; rewards are ``beta * (s - r)``.
    """
    s_w, s_l, _, _ = _policy(x)
    r_w, r_l = _reference(cfg, x)
    chosen, rejected = s_w - r_w, s_l - r_l
    loss = _pairwise(cfg, cfg.beta * (chosen - rejected))
    return loss, _metrics(cfg.beta * chosen, cfg.beta * rejected, s_w, s_l)


def ipo_loss(cfg: LossConfig, x: PairLogps):
    """IPO: ``(h - 1/(2*beta))**2`` with the DPO log-ratio margin ``h`` on SUMMED log-probs (beta is tau).

    This follows the IPO paper; TRL's IPO averages log-probs per token instead. Returns
    ``(loss [b], metrics {name: [b]})``; rewards as DPO.
    """
    s_w, s_l, _, _ = _policy(x)
    r_w, r_l = _reference(cfg, x)
    chosen, rejected = s_w - r_w, s_l - r_l
    loss = (chosen - rejected - 1.0 / (2.0 * cfg.beta)) ** 2
    return loss, _metrics(cfg.beta * chosen, cfg.beta * rejected, s_w, s_l)


def cpo_loss(cfg: LossConfig, x: PairLogps):
    """CPO: reference-free DPO term on ``beta * (s_w - s_l)`` plus ``cpo_alpha * (-a_w)`` (chosen NLL).

    Label smoothing applies to the sigmoid form, as in TRL's CPO. Returns ``(loss [b], metrics {name: [b]})``;
    rewards are ``beta * s``.
    """
    s_w, s_l, n_w, _ = _policy(x)
    nll = -s_w / n_w
    loss = _pairwise(cfg, cfg.beta * (s_w - s_l)) + cfg.cpo_alpha * nll
    return loss, _metrics(cfg.beta * s_w, cfg.beta * s_l, s_w, s_l, nll_loss=nll)


def orpo_loss(cfg: LossConfig, x: PairLogps):
    """ORPO: ``-a_w - beta * logsigmoid(log_odds(a_w) - log_odds(a_l))``, beta being ORPO's lambda.

    ``log_odds(a) = log(p / (1 - p))`` with ``p = exp(a)``, computed as ``a - log(-expm1(a))`` so it stays
    finite for ``a`` near 0 (``a`` is capped at -1e-7). Returns ``(loss [b], metrics {name: [b]})``;
    rewards are ``beta * a``.
    """
    s_w, s_l, n_w, n_l = _policy(x)
    a_w, a_l = s_w / n_w, s_l / n_l

    def log_odds(a):
        a = a.clamp(max=_ORPO_MAX_AVG_LOGP)
        return a - torch.log(-torch.expm1(a))

    log_odds_ratio = log_odds(a_w) - log_odds(a_l)
    loss = -a_w - cfg.beta * F.logsigmoid(log_odds_ratio)
    return loss, _metrics(
        cfg.beta * a_w, cfg.beta * a_l, a_w, a_l, nll_loss=-a_w, log_odds_ratio=log_odds_ratio
    )


def rdpo_loss(cfg: LossConfig, x: PairLogps):
    """R-DPO: DPO with a length term, pairwise term on ``beta * h + rdpo_alpha * (n_w - n_l)``.

    Returns ``(loss [b], metrics {name: [b]})``; rewards as DPO.
    """
    s_w, s_l, n_w, n_l = _policy(x)
    r_w, r_l = _reference(cfg, x)
    chosen, rejected = s_w - r_w, s_l - r_l
    loss = _pairwise(cfg, cfg.beta * (chosen - rejected) + cfg.rdpo_alpha * (n_w - n_l))
    return loss, _metrics(cfg.beta * chosen, cfg.beta * rejected, s_w, s_l)


def dpo_norm_loss(cfg: LossConfig, x: PairLogps):
    """DPO on per-token log-ratios: ``-logsigmoid(beta * ((s_w - r_w) / n_w - (s_l - r_l) / n_l))``.

    TRL's ``DPOTrainer(loss_type="sigmoid_norm")`` (trl 1.16.0, ``trainer/dpo_trainer.py``): each
    summed log-ratio is divided by its own response's token count (the reference's sum too, by the
    same count), no label smoothing, no hinge. The metrics are TRL's and stay UNnormalised as there:
    rewards ``beta * (s - r)`` on sums, so ``rewards/accuracies`` ranks by summed log-ratio, which
    can differ from the per-token margin the loss pushes. Returns ``(loss [b], metrics {name: [b]})``.
    """
    s_w, s_l, n_w, n_l = _policy(x)
    r_w, r_l = _reference(cfg, x)
    chosen, rejected = s_w - r_w, s_l - r_l
    loss = -F.logsigmoid(cfg.beta * (chosen / n_w - rejected / n_l))
    return loss, _metrics(cfg.beta * chosen, cfg.beta * rejected, s_w, s_l)


def _alphapo_reward(a: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward shape of a per-token average log-prob ``a`` [b]: ``(1 - p^-alpha) / alpha``
    with ``p = exp(a)``, written ``-expm1(-alpha * a) / alpha`` (no exp(a) that underflows first);
    ``a`` itself at alpha 0 (the limit, and TRL's alpha 0 branch)."""
    if alpha == 0:
        return a
    return -torch.expm1(-alpha * a) / alpha


def alphapo_loss(cfg: LossConfig, x: PairLogps):
    """AlphaPO (arXiv 2501.03884): SimPO with the reward ``u = (1 - p^-alpha) / alpha``, ``p = e^a``.

    TRL's ``CPOTrainer(loss_type="alphapo")`` (trl 1.16.0, ``experimental/cpo``): that is its
    "simpo" loss with ``cpo_alpha = 0`` (no NLL term), on per-token averages ``a = s / n``:
    ``z = beta * (u_w - u_l) - simpo_gamma`` with simpo_gamma = beta x gamma_beta_ratio, label-smoothed
    sigmoid (no hinge there). Rewards ``beta * u``; ``logps/*`` are the averages ``a``, as TRL logs.
    At ``alphapo_alpha`` 0 it is SimPO exactly. Returns ``(loss [b], metrics {name: [b]})``.
    """
    s_w, s_l, n_w, n_l = _policy(x)
    a_w, a_l = s_w / n_w, s_l / n_l
    u_w, u_l = _alphapo_reward(a_w, cfg.alphapo_alpha), _alphapo_reward(a_l, cfg.alphapo_alpha)
    loss = _pairwise(cfg, cfg.beta * (u_w - u_l - cfg.gamma_beta_ratio))
    return loss, _metrics(cfg.beta * u_w, cfg.beta * u_l, a_w, a_l)


_LOSSES: dict[str, Callable] = {
    "simpo": simpo_loss,
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "cpo": cpo_loss,
    "orpo": orpo_loss,
    "rdpo": rdpo_loss,
    "sft": sft_loss,
    "dpo_norm": dpo_norm_loss,
    "alphapo": alphapo_loss,
}
# Metrics each loss reports besides the TRL reward/log-prob set of ``_metrics`` (declared here
# so the step knows its statistics vector before any batch; ``preference_loss`` checks it).
_EXTRA_METRICS = {"cpo": ("nll_loss",), "orpo": ("log_odds_ratio", "nll_loss"), "sft": ("nll_loss",)}
_BASE_METRICS = ("logps/chosen", "logps/rejected", "rewards/accuracies", "rewards/chosen",
                 "rewards/margins", "rewards/rejected")


def metric_names(cfg: LossConfig) -> tuple:
    """The names of the metrics ``preference_loss`` returns for ``cfg``, sorted."""
    extra = _EXTRA_METRICS.get(cfg.name, ())
    if cfg.name == "simpo" and cfg.sft_weight > 0:
        extra = ("nll_loss",)
    return tuple(sorted(_BASE_METRICS + extra))


def preference_loss(cfg: LossConfig, x: PairLogps, weights: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss named by ``cfg.name`` over b pairs (``x`` fields ``[b]``), summed over pairs.

    Raises ValueError for a missing reference (``REFERENCE_LOSSES``); options the loss would ignore are
    refused by ``LossConfig`` itself.

    Returns ``(loss_sum, metric_sums)``: ``loss_sum`` is the 0-dim float32 SUM of the per-pair losses,
    carrying autograd; ``metric_sums`` maps each metric name to the detached 0-dim SUM over the pairs. The
    caller divides by the global number of pairs (Megatron's loss_func contract: sums and counts).
    ``weights`` [b] (1.0 for a real pair, 0.0 for filler in a short last micro-batch) weight both sums.
    """
    loss, metrics = _LOSSES[cfg.name](cfg, x)
    assert tuple(sorted(metrics)) == metric_names(cfg), (sorted(metrics), metric_names(cfg))
    if weights is None:
        return loss.sum(), {k: v.sum() for k, v in metrics.items()}
    w = weights.to(loss.dtype)
    return (loss * w).sum(), {k: (v * w).sum() for k, v in metrics.items()}
