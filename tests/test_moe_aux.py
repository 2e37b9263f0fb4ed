"""The MoE load-balancing loss (``--moe-aux-loss-coeff``) and routing metrics against
transformers' ``load_balancing_loss_func`` (``megasimpo/moe_aux.py``), fp32, one rank.

One training step of a tiny Qwen3-MoE records each router's input, weight and padding mask; from
them transformers' function gives the reference: ``moe/aux_loss`` is the pair-weighted mean over
micro-batches of the mean over MoE layers of its value on the real tokens, and the aux loss's
gradient on the last MoE layer's router (no later router depends on it) equals C times the
gradient of that reference, measured as the difference between a run with C and one without.
The layouts' agreement with aux on is ``tests/test_moe_training.py``'s.
"""

import pytest
import torch

from multirank import run_ranks
from test_moe_training import MOE

COEFF = 0.5


def _step(rank, world, ckpt, data, out, coeff):
    from megasimpo.config import TrainConfig
    from megasimpo.model import unwrap
    from megasimpo.trainer import Trainer

    cfg = TrainConfig(load=ckpt, data=(data,), out=out, steps=1, global_batch_size=8,
                      micro_batch_size=2, precision="fp32", seed=7, clip_grad=0.0,
                      moe_aux_loss_coeff=coeff)
    trainer = Trainer(cfg)
    seen, routers = [], {}
    for layer in unwrap(trainer.model[0]).decoder.layers:
        if hasattr(layer.mlp, "router"):
            routers[layer.layer_number] = layer.mlp.router

            def hook(router, args, output, number=layer.layer_number):
                if torch.is_grad_enabled():
                    seen.append((number, args[0].detach().clone(), args[1].clone(),
                                 router.weight.detach().clone()))
            layer.mlp.router.register_forward_hook(hook)
    row = trainer.train_step(0)
    last = max(routers)
    return row, seen, routers[last].weight.main_grad.clone(), last


def _reference(seen, pairs_per_microbatch, total_pairs, last):
    """(pair-weighted aux loss, its gradient on router ``last``'s weight, load imbalance) from
    transformers' function on the recorded inputs."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    moe_layers = MOE.num_layers - len(MOE.dense_layers)
    weight = next(w for n, _, _, w in seen if n == last).clone().requires_grad_(True)
    total, counts = 0.0, {}
    for number, hidden, padding, w in seen:
        use = weight if number == last else w
        logits = (hidden @ use.t()).transpose(0, 1)  # [s, b, E] -> [b, s, E]
        mask = (~padding).t()  # the router gets [s, b]; True at real tokens
        value = load_balancing_loss_func((logits.reshape(-1, logits.shape[-1]),),
                                         MOE.num_experts, MOE.experts_per_token, mask)
        total = total + value * pairs_per_microbatch / moe_layers
        top = logits[mask].topk(MOE.experts_per_token, dim=-1).indices.reshape(-1)
        counts[number] = counts.get(number, 0) + torch.bincount(top, minlength=MOE.num_experts)
    aux = total / total_pairs
    (grad,) = torch.autograd.grad(aux, weight)
    imbalance = max((c.max() / c.float().mean()).item() for c in counts.values())
    return aux.item(), grad, imbalance


@pytest.fixture(scope="module")
def inputs(shared_inputs):
    return shared_inputs(model=MOE)


def test_aux_loss_is_transformers_load_balancing_loss(inputs, tmp_path):
    ckpt, data, _ = inputs
    row, seen, grad_with, last = run_ranks(_step, 1, ckpt, data, str(tmp_path / "a"), COEFF)[0]
    row0, _, grad_without, _ = run_ranks(_step, 1, ckpt, data, str(tmp_path / "b"), 0.0)[0]
    assert any(padding.any() for _, _, padding, _ in seen)  # the mask matters here
    aux, grad, imbalance = _reference(seen, 2, 8, last)
    assert row["moe/aux_loss"] == pytest.approx(aux, rel=1e-5)
    assert row0["moe/aux_loss"] == pytest.approx(aux, rel=1e-5)  # logged with C = 0 too
    assert row["moe/load_imbalance"] == pytest.approx(imbalance, rel=1e-6)
    assert row["loss"] == row0["loss"]  # the preference loss is reported without the aux loss
    # The aux loss reaches the gradient: C x its gradient on the last router, nothing else.
    torch.testing.assert_close(grad_with - grad_without, COEFF * grad, rtol=1e-4, atol=1e-7)
    assert (grad_with - grad_without).abs().max() > 1e-4


def test_aux_loss_on_a_dense_model_is_refused(shared_inputs, tmp_path):
    from fixtures import TINY  # noqa: F401 (the default shared model is dense)
    from multirank import run_main

    ckpt, data, _ = shared_inputs()
    p = run_main("megasimpo", ["train", "--load", ckpt, "--data", data, "--out",
                               str(tmp_path / "r"), "--moe-aux-loss-coeff", "0.01"])
    assert p.returncode == 2
    assert "--moe-aux-loss-coeff 0.01: LlamaForCausalLM has no experts" in p.stderr
