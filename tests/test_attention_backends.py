"""Attention backends and sequence parallelism on Megatron's local spec (fp32, gloo ranks).

``sdpa`` (PyTorch's fused attention, ``layer_spec.SdpaAttention``) must train exactly like
Megatron's own ``unfused`` DotProductAttention, padded and packed (THD rows for sdpa, a
block-diagonal mask for unfused), at TP=1 and at TP=2 with sequence parallelism on the torch
RMSNorm (``layer_spec.TorchRMSNorm``); and TP=2 + SP must train like TP=1.
"""

import pytest

from multirank import run_ranks

STEPS = 3
RUNS = [(backend, pack) for pack in (False, True) for backend in ("unfused", "sdpa")]


def _train_all(rank, world, ckpt, data, root, layout_kw):
    """Every (backend, pack) run of RUNS in this process: {key: (losses, grad norms, derived)}."""
    from megasimpo.config import LossConfig, TrainConfig
    from megasimpo.trainer import Trainer

    out = {}
    for backend, pack in RUNS:
        cfg = TrainConfig(load=ckpt, data=(data,), out=f"{root}/{backend}-{pack}",
                          loss=LossConfig(name="simpo"), steps=STEPS, global_batch_size=8,
                          micro_batch_size=2, lr=2e-2, warmup_ratio=0.0, precision="fp32",
                          seed=7, attention_backend=backend, pack=pack, **layout_kw)
        trainer = Trainer(cfg)
        rows = trainer.run()
        derived = trainer.resolved()["derived"]
        out[(backend, pack)] = ([r["loss"] for r in rows], [r["grad_norm"] for r in rows],
                                {k: derived[k] for k in ("attention_backend", "packed_sequences")}
                                | {"sp": trainer.layout.sequence_parallel})
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def runs(shared_inputs, tmp_path_factory):
    ckpt, data, _ = shared_inputs()
    tp1 = run_ranks(_train_all, 1, ckpt, data, str(tmp_path_factory.mktemp("tp1")), {})[0]
    tp2 = run_ranks(_train_all, 2, ckpt, data, str(tmp_path_factory.mktemp("tp2")),
                    {"tp": 2, "sequence_parallel": True})[0]
    return {1: tp1, 2: tp2}


def _close(a, b, rel=1e-5):
    assert len(a) == len(b) == STEPS
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * max(abs(x), abs(y), 1e-6), (a, b)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("pack", [False, True])
def test_sdpa_equals_unfused(runs, tp, pack):
    sdpa, unfused = runs[tp][("sdpa", pack)], runs[tp][("unfused", pack)]
    assert sdpa[2]["attention_backend"] == "sdpa" and unfused[2]["attention_backend"] == "unfused"
    assert sdpa[2]["packed_sequences"] is pack
    _close(sdpa[0], unfused[0])
    _close(sdpa[1], unfused[1])
    assert sdpa[0][0] != sdpa[0][-1]  # the model trains: a frozen run would match trivially


@pytest.mark.parametrize("pack", [False, True])
def test_tp2_sequence_parallel_equals_tp1(runs, pack):
    tp2 = runs[2][("sdpa", pack)]
    assert tp2[2]["sp"] is True
    _close(tp2[0], runs[1][("sdpa", pack)][0], rel=1e-4)
    _close(tp2[1], runs[1][("sdpa", pack)][1], rel=1e-4)


def test_unfused_with_context_parallelism_is_refused_in_one_line():
    # Megatron's unfused DotProductAttention has no context parallelism (sdpa and te have).
    from megasimpo.config import TrainConfig

    with pytest.raises(ValueError, match=r"^--attention-backend unfused has no context "
                                         r"parallelism \(--cp 2\); use --attention-backend sdpa"):
        TrainConfig(load="ckpt", data=("d",), out="o", attention_backend="unfused", cp=2)
    TrainConfig(load="ckpt", data=("d",), out="o", attention_backend="sdpa", cp=2)
    TrainConfig(load="ckpt", data=("d",), out="o", attention_backend="unfused", cp=1)
