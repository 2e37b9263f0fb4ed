"""LoRA adapters (megasimpo/lora.py) against plain arithmetic: B=0 is the base model, the hooked
forward equals the merged weights W + alpha/r B A, and TP=2 (with and without sequence
parallelism) gives the single-rank outputs and adapter gradients."""

import os

import pytest
import torch

from fixtures import TINY
from megasimpo.config import LoraConfig
from multirank import run_ranks

pytestmark = pytest.mark.fast  # in `make test-fast`

CFG = LoraConfig(rank=4, alpha=6.0)


def _global_b(target: str, shape, layer: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * layer + len(target))
    return torch.randn(*shape, generator=g) * 0.1


def _set_b(adapter, layer: int, tp: int, tp_rank: int, ffn: int) -> None:
    """Gives ``adapter`` its slice of a fixed global B (layouts as the checkpoint stores them)."""
    out_local, r = adapter.lora_b.shape
    if not adapter.column:  # row-parallel base: B replicated
        adapter.lora_b.data.copy_(_global_b(adapter.target, (out_local, r), layer))
        return
    full = _global_b(adapter.target, (out_local * tp, r), layer)
    if adapter.gated:  # fc1: [gate(f); up(f)] globally, [gate slice; up slice] on each rank
        n = ffn // tp
        local = torch.cat([full[tp_rank * n:(tp_rank + 1) * n],
                           full[ffn + tp_rank * n:ffn + (tp_rank + 1) * n]])
    else:
        local = full[tp_rank * out_local:(tp_rank + 1) * out_local]
    adapter.lora_b.data.copy_(local)


def _forward(rank, world, tp, mode, sp=None):
    from megasimpo import lora
    from megasimpo.config import Layout
    from megasimpo.model import Precision, build_chunks
    from megasimpo.parallel import groups

    layout = Layout.resolve(TINY, world, tp=tp, sequence_parallel=sp)
    g = groups.initialize(layout, 0)
    chunk = build_chunks(TINY, layout, Precision(name="fp32"), seed=1)[0]
    base_out = None
    ids = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)
    if mode == "zero":
        with torch.no_grad():
            base_out = chunk(ids, pos, None)
    lora.apply([chunk], CFG, tp_group=g.tp, seed=7)
    assert all(not p.requires_grad for n, p in chunk.named_parameters() if "_lora" not in n)
    if mode != "zero":
        for layer in chunk.decoder.layers:
            for a in (m for m in layer.modules() if isinstance(m, lora.LoraAdapter)):
                _set_b(a, layer.layer_number, tp, g.tp_rank, TINY.ffn_hidden_size)
    out = chunk(ids, pos, None)  # [b, s, v/tp]
    if mode == "zero":
        return torch.equal(out.detach(), base_out)
    if mode == "merged":
        with torch.no_grad():
            lora.merge_([chunk])
            merged = chunk(ids, pos, None)
        return (out.detach(), merged)
    v = out.shape[-1]  # padded vocabulary / tp
    weight = torch.randn(2, 16, v * tp, generator=torch.Generator().manual_seed(1))
    (out * weight[..., g.tp_rank * v:(g.tp_rank + 1) * v]).sum().backward()
    grads = {}
    for name, p in chunk.named_parameters():
        if p.grad is None:
            continue
        grad = p.grad
        if getattr(p, "sequence_parallel", False):  # what finalize_model_grads does under SP
            torch.distributed.all_reduce(grad, group=g.tp)
        grads[name] = grad
    full = [torch.empty_like(out) for _ in range(tp)]
    torch.distributed.all_gather(full, out.detach().contiguous(), group=g.tp)
    return torch.cat(full, -1), grads


def test_zero_b_is_the_base_model():
    assert run_ranks(_forward, 1, 1, "zero") == [True]


def test_hooked_forward_equals_merged_weights():
    [(hooked, merged)] = run_ranks(_forward, 1, 1, "merged")
    torch.testing.assert_close(hooked, merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sp", [True, False])
def test_tp2_equals_single_rank(sp):
    [(ref_out, ref_grads)] = run_ranks(_forward, 1, 1, "grad")
    ranks = run_ranks(_forward, 2, 2, "grad", sp)
    for rank, (out, grads) in enumerate(ranks):
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        assert set(grads) == set(ref_grads) and all("_lora" in n for n in grads)
        for name, grad in grads.items():
            ref = ref_grads[name]
            tol = dict(rtol=1e-4, atol=1e-5 * ref.abs().max().item(), msg=name)
            if grad.shape == ref.shape:  # replicated: column A, row B
                torch.testing.assert_close(grad, ref, **tol)
            elif "linear_fc1_lora.lora_b" in name:
                n = TINY.ffn_hidden_size // 2
                want = torch.cat([ref[rank * n:(rank + 1) * n],
                                  ref[TINY.ffn_hidden_size + rank * n:][:n]])
                torch.testing.assert_close(grad, want, **tol)
            else:
                dim = 0 if name.endswith("lora_b") else 1
                want = ref.chunk(2, dim)[rank]
                torch.testing.assert_close(grad, want, **tol)


@pytest.mark.parametrize("kw,msg", [
    (dict(rank=-1), "--lora-rank -1 must be >= 0"),
    (dict(rank=4, targets=("qkv",)), "--lora-targets qkv: each must be one of linear_qkv"),
    (dict(rank=4, dropout=1.0), "--lora-dropout 1.0 must be in"),
])
def test_bad_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        LoraConfig(**kw)


def test_rank_wider_than_a_target_is_refused():
    from megasimpo import lora

    with pytest.raises(ValueError, match="--lora-rank 40 exceeds linear_qkv's width"):
        lora.check_fits(LoraConfig(rank=40), TINY)
    assert LoraConfig(rank=8).scale == 2.0


def _save_then_load(rank, world, root, ckpt, step):
    from megasimpo import checkpoint, lora, lora_checkpoint
    from megasimpo.config import Layout
    from megasimpo.model import Precision, build_chunks
    from megasimpo.parallel import groups

    layout = Layout.resolve(TINY, world, tp=world)
    g = groups.initialize(layout, 0)
    chunk = build_chunks(TINY, layout, Precision(name="fp32"), seed=3)[0]
    ids = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)
    if step == "save":
        checkpoint.load_model([chunk], ckpt)
        lora.apply([chunk], CFG, seed=7)
        for layer in chunk.decoder.layers:
            for a in (m for m in layer.modules() if isinstance(m, lora.LoraAdapter)):
                _set_b(a, layer.layer_number, world, g.tp_rank, TINY.ffn_hidden_size)
        checkpoint.save_model([chunk], TINY, f"{root}/lora", base=lora_checkpoint.base_record(ckpt))
    else:
        assert checkpoint.load_model([chunk], f"{root}/lora")["path"] == os.path.realpath(ckpt)
    with torch.no_grad():
        out = chunk(ids, pos, None)
    full = [torch.empty_like(out) for _ in range(world)]
    torch.distributed.all_gather(full, out.contiguous(), group=g.tp)
    return torch.cat(full, -1)


def _stored(rank, world, path):
    import math

    from megatron.core import dist_checkpointing

    return {k: math.prod(v.global_shape) for k, v in
            dist_checkpointing.load_tensors_metadata(path).items()}


def test_checkpoint_holds_adapters_only_and_reshards(shared_inputs, tmp_path):
    from fixtures import writable_copy

    ckpt = writable_copy(shared_inputs()[0], str(tmp_path / "model"))  # changed below
    saved = run_ranks(_save_then_load, 2, str(tmp_path), ckpt, "save")[0]
    loaded = run_ranks(_save_then_load, 1, str(tmp_path), ckpt, "load")[0]  # TP=2 -> TP=1
    torch.testing.assert_close(loaded, saved, rtol=1e-5, atol=1e-6)
    [stored] = run_ranks(_stored, 1, str(tmp_path / "lora"))  # adapters only, no base weights
    assert all("_lora." in k for k in stored)
    from megasimpo.shapes import layer_shapes

    adapter_numel = TINY.num_layers * layer_shapes(TINY).lora_parameters(CFG.rank, CFG.targets)
    assert sum(stored.values()) == adapter_numel < 0.2 * TINY.num_parameters  # r=4 of width 32
    with open(os.path.join(ckpt, "megasimpo.json"), "a") as f:
        f.write(" ")  # the base changes under the adapters
    with pytest.raises(AssertionError, match="changed since"):
        run_ranks(_save_then_load, 1, str(tmp_path), ckpt, "load")
