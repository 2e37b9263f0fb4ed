"""The fused output layer in the step, against Megatron's own output layer (gloo, 2 ranks).

``model.emit_hidden_states`` makes the output layer hand its input over (all-gathered under
sequence parallelism) and the step runs ``fused_vocab_parallel_logprobs`` on it. Here that pair is
compared with Megatron's ColumnParallelLinear followed by the plain log-probs, with and without
sequence parallelism (which the local layer spec cannot run end to end on CPU: its norms refuse
it), and the per-token fused path under a context-parallel split with ``step.cp_split``.
"""

import types

import torch
import torch.distributed as dist
import pytest

from multirank import run_ranks

pytestmark = pytest.mark.fast  # in `make test-fast`

S, B, H, V_PAD, VOCAB = 8, 2, 16, 128, 100


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, B, H, generator=g)
    labels = torch.randint(0, VOCAB, (S, B), generator=g)
    upstream = torch.randn(S, B, generator=g)
    return x, labels, upstream


def _output_layer(sequence_parallel: bool):
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear

    torch.manual_seed(0)  # CPU initialisation splits one full master weight: same on any TP
    config = ModelParallelConfig(tensor_model_parallel_size=2, sequence_parallel=sequence_parallel,
                                 use_cpu_initialization=True, perform_initialization=True)
    return ColumnParallelLinear(H, V_PAD, config=config, init_method=torch.nn.init.normal_,
                                bias=False, gather_output=False)


def _megatron_vs_fused(rank, sequence_parallel):
    """(plain, fused) results of sum(upstream * log p) through one output layer at TP=2."""
    from megasimpo.model import emit_hidden_states, output_weight
    from megasimpo.parallel.fused_logprobs import fused_vocab_parallel_logprobs
    from megasimpo.parallel.logprobs import vocab_parallel_logprobs
    from megasimpo.step import mask_padded_vocab

    x, labels, upstream = _inputs(1)
    if sequence_parallel:  # the layer's input is this rank's slice of the sequence
        x = x[rank * S // 2:(rank + 1) * S // 2]
    results = []
    for fused in (False, True):
        layer = _output_layer(sequence_parallel)
        inp = x.clone().requires_grad_(True)
        if fused:
            gpt = types.SimpleNamespace(post_process=True, output_layer=layer,
                                        share_embeddings_and_output_weights=False)
            emit_hidden_states(gpt)
            hidden, _ = layer(inp)
            assert gpt.emits_hidden and hidden.shape == (S, B, H)
            out = fused_vocab_parallel_logprobs(
                hidden, output_weight(gpt), labels, tp_group=dist.group.WORLD, vocab_size=VOCAB,
                chunk_size=5, reduce_hidden_grad=not sequence_parallel)
        else:
            logits, _ = layer(inp)
            assert logits.shape == (S, B, V_PAD // 2)
            out = vocab_parallel_logprobs(mask_padded_vocab(logits, VOCAB, rank), labels,
                                          dist.group.WORLD)
        (out * upstream).sum().backward()
        results.append((out.detach(), inp.grad, layer.weight.grad))
    return results


def _cp_fused(rank, world_size):
    """Per-sequence sums and gradients of the fused path under a CP=2 split of the sequence."""
    from megasimpo.parallel.fused_logprobs import fused_vocab_parallel_logprobs
    from megasimpo.parallel.logprobs import sequence_logps
    from megasimpo.step import cp_split

    g = torch.Generator().manual_seed(2)
    rows = 2 * B
    hidden = torch.randn(rows, S, H, generator=g)
    weight = torch.randn(V_PAD, H, generator=g) * 0.5
    labels = torch.randint(0, VOCAB, (rows, S), generator=g)
    mask = (torch.rand(rows, S, generator=g) > 0.3).long()
    coeffs = torch.randn(rows, generator=g)

    def run(h, w, lab, m, group):
        token_logps = fused_vocab_parallel_logprobs(h, w, lab, tp_group=None, vocab_size=VOCAB,
                                                    chunk_size=3)
        sums, counts = sequence_logps(token_logps, m, group)
        (coeffs * sums / counts).sum().backward()
        return sums.detach()

    full_h, full_w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    full_sums = run(full_h, full_w, labels, mask, None)
    position = torch.arange(S).expand(rows, S)
    idx = cp_split(position, rank, world_size)[0]
    cp_h = hidden[:, idx].clone().requires_grad_(True)
    cp_w = weight.clone().requires_grad_(True)
    cp_sums = run(cp_h, cp_w, cp_split(labels, rank, world_size),
                  cp_split(mask, rank, world_size), dist.group.WORLD)
    return idx, full_sums, full_h.grad, full_w.grad, cp_sums, cp_h.grad, cp_w.grad


def _worker(rank, world_size):
    from megasimpo.config import Layout
    from megasimpo.parallel import groups

    torch.set_num_threads(1)
    groups.initialize(Layout(tp=2, sequence_parallel=True), 0)  # the SP gather's buffers
    return ([_megatron_vs_fused(rank, sp) for sp in (False, True)], _cp_fused(rank, world_size))


def _close(a, b):
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)


def test_fused_output_matches_megatron_output_layer_and_cp_split():
    results = run_ranks(_worker, 2)
    for rank, (layers, _) in enumerate(results):
        for sequence_parallel, ((out, d_in, d_w), (f_out, f_in, f_w)) in zip((False, True), layers):
            _close(f_out, out)
            _close(f_in, d_in)  # SP: this rank's slice of the input gradient
            _close(f_w, d_w)
            assert d_in.abs().sum() > 0 and d_w.abs().sum() > 0
    # The two ranks' weight shards differ (each holds its half of the vocabulary).
    plain_dw = [layers[0][0][2] for layers, _ in results]  # no SP, Megatron's layer
    assert not torch.allclose(plain_dw[0], plain_dw[1])

    covered = []
    for _, (idx, full_sums, full_h_grad, full_w_grad, cp_sums, cp_h_grad, _) in results:
        _close(cp_sums, full_sums)  # all-reduced over CP: the whole sequence's sums
        _close(cp_h_grad, full_h_grad[:, idx])
        covered += idx.tolist()
    assert sorted(covered) == list(range(S))
    # Each CP rank's weight gradient covers its own tokens; DP x CP reduction sums them.
    _close(results[0][1][6] + results[1][1][6], results[0][1][3])
