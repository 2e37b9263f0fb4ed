"""vocab_parallel_logprobs and sequence_logps: against fp64 references, then TP=2 / CP=2 on gloo."""

import pytest
import torch
import torch.distributed as dist

from megasimpo.parallel.logprobs import sequence_logps, vocab_parallel_logprobs
from multirank import run_ranks

pytestmark = pytest.mark.fast  # in `make test-fast`

VOCAB = 64
SHAPE = (8, 4)  # [s, b], Megatron's layout for the output layer


def _inputs(seed=0, dtype=torch.float32):
    """Deterministic logits [s, b, v], labels [s, b] hitting both vocab halves, output weights."""
    g = torch.Generator().manual_seed(seed)
    logits = (3.0 * torch.randn(*SHAPE, VOCAB, generator=g)).to(dtype)
    labels = torch.randint(0, VOCAB, SHAPE, generator=g)
    labels[0, 0], labels[0, 1] = 0, VOCAB - 1  # edges of both TP shards
    labels[1, 0], labels[1, 1] = VOCAB // 2 - 1, VOCAB // 2
    weights = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return logits, labels, weights


def _reference(logits, labels, weights):
    """Independent fp64 log_softmax + gather: (values, d(sum(w * values))/dlogits)."""
    x = logits.detach().double().requires_grad_(True)
    values = torch.log_softmax(x, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    (values * weights).sum().backward()
    return values.detach(), x.grad


def _run(logits, labels, weights, group):
    x = logits.detach().clone().requires_grad_(True)
    out = vocab_parallel_logprobs(x, labels, group)
    (out * weights.to(out.dtype)).sum().backward()
    return out.detach(), x.grad


def test_matches_fp64_reference_single_rank():
    torch.set_num_threads(1)
    logits, labels, weights = _inputs()
    saved = logits.clone()
    x = logits.requires_grad_(True)
    out = vocab_parallel_logprobs(x, labels, None)
    assert out.dtype == torch.float32 and out.shape == SHAPE
    assert torch.equal(logits.detach(), saved), "fp32 caller logits were modified"
    (out * weights.float()).sum().backward()
    assert torch.equal(logits.detach(), saved), "fp32 caller logits were modified by backward"

    ref_values, ref_grad = _reference(saved, labels, weights)
    torch.testing.assert_close(out.double(), ref_values, rtol=1e-6, atol=1e-7)
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_bf16_input_returns_fp32_and_bf16_grad():
    torch.set_num_threads(1)
    logits, labels, weights = _inputs(seed=1, dtype=torch.bfloat16)
    saved = logits.clone()
    x = logits.requires_grad_(True)
    out = vocab_parallel_logprobs(x, labels, None)
    (out * weights.float()).sum().backward()
    assert out.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert torch.equal(logits.detach(), saved)
    # The reference sees exactly the bf16 values, so the fp32 result must match it tightly.
    ref_values, ref_grad = _reference(saved, labels, weights)
    torch.testing.assert_close(out.double(), ref_values, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-2, atol=1e-2)


def test_non_contiguous_logits_and_bad_shapes():
    torch.set_num_threads(1)
    logits, labels, weights = _inputs(seed=2)
    # [b, s, v] view of [s, b, v] logits, as a caller might hand in.
    out, grad = _run(logits.transpose(0, 1), labels.t(), weights.t(), None)
    ref_values, ref_grad = _reference(logits.transpose(0, 1), labels.t(), weights.t())
    torch.testing.assert_close(out.double(), ref_values, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="labels shape"):
        vocab_parallel_logprobs(logits, labels.t(), None)
    with pytest.raises(ValueError, match="integer"):
        vocab_parallel_logprobs(logits, labels.float(), None)


def test_second_backward_is_refused():
    logits, labels, _ = _inputs(seed=3)
    x = logits.requires_grad_(True)
    out = vocab_parallel_logprobs(x, labels, None).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        out.backward()


def _tp_worker(rank, world_size):
    logits, labels, weights = _inputs(seed=4)
    shard = VOCAB // world_size
    local = logits[..., rank * shard:(rank + 1) * shard]
    saved = local.clone()
    out, grad = _run(local, labels, weights, dist.group.WORLD)
    assert torch.equal(local, saved)
    # A size-1 group must take the no-communication path and give the full-vocab answer.
    singles = [dist.new_group([r]) for r in range(world_size)]
    single_out, single_grad = _run(logits, labels, weights, singles[rank])
    return out, grad, single_out, single_grad


def test_tp2_matches_tp1_and_reference():
    logits, labels, weights = _inputs(seed=4)
    tp1_values, tp1_grad = _run(logits, labels, weights, None)
    ref_values, ref_grad = _reference(logits, labels, weights)
    torch.testing.assert_close(tp1_values.double(), ref_values, rtol=1e-6, atol=1e-7)

    results = run_ranks(_tp_worker, 2)
    for out, _, single_out, single_grad in results:
        torch.testing.assert_close(out, tp1_values, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(single_out, tp1_values, rtol=0, atol=0)
        torch.testing.assert_close(single_grad, tp1_grad, rtol=0, atol=0)
    grad = torch.cat([r[1] for r in results], dim=-1)
    torch.testing.assert_close(grad, tp1_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


# --- sequence_logps ---------------------------------------------------------------------------

B, S = 4, 12


def _seq_inputs():
    """token_logps [b, s] (-inf at some masked spots, as garbage labels could give), mask [b, s]."""
    g = torch.Generator().manual_seed(5)
    token_logps = -torch.rand(B, S, generator=g) * 5
    mask = torch.ones(B, S, dtype=torch.int64)
    mask[:, :3] = 0  # prompt
    mask[1, 9:] = 0  # padding
    mask[2, 5] = 0
    token_logps[1, 10] = float("-inf")
    return token_logps, mask


def _pair_loss(sums, counts):
    """SimPO-shaped nonlinear loss over pairs (0, 1) and (2, 3) of length-normalised sums."""
    avg = sums / counts
    return -torch.nn.functional.logsigmoid(2.0 * (avg[0::2] - avg[1::2]) - 1.0).sum()


def _reference_sums(token_logps, mask):
    """Plain Python loop in fp64: sums, counts and d(_pair_loss)/d(token_logps)."""
    x = token_logps.double().detach().requires_grad_(True)
    sums, counts = [], []
    for b in range(B):
        terms = [x[b, t] for t in range(S) if mask[b, t] == 1]
        sums.append(torch.stack(terms).sum())
        counts.append(float(len(terms)))
    sums, counts = torch.stack(sums), torch.tensor(counts, dtype=torch.float64)
    _pair_loss(sums, counts).backward()
    return sums.detach(), counts, x.grad


def test_sequence_logps_mask_single_rank():
    token_logps, mask = _seq_inputs()
    x = token_logps.clone().requires_grad_(True)
    sums, counts = sequence_logps(x, mask, None)
    assert sums.dtype == counts.dtype == torch.float32 and not counts.requires_grad
    ref_sums, ref_counts, ref_grad = _reference_sums(token_logps, mask)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-6, atol=1e-6)
    assert counts.tolist() == ref_counts.tolist() == [9.0, 6.0, 8.0, 9.0]
    _pair_loss(sums, counts).backward()
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
    assert torch.all(x.grad[mask == 0] == 0) and torch.all(x.grad[mask == 1] != 0)
    # A bool or float mask means the same thing.
    sums_b, counts_b = sequence_logps(token_logps, mask.bool(), None)
    sums_f, counts_f = sequence_logps(token_logps, mask.float(), None)
    assert torch.equal(sums_b, sums.detach()) and torch.equal(sums_f, sums.detach())
    assert torch.equal(counts_b, counts) and torch.equal(counts_f, counts)


# Megatron-style load-balanced CP=2 split into 4 chunks: rank 0 {0, 3}, rank 1 {1, 2}.
_CP_CHUNKS = {0: (0, 3), 1: (1, 2)}


def _cp_index(rank):
    chunk = S // 4
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in _CP_CHUNKS[rank]])


def _cp_worker(rank, world_size):
    token_logps, mask = _seq_inputs()
    idx = _cp_index(rank)
    x = token_logps[:, idx].clone().requires_grad_(True)
    sums, counts = sequence_logps(x, mask[:, idx], dist.group.WORLD)
    _pair_loss(sums, counts).backward()
    return sums.detach(), counts, x.grad


def test_cp2_matches_single_rank():
    token_logps, mask = _seq_inputs()
    x = token_logps.clone().requires_grad_(True)
    sums, counts = sequence_logps(x, mask, None)
    _pair_loss(sums, counts).backward()
    _, _, ref_grad = _reference_sums(token_logps, mask)

    results = run_ranks(_cp_worker, 2)
    for rank, (cp_sums, cp_counts, cp_grad) in enumerate(results):
        torch.testing.assert_close(cp_sums, sums.detach(), rtol=1e-6, atol=1e-6)
        assert torch.equal(cp_counts, counts)
        idx = _cp_index(rank)
        torch.testing.assert_close(cp_grad, x.grad[:, idx], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(cp_grad.double(), ref_grad[:, idx], rtol=1e-5, atol=1e-7)
    # Together the ranks cover every position exactly once.
    assert sorted(torch.cat([_cp_index(r) for r in range(2)]).tolist()) == list(range(S))
