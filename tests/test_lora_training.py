"""LoRA training through the real engine (fp32, gloo): parallel layouts against the single-rank run,
step 0 against the base model, DPO's live reference (adapters off) against a precomputed one,
and stop/resume."""

import json
import math
import os

import pytest

from fixtures import TINY
from multirank import run_main, run_ranks

STEPS = 3
LORA = dict(rank=4, alpha=8.0)


def _cfg(ckpt, data, out, *, loss="simpo", lora=True, eval_data=None, **kw):
    from megasimpo.config import LoraConfig, LossConfig, TrainConfig

    return TrainConfig(load=ckpt, data=(data,), out=out, loss=LossConfig(name=loss),
                       lora=LoraConfig(**LORA) if lora else LoraConfig(),
                       eval_data=(eval_data,) if eval_data else (), steps=STEPS,
                       global_batch_size=8, micro_batch_size=2, lr=5e-2, warmup_ratio=0.0,
                       precision="fp32", seed=7, **kw)


def _train(rank, world, args, kw):
    from megasimpo import lora
    from megasimpo.model import unwrap
    from megasimpo.trainer import Trainer

    trainer = Trainer(_cfg(*args, **kw))  # args: (ckpt, data, out); kw: _cfg's options
    chunks = [unwrap(m) for m in trainer.model] + [unwrap(m) for m in trainer.reference or []]
    weights = sum(p.numel() for c in chunks for p in c.parameters() if not p.requires_grad)
    rows = trainer.run()
    return rows, weights, lora.parameter_counts(trainer.model)


def _adapters(rank, world, path):
    """Every adapter tensor of a saved LoRA model, loaded single-rank (base + adapters)."""
    from test_parallel_training import _load_full

    return {k: v for k, v in _load_full(rank, world, path).items() if "_lora." in k}


@pytest.fixture(scope="module")
def inputs(shared_inputs):
    return shared_inputs()


@pytest.fixture(scope="module")
def single(inputs, tmp_path_factory):
    ckpt, data, held_out = inputs
    out = str(tmp_path_factory.mktemp("single"))
    rows, _, _ = run_ranks(_train, 1, (ckpt, data, out),
                           dict(eval_data=held_out, logprob_chunk=0))[0]
    return rows, run_ranks(_adapters, 1, os.path.join(out, "final_model"))[0]


def _losses(rows):
    return [r["loss"] for r in rows if "loss" in r]


def test_adapters_train_and_step_zero_is_the_base(inputs, single, tmp_path):
    ckpt, data, held_out = inputs
    rows, adapters = single
    base_rows = run_ranks(_train, 1, (ckpt, data, str(tmp_path / "base")),
                          dict(lora=False, eval_data=held_out, logprob_chunk=0))[0][0]
    # B = 0: the held-out row before training and step 1's forward are the base model's.
    for key in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen"):
        assert rows[0][key] == base_rows[0][key], key
    for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
        assert rows[1][key] == base_rows[1][key], key
    assert _losses(rows)[-1] < _losses(rows)[0]  # the adapters learn
    assert any(v.abs().max() > 0 for k, v in adapters.items() if k.endswith("lora_b"))


# Two ranks: DP takes what TP x PP leaves ({}: DP=2). tp2 is sequence-parallel by default; the
# packed run (THD rows) is compared with the unpacked single-rank one. CP needs TE (GPU only).
@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2), {}, dict(pp=2, vpp=2),
                                    dict(tp=2, pack=True)],
                         ids=["tp2", "pp2", "dp2", "vpp2", "tp2_packed"])
def test_parallel_lora_equals_single_rank(inputs, single, tmp_path, layout):
    ckpt, data, held_out = inputs
    ref_rows, ref_adapters = single
    out = str(tmp_path / "run")
    ranks = run_ranks(_train, 2, (ckpt, data, out), dict(eval_data=held_out, **layout))
    rows = ranks[0][0]
    for a, b in zip(_losses(ref_rows), _losses(rows)):
        assert b == pytest.approx(a, rel=1e-5)
    adapters = run_ranks(_adapters, 1, os.path.join(out, "final_model"))[0]
    assert set(adapters) == set(ref_adapters)
    # As tensors (||a - b|| / ||b||): Adam turns the rounding noise of a near-zero gradient
    # coordinate into a whole +-lr step, so a single element may differ more.
    for k, v in adapters.items():
        ref = ref_adapters[k].double()
        rel = ((v.double() - ref).norm() / ref.norm()).item()
        assert rel <= 1e-5, (k, rel)


def _score(rank, world, ckpt, prefix, out):
    from megasimpo.score import score

    score(ckpt, prefix, out)


def test_dpo_live_reference_is_the_base_with_adapters_off(inputs, tmp_path):
    ckpt, data, held_out = inputs
    files = [str(tmp_path / "train.ref.jsonl"), str(tmp_path / "eval.ref.jsonl")]
    run_ranks(_score, 1, ckpt, data, files[0])
    run_ranks(_score, 1, ckpt, held_out, files[1])
    live, live_weights, (trainable, total) = run_ranks(
        _train, 1, (ckpt, data, str(tmp_path / "live")), dict(loss="dpo", eval_data=held_out))[0]
    pre, pre_weights, _ = run_ranks(
        _train, 1, (ckpt, data, str(tmp_path / "pre")),
        dict(loss="dpo", eval_data=held_out, ref="precomputed", ref_logps=tuple(files)))[0]
    assert live[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    for a, b in zip(live, pre):
        for key in ("loss", "eval_loss", "rewards/margins"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    assert live_weights == pre_weights == total - trainable  # one frozen model, not two


def _run_cli(ckpt, data, out, layout, *flags):
    """``megasimpo train`` on the session's two ranks, as torchrun would start it. What a LoRA
    checkpoint holds is tested here; that a resume needs nothing but the disk (a real process
    restart) is test_resume.test_exit_and_resume_is_bit_exact's."""
    p = run_main("megasimpo", ["train", "--load", ckpt, "--data", data, "--out", str(out),
                               "--steps", "6", "--global-batch-size", "8", "--micro-batch-size",
                               "2", "--lr", "1e-2", "--seed", "3", "--lora-rank", "4", *layout,
                               *flags], world_size=2, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _stored(rank, world, path):
    """{key: element count} of a checkpoint's tensors (global shapes, from its metadata)."""
    from megatron.core import dist_checkpointing

    return {k: math.prod(t.global_shape)
            for k, t in dist_checkpointing.load_tensors_metadata(path).items()}


# TP=2, and DP=2, where the distributed optimizer shards the adapters' Adam state over ranks.
@pytest.mark.parametrize("layout", [("--tp", "2"), ()], ids=["tp2", "dp2"])
def test_stop_and_resume_is_bit_exact(inputs, tmp_path, layout):
    ckpt, data, _ = inputs
    straight = _run_cli(ckpt, data, tmp_path / "straight", layout)
    first = _run_cli(ckpt, data, tmp_path / "resumed", layout, "--exit-interval", "3",
                     "--save-interval", "3")
    assert sorted(first) == [1, 2, 3]
    saved = os.path.join(tmp_path, "resumed", "checkpoints", "step_0000003")
    stored, base = run_ranks(_stored, 1, saved)[0], run_ranks(_stored, 1, ckpt)[0]
    model_keys = [k for k in stored if not k.startswith("optimizer")]
    assert model_keys and all("_lora." in k for k in model_keys)  # adapters (and their state) only
    # Adapter elements by hand, sum over targets of r x (in + out) per layer: qkv 32 -> 32 + 2 x 2
    # x 8, proj 32 -> 32, fc1 32 -> 2 x 64, fc2 64 -> 32.  The checkpoint holds them, their fp32
    # main copy and Adam's two moments, nothing more: 4 x 6656 elements against the base's 45344
    # (Llama-3-8B at r=16: 35.7M adapter elements, 0.4% of the model).
    m = TINY
    qkv_out = m.hidden_size + 2 * m.num_query_groups * m.head_dim
    per_layer = 4 * ((m.hidden_size + qkv_out) + 2 * m.hidden_size
                     + (m.hidden_size + 2 * m.ffn_hidden_size) + (m.ffn_hidden_size + m.hidden_size))
    adapters = m.num_layers * per_layer
    assert sum(stored[k] for k in model_keys) == adapters == 6656
    assert sum(stored.values()) == 4 * adapters and sum(base.values()) == 45344
    resumed = _run_cli(ckpt, data, tmp_path / "resumed", layout)
    assert resumed == straight  # bit-identical losses
