"""fused_vocab_parallel_logprobs vs the plain path and fp64: chunking, saved bytes, TP=2 (gloo)."""

import pytest
import torch
import torch.distributed as dist

import megasimpo.parallel.fused_logprobs as fused_mod
from megasimpo.parallel.fused_logprobs import fused_vocab_parallel_logprobs
from megasimpo.parallel.logprobs import vocab_parallel_logprobs
from megasimpo.step import mask_padded_vocab
from multirank import run_ranks

pytestmark = pytest.mark.fast  # in `make test-fast`

S, B, H = 8, 3, 16  # s * b = 24 tokens
V_PAD = 128
VOCAB = 100  # < V_PAD: the last 28 ids are embedding padding


def _inputs(seed=0, dtype=torch.float32, vocab_size=VOCAB):
    """hidden [s, b, h], full weight [v_pad, h], labels [s, b] < vocab_size, grad weights [s, b]."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, B, H, generator=g).to(dtype)
    weight = (0.5 * torch.randn(V_PAD, H, generator=g)).to(dtype)
    labels = torch.randint(0, vocab_size, (S, B), generator=g)
    labels[0, 0], labels[0, 1] = 0, vocab_size - 1  # first and last real id, TP shard edges
    labels[0, 2], labels[1, 0] = (min(i, vocab_size - 1) for i in (V_PAD // 2, V_PAD // 2 - 1))
    upstream = torch.randn(S, B, generator=g)
    return hidden, weight, labels, upstream


def _fused(hidden, weight, labels, upstream, group=None, vocab_size=VOCAB, chunk_size=7):
    """(values, grad_hidden, grad_weight) of sum(upstream * fused logprobs)."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    out = fused_vocab_parallel_logprobs(h, w, labels, tp_group=group, vocab_size=vocab_size,
                                        chunk_size=chunk_size)
    (out * upstream.to(out.dtype)).sum().backward()
    return out.detach(), h.grad, w.grad


def _plain(hidden, weight, labels, upstream, vocab_size=VOCAB):
    """The unfused single-rank path: full logits -> mask_padded_vocab -> vocab_parallel_logprobs."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    logits = mask_padded_vocab(h @ w.t(), vocab_size, 0)
    out = vocab_parallel_logprobs(logits, labels, None)
    (out * upstream).sum().backward()
    return out.detach(), h.grad, w.grad


def _fp64(hidden, weight, labels, upstream, vocab_size=VOCAB):
    """Independent fp64 log_softmax over the real vocabulary only; pad rows get zero gradient."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    logp = torch.log_softmax(h @ w[:vocab_size].t(), dim=-1)
    out = logp.gather(-1, labels[..., None]).squeeze(-1)
    (out * upstream.double()).sum().backward()
    return out.detach(), h.grad, w.grad


def _close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunk_size", [1, 5, 24, 1000])  # 5 does not divide 24; 1000 > s*b
def test_matches_plain_path_and_fp64(chunk_size):
    torch.set_num_threads(1)
    hidden, weight, labels, upstream = _inputs()
    saved_h, saved_w = hidden.clone(), weight.clone()
    out, grad_h, grad_w = _fused(hidden, weight, labels, upstream, chunk_size=chunk_size)
    assert out.dtype == torch.float32 and out.shape == (S, B)
    assert grad_h.shape == hidden.shape and grad_w.shape == weight.shape
    assert torch.equal(hidden, saved_h) and torch.equal(weight, saved_w)

    plain_out, plain_h, plain_w = _plain(hidden, weight, labels, upstream)
    _close(out, plain_out)
    _close(grad_h, plain_h)
    _close(grad_w, plain_w)
    ref_out, ref_h, ref_w = _fp64(hidden, weight, labels, upstream)
    _close(out, ref_out)
    _close(grad_h, ref_h)
    _close(grad_w, ref_w)


def test_padded_vocab_is_excluded():
    hidden, weight, labels, upstream = _inputs(seed=1)
    out, _, grad_w = _fused(hidden, weight, labels, upstream)
    assert torch.all(grad_w[VOCAB:] == 0) and torch.all(grad_w[:VOCAB].abs().sum(-1) > 0)
    # Without the mask the padded ids would take probability mass: the result must differ.
    unmasked = torch.log_softmax(hidden.double() @ weight.double().t(), -1)
    unmasked = unmasked.gather(-1, labels[..., None]).squeeze(-1)
    assert (out.double() - unmasked).abs().min() > 1e-4
    # With no padding at all the full-width softmax is the answer.
    full, _, _ = _fused(hidden, weight, labels, upstream, vocab_size=V_PAD)
    _close(full, unmasked)


def test_bf16_inputs():
    torch.set_num_threads(1)
    hidden, weight, labels, upstream = _inputs(seed=2, dtype=torch.bfloat16)
    out, grad_h, grad_w = _fused(hidden, weight, labels, upstream, chunk_size=5)
    assert out.dtype == torch.float32
    assert grad_h.dtype == grad_w.dtype == torch.bfloat16
    # Reference sees the same bf16 values in fp64; the bf16 matmul costs ~3 significant digits.
    ref_out, ref_h, ref_w = _fp64(hidden, weight, labels, upstream)
    _close(out, ref_out, rtol=2e-2, atol=5e-2)
    _close(grad_h, ref_h, rtol=3e-2, atol=3e-2)
    _close(grad_w, ref_w, rtol=3e-2, atol=3e-2)
    plain_out, _, _ = _plain(hidden, weight, labels, upstream)
    _close(out, plain_out, rtol=1e-2, atol=2e-2)


def test_non_contiguous_retain_graph_and_bad_inputs():
    hidden, weight, labels, upstream = _inputs(seed=3)
    # [b, s, h] storage viewed as [s, b, h], as after a transpose.
    h = hidden.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = fused_vocab_parallel_logprobs(h, w, labels, tp_group=None, vocab_size=VOCAB,
                                        chunk_size=5)
    loss = (out * upstream).sum()
    loss.backward(retain_graph=True)
    first_h, first_w = h.grad.clone(), w.grad.clone()
    loss.backward()  # nothing saved is consumed in place: a second backward doubles the grads
    _close(h.grad, 2 * first_h)
    _close(w.grad, 2 * first_w)
    _, ref_h, ref_w = _fp64(hidden, weight, labels, upstream)
    _close(first_h, ref_h)
    _close(first_w, ref_w)

    def call(**kw):
        args = dict(hidden=hidden, weight=weight, labels=labels, tp_group=None, vocab_size=VOCAB)
        args.update(kw)
        return fused_vocab_parallel_logprobs(**args)

    with pytest.raises(ValueError, match="labels shape"):
        call(labels=labels.t())
    with pytest.raises(ValueError, match="integer"):
        call(labels=labels.float())
    with pytest.raises(ValueError, match="weight must be"):
        call(weight=weight.double())
    with pytest.raises(ValueError, match="vocab_size"):
        call(vocab_size=V_PAD + 1)
    with pytest.raises(ValueError, match="chunk_size"):
        call(chunk_size=0)


def _saved_bytes(fn):
    """(output, bytes autograd saves while fn() runs, bytes of those not aliasing an input)."""
    records = []

    def pack(t):
        records.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    inputs = fn.inputs
    total = sum(t.numel() * t.element_size() for t in records)
    fresh = sum(t.numel() * t.element_size() for t in records
                if not any(t.untyped_storage().data_ptr() == i.untyped_storage().data_ptr()
                           for i in inputs))
    return out, total, fresh


def test_saves_per_token_statistics_not_logits(monkeypatch):
    s, b, h, v = 16, 4, 16, 1024
    n = s * b
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(s, b, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (s, b), generator=g)
    logits_bytes = n * v * 4

    chunk_rows = []
    real_chunk_logits = fused_mod._chunk_logits
    monkeypatch.setattr(fused_mod, "_chunk_logits",
                        lambda x, w: chunk_rows.append(x.size(0)) or real_chunk_logits(x, w))

    def fused():
        return fused_vocab_parallel_logprobs(hidden, weight, labels, tp_group=None,
                                             vocab_size=v, chunk_size=16)

    def plain():
        return vocab_parallel_logprobs(hidden @ weight.t(), labels, None)

    fused.inputs = plain.inputs = (hidden, weight, labels)
    out, total, fresh = _saved_bytes(fused)
    assert fresh <= 4 * n, f"fused path saved {fresh} new bytes for {n} tokens"
    assert total < logits_bytes / 3, (total, logits_bytes)
    out.sum().backward()
    assert chunk_rows and max(chunk_rows) == 16, chunk_rows  # forward and backward, 16 rows each
    assert len(chunk_rows) == 2 * n // 16

    # The same measurement sees the plain path keep [s*b, v] fp32 (its softmax): it can fail.
    _, plain_total, plain_fresh = _saved_bytes(plain)
    assert plain_fresh >= logits_bytes


TP_VOCAB_SIZES = (VOCAB, 60)  # 60: rank 1's whole shard [64, 128) is padding


def _tp_worker(rank, world_size):
    torch.set_num_threads(1)
    shard = V_PAD // world_size
    results = []
    for vocab_size in TP_VOCAB_SIZES:
        hidden, weight, labels, upstream = _inputs(seed=5, vocab_size=vocab_size)
        local_w = weight[rank * shard:(rank + 1) * shard]
        results.append(_fused(hidden, local_w, labels, upstream, group=dist.group.WORLD,
                              vocab_size=vocab_size, chunk_size=5))
    return results


def test_tp2_matches_tp1():
    results = run_ranks(_tp_worker, 2)  # one spawn for both vocab sizes
    for i, vocab_size in enumerate(TP_VOCAB_SIZES):
        hidden, weight, labels, upstream = _inputs(seed=5, vocab_size=vocab_size)
        tp1_out, tp1_h, tp1_w = _fused(hidden, weight, labels, upstream, vocab_size=vocab_size)
        ref_out, _, ref_w = _fp64(hidden, weight, labels, upstream, vocab_size=vocab_size)
        _close(tp1_out, ref_out)
        _close(tp1_w, ref_w)
        for rank_results in results:
            out, grad_h, _ = rank_results[i]
            _close(out, tp1_out)
            _close(grad_h, tp1_h)  # the full hidden gradient on every rank
        _close(torch.cat([r[i][2] for r in results]), tp1_w)


def test_weight_gradient_goes_into_main_grad():
    """With Megatron DDP's fp32 main_grad on the weight, the gradient is ADDED there, not to .grad."""
    torch.set_num_threads(1)
    hidden, weight, labels, upstream = _inputs(seed=3)
    _, ref_h, ref_w = _fused(hidden, weight, labels, upstream)
    for dtype in (torch.float32, torch.bfloat16):
        h = hidden.detach().clone().to(dtype).requires_grad_(True)
        w = weight.detach().clone().to(dtype).requires_grad_(True)
        earlier = torch.randn(w.shape, generator=torch.Generator().manual_seed(9))
        w.main_grad = earlier.clone()  # what other micro-batches already accumulated
        out = fused_vocab_parallel_logprobs(h, w, labels, tp_group=None, vocab_size=VOCAB,
                                            chunk_size=7)
        (out * upstream.to(out.dtype)).sum().backward()
        assert w.grad is None
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
        _close(w.main_grad - earlier, ref_w, **tol)
        _close(h.grad, ref_h, **tol)


def test_ddp_parameter_gets_an_empty_gradient_for_the_readiness_hook():
    """A Megatron DDP parameter (it has ``grad_added_to_main_grad``) gets a .grad after the
    accumulation, as DDP's hook needs under overlap_grad_reduce: all-zero, sparse, so adding it
    to main_grad changes nothing, and summed exactly with another use's dense gradient."""
    torch.set_num_threads(1)
    hidden, weight, labels, upstream = _inputs(seed=4)
    _, _, ref_w = _fused(hidden, weight, labels, upstream)
    for tied in (False, True):
        w = weight.detach().clone().requires_grad_(True)
        w.main_grad, w.grad_added_to_main_grad = torch.zeros(w.shape), False
        out = fused_vocab_parallel_logprobs(hidden, w, labels, tp_group=None, vocab_size=VOCAB,
                                            chunk_size=7)
        loss = (out * upstream).sum() + (w[3].sum() if tied else 0.0)  # tied: an embedding use
        seen = []
        w.register_post_accumulate_grad_hook(lambda p: seen.append(p.main_grad.clone()))
        loss.backward()
        _close(seen[0], ref_w)  # accumulated before the hook ran
        other = torch.zeros(w.shape)
        other[3] = 1.0
        if tied:
            assert w.grad.layout == torch.strided and torch.equal(w.grad, other)
        else:
            assert w.grad.layout == torch.sparse_coo and w.grad._nnz() == 0
        assert not w.grad_added_to_main_grad


def _partial_grad_worker(rank, world_size):
    """TP=2 with reduce_hidden_grad=False: each rank keeps its vocab shard's partial dhidden."""
    torch.set_num_threads(1)
    shard = V_PAD // world_size
    hidden, weight, labels, upstream = _inputs(seed=6)
    h = hidden.clone().requires_grad_(True)
    out = fused_vocab_parallel_logprobs(h, weight[rank * shard:(rank + 1) * shard], labels,
                                        tp_group=dist.group.WORLD, vocab_size=VOCAB,
                                        chunk_size=5, reduce_hidden_grad=False)
    (out * upstream).sum().backward()
    return out.detach(), h.grad


def test_unreduced_hidden_gradient_sums_to_the_full_one():
    hidden, weight, labels, upstream = _inputs(seed=6)
    ref_out, ref_h, _ = _fused(hidden, weight, labels, upstream)
    results = run_ranks(_partial_grad_worker, 2)
    for out, _ in results:
        _close(out, ref_out)
    assert not torch.allclose(results[0][1], ref_h, rtol=1e-3)  # a real partial, not the sum
    _close(results[0][1] + results[1][1], ref_h)
