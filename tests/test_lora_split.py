"""Per-projection LoRA targets (megasimpo/lora_targets.py, lora.SplitAdapter): the target names
and their mapping, and the adapters against plain arithmetic: the hooked forward equals the
base weights plus each member's alpha/r B A at its rows, and TP=2 (with and without sequence
parallelism) gives the single-rank outputs and each member's gradient, sharded as its rows are
(q/k/v per query group, gate/up as fc1)."""

import pytest
import torch

from fixtures import TINY
from megasimpo.config import LoraConfig
from multirank import run_ranks

# k_proj and up_proj left out: their rows of the fused output must stay the base's
CFG = LoraConfig(rank=4, alpha=6.0, targets=("q_proj", "v_proj", "o_proj", "gate_proj",
                                             "down_proj"))
WIDTHS = {"q_proj": 32, "k_proj": 16, "v_proj": 16, "gate_proj": 64, "up_proj": 64}


def _fill(chunk, tp_rank, tp):
    """Each adapter's B from a fixed global one: members' rows sliced as their TP shard."""
    from megasimpo import lora

    for layer in chunk.decoder.layers:
        for a in (m for m in layer.modules() if isinstance(m, lora.LoraAdapter)):
            gen = torch.Generator().manual_seed(100 * layer.layer_number + len(a.target))
            out_local, r = a.lora_b.shape
            full = torch.randn(out_local * (tp if a.column else 1), r, generator=gen) * 0.2
            a.lora_b.data.copy_(full.chunk(tp)[tp_rank] if a.column else full)


def _forward(rank, world, sp=None):
    from megasimpo import lora
    from megasimpo.config import Layout
    from megasimpo.model import Precision, build_chunks
    from megasimpo.parallel import groups

    layout = Layout.resolve(TINY, world, tp=world, sequence_parallel=sp)
    g = groups.initialize(layout, 0)
    chunk = build_chunks(TINY, layout, Precision(name="fp32"), seed=1)[0]
    lora.apply([chunk], CFG, tp_group=g.tp, seed=7)
    _fill(chunk, g.tp_rank, world)
    ids = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)
    out = chunk(ids, pos, None)
    v = out.shape[-1]
    weight = torch.randn(2, 16, v * world, generator=torch.Generator().manual_seed(1))
    (out * weight[..., g.tp_rank * v:(g.tp_rank + 1) * v]).sum().backward()
    grads = {}
    for name, p in chunk.named_parameters():
        if p.grad is not None:
            if getattr(p, "sequence_parallel", False):  # what finalize_model_grads does
                torch.distributed.all_reduce(p.grad, group=g.tp)
            grads[name] = p.grad
    full = [torch.empty_like(out) for _ in range(world)]
    torch.distributed.all_gather(full, out.detach().contiguous(), group=g.tp)
    merged = None
    if world == 1:  # the merged weights: base + each member's B A at its rows, by hand
        with torch.no_grad():
            merged = _merged_by_hand(chunk, ids, pos)
    return torch.cat(full, -1), grads, merged


def _merged_by_hand(chunk, ids, pos):
    """The forward with every adapter folded into its weight, QKV rows interleaved per query
    group written out here (not through mapping.qkv_to_mcore), adapters off."""
    from megasimpo import lora

    g, d = TINY.num_query_groups, TINY.head_dim
    per = TINY.num_attention_heads // g * d
    for layer in chunk.decoder.layers:
        attn, mlp = layer.self_attention, layer.mlp
        parts = attn.linear_qkv_lora.parts
        before = attn.linear_qkv.weight.clone(), mlp.linear_fc1.weight.clone()
        for j in range(g):  # group j's rows: its q heads, then its k head, then its v head
            base = j * (per + 2 * d)
            for name, lo, n, src in (("q_proj", base, per, j * per),
                                     ("v_proj", base + per + d, d, j * d)):
                a = parts[name]
                attn.linear_qkv.weight[lo:lo + n] += \
                    (a.lora_b[src:src + n] @ a.lora_a) * a.scale
        gate = mlp.linear_fc1_lora.parts["gate_proj"]
        mlp.linear_fc1.weight[:TINY.ffn_hidden_size] += gate.lora_b @ gate.lora_a * gate.scale
        for w, old, a in ((attn.linear_qkv.weight, before[0], attn.linear_qkv_lora),
                          (mlp.linear_fc1.weight, before[1], mlp.linear_fc1_lora)):
            torch.testing.assert_close(a.weight_delta(), w - old)  # what lora.merge_ adds
        for base, a in ((attn.linear_proj, attn.linear_proj_lora),
                        (mlp.linear_fc2, mlp.linear_fc2_lora)):
            base.weight += a.lora_b @ a.lora_a * a.scale
    with lora.disabled([chunk]):
        return chunk(ids, pos, None)


def test_forward_equals_members_folded_into_the_weights():
    [(out, _, merged)] = run_ranks(_forward, 1)
    torch.testing.assert_close(out, merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sp", [True, False])
def test_tp2_equals_single_rank(sp):
    [(ref_out, ref_grads, _)] = run_ranks(_forward, 1)
    assert {n.split("_lora.")[1] for n in ref_grads if "parts" in n} == {
        f"parts.{m}.lora_{w}" for m in ("q_proj", "v_proj", "gate_proj") for w in "ab"}
    for rank, (out, grads, _) in enumerate(run_ranks(_forward, 2, sp)):
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        assert set(grads) == set(ref_grads)
        for name, grad in grads.items():
            ref = ref_grads[name]
            tol = dict(rtol=1e-4, atol=1e-5 * ref.abs().max().item(), msg=name)
            if grad.shape != ref.shape:  # column B: this rank's rows; row A: its columns
                ref = ref.chunk(2, 0 if name.endswith("lora_b") else 1)[rank]
            torch.testing.assert_close(grad, ref, **tol)


def test_target_names_are_mapped():
    from megasimpo import lora_targets

    assert LoraConfig(rank=4).targets == lora_targets.FUSED  # the default stays fused
    assert CFG.targets == ("q_proj", "v_proj", "linear_proj", "gate_proj", "linear_fc2")
    assert LoraConfig(rank=4, targets=("all-linear",)).targets == lora_targets.ALL_LINEAR
    assert LoraConfig(rank=4, targets=("down_proj", "linear_qkv")).targets == \
        ("linear_qkv", "linear_fc2")
    assert LoraConfig(rank=4, alpha=8.0, rslora=True).scale == 4.0  # alpha / sqrt(r)


@pytest.mark.parametrize("targets,msg", [
    (("qkv_proj",), "each must be one of linear_qkv, .*q_proj, .* or all-linear, not 'qkv_proj'"),
    (("linear_qkv", "k_proj"), "linear_qkv .* and k_proj both adapt the same projection"),
    (("o_proj", "linear_proj"), "name each projection once"),
])
def test_bad_targets_are_refused(targets, msg):
    with pytest.raises(ValueError, match="--lora-targets .*" + msg):
        LoraConfig(rank=4, targets=targets)


def test_rank_wider_than_a_member_is_refused():
    from megasimpo import lora

    with pytest.raises(ValueError, match="--lora-rank 20 exceeds k_proj's width"):
        lora.check_fits(LoraConfig(rank=20, targets=("all-linear",)), TINY)
