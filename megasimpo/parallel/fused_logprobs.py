"""Fused output layer + vocab-parallel per-token log-probs, chunked over tokens.

The plain path (``hidden @ W^T`` -> ``mask_padded_vocab`` -> ``vocab_parallel_logprobs``) keeps
``[s, b, v/tp]`` logits plus their fp32 softmax alive until backward: at 4x4096 tokens and a 128k
vocabulary that is ~8 GiB per copy. Here the logits of ``chunk_size`` tokens at a time are computed,
reduced to per-token statistics and dropped; backward recomputes them chunk by chunk. Only ``[s*b]``
fp32 log-sum-exps are saved (plus references to the inputs, which autograd keeps anyway).

Shaped like Megatron's ``tensor_parallel/cross_entropy.py``: helpers, one autograd.Function, one
public function with an explicit tensor-parallel group (nothing here reads ``parallel_state``).
The statistics are all-reduced over tp_group exactly as in ``parallel/logprobs.py`` (MAX of the
per-token max, SUM of the shifted target logit and of the sum-exp). Per-token, so context
parallelism needs nothing: each CP rank passes its local sequence slice.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from megasimpo.parallel.logprobs import _rank_and_size


def _valid_columns(shard: int, vocab_size: int, tp_rank: int) -> int:
    """Number of leading columns of rank ``tp_rank``'s ``[shard]`` vocab slice with id < vocab_size.

    Padding rows only exist at the end of the embedding (Megatron pads to a multiple), so the valid
    ids of a shard are a prefix. Dropping the padded columns from the matmul is exactly
    ``mask_padded_vocab``'s -inf (exp(-inf) = 0, and their gradient is 0), at less cost.
    """
    return min(max(vocab_size - tp_rank * shard, 0), shard)


def _chunk_logits(x: Tensor, weight: Tensor) -> Tensor:
    """x [c, h], weight [nv, h] (same dtype) -> fp32 logits [c, nv] (matmul in the input dtype)."""
    return torch.matmul(x, weight.t()).float()


def _local_max(logits: Tensor) -> Tensor:
    """logits [c, nv] -> [c] fp32 row max; -inf for a shard that holds only padding (nv == 0)."""
    if logits.size(-1) == 0:
        return torch.full(logits.shape[:1], float("-inf"), device=logits.device)
    return logits.amax(dim=-1)


def _target_in_shard(labels: Tensor, vocab_start: int, num_valid: int) -> tuple[Tensor, Tensor]:
    """labels [c] (global ids) -> (in_shard [c] bool, local ids [c] clamped to a safe index)."""
    local = labels - vocab_start
    in_shard = (local >= 0) & (local < num_valid)
    return in_shard, torch.where(in_shard, local, 0)


def _chunk_forward(
    x: Tensor, weight: Tensor, labels: Tensor, vocab_start: int, tp_group, communicate: bool
) -> tuple[Tensor, Tensor]:
    """One chunk: x [c, h], weight [nv, h], labels [c] -> (log p(label) [c], logsumexp [c]), fp32.

    Same arithmetic as Megatron's VocabParallelCrossEntropy: shift by the global max, gather the
    target (0 on the shards that do not own it), sum exp; target and sum-exp share one all-reduce.
    """
    logits = _chunk_logits(x, weight)
    logits_max = _local_max(logits)
    if communicate:
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=tp_group)
    logits.sub_(logits_max.unsqueeze(-1))
    in_shard, local = _target_in_shard(labels, vocab_start, logits.size(-1))
    stats = torch.empty(2, logits.size(0), dtype=torch.float32, device=logits.device)
    if logits.size(-1) == 0:
        stats.zero_()
    else:
        predicted = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1)
        stats[0] = torch.where(in_shard, predicted, 0.0)
        stats[1] = logits.exp_().sum(dim=-1)
    if communicate:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=tp_group)
    log_sum_exp = stats[1].log()
    return stats[0] - log_sum_exp, logits_max + log_sum_exp


def _main_grad(weight: Tensor) -> Optional[Tensor]:
    """The fp32 gradient buffer Megatron DDP attaches to a parameter, if it has one."""
    buf = getattr(weight, "main_grad", None)
    if buf is None or buf.dtype != torch.float32 or buf.shape != weight.shape:
        return None
    return buf


def _ready_marker(weight: Tensor) -> Tensor:
    """[v_pad/tp, h] all-zero sparse gradient for a weight whose gradient is already in main_grad.

    Megatron DDP (which gives its parameters ``grad_added_to_main_grad``) marks a parameter's
    gradient ready for its bucket's reduce-scatter in a hook on the parameter's gradient
    accumulator, and under overlap_grad_reduce asserts that ``.grad`` is set there. Returning
    None would leave it None, so autograd gets this instead, after the accumulation: the hook
    adds it to main_grad (no change), clears ``.grad`` and marks the weight ready. With a tied
    embedding at PP=1 autograd sums it with the embedding's dense gradient (exactly) first, so
    that one still reaches main_grad through the hook. Megatron's own fused wgrad accumulation
    returns a dense dummy for the same reason (and so that the hook runs on the device's backward
    thread); an empty sparse one on the weight's device costs no memory.
    """
    return torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device,
                       layout=torch.sparse_coo)


class _FusedVocabParallelLogprobs(torch.autograd.Function):
    """log p(label) of ``hidden @ W^T`` per token; saves only the [n] logsumexp for backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, tp_group, vocab_size, chunk_size, reduce_hidden_grad):
        rank, world_size = _rank_and_size(tp_group)
        communicate = world_size > 1
        shard = weight.size(0)
        num_valid = _valid_columns(shard, vocab_size, rank)
        vocab_start = rank * shard
        x = hidden.reshape(-1, hidden.size(-1))
        flat_labels = labels.reshape(-1)
        valid_weight = weight[:num_valid]

        num_tokens = x.size(0)
        out = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            out[start:end], lse[start:end] = _chunk_forward(
                x[start:end], valid_weight, flat_labels[start:end], vocab_start, tp_group,
                communicate,
            )

        # hidden/weight/labels are the caller's tensors (autograd holds them anyway); lse is the
        # only new memory kept: 4 bytes per token.
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.tp_group, ctx.communicate = tp_group, communicate
        ctx.reduce_hidden_grad = reduce_hidden_grad
        ctx.num_valid, ctx.vocab_start, ctx.chunk_size = num_valid, vocab_start, chunk_size
        return out.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        h = hidden.size(-1)
        x = hidden.reshape(-1, h)
        flat_labels = labels.reshape(-1)
        grad = grad_output.reshape(-1).float()
        valid_weight = weight[:ctx.num_valid]

        grad_x = torch.zeros(x.shape, dtype=x.dtype, device=x.device) if need_hidden else None
        # fp32 accumulator across chunks; rows of padded ids keep a zero gradient. Under Megatron
        # DDP that is the parameter's own fp32 ``main_grad`` buffer (as Megatron's fused wgrad
        # accumulation does), which saves a [v/tp, h] fp32 tensor (2.1 GB for Llama-3 at TP=1).
        # A low-precision weight also needs one [nv, h] product buffer in its own dtype, reused by
        # every chunk.
        grad_w = partial_w = None
        into_main_grad = need_weight and _main_grad(weight) is not None
        if need_weight:
            grad_w = (_main_grad(weight) if into_main_grad else
                      torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))
            if weight.dtype != torch.float32 and ctx.num_valid > 0:
                partial_w = torch.empty_like(valid_weight)
        if ctx.num_valid > 0 and (need_hidden or need_weight):
            for start in range(0, x.size(0), ctx.chunk_size):
                end = min(start + ctx.chunk_size, x.size(0))
                x_c, g = x[start:end], grad[start:end]
                # d log p(t) / d logits = onehot(t) - softmax, scaled by the output gradient.
                grad_logits = _chunk_logits(x_c, valid_weight)
                grad_logits.sub_(lse[start:end].unsqueeze(-1)).exp_().mul_(-g.unsqueeze(-1))
                in_shard, local = _target_in_shard(
                    flat_labels[start:end], ctx.vocab_start, ctx.num_valid
                )
                rows = torch.arange(end - start, device=x.device)
                grad_logits[rows, local] += torch.where(in_shard, g, 0.0)
                grad_logits = grad_logits.to(x.dtype)
                if need_hidden:
                    grad_x[start:end] = grad_logits @ valid_weight
                if need_weight and partial_w is None:
                    grad_w[:ctx.num_valid].addmm_(grad_logits.t(), x_c)
                elif need_weight:
                    torch.matmul(grad_logits.t(), x_c, out=partial_w)
                    grad_w[:ctx.num_valid] += partial_w

        grad_hidden = None
        if need_hidden:
            # hidden is replicated over TP and each rank saw only its vocab shard: the full
            # gradient is the SUM of the partial ones (what ColumnParallelLinear's backward does).
            if ctx.communicate and ctx.reduce_hidden_grad:
                dist.all_reduce(grad_x, op=dist.ReduceOp.SUM, group=ctx.tp_group)
            grad_hidden = grad_x.view(hidden.shape)
        grad_weight = None
        if need_weight and not into_main_grad:
            grad_weight = grad_w.to(weight.dtype)
        elif into_main_grad and hasattr(weight, "grad_added_to_main_grad"):
            grad_weight = _ready_marker(weight)
        return grad_hidden, grad_weight, None, None, None, None, None


def fused_vocab_parallel_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    tp_group: Optional[ProcessGroup],
    vocab_size: int,
    chunk_size: int = 1024,
    reduce_hidden_grad: bool = True,
) -> Tensor:
    """Per-token log p(label) of the output layer ``hidden @ weight^T``, never materialising logits.

    hidden [s, b, h] (final-norm output, any float dtype; the FULL sequence on every TP rank, i.e.
    after the sequence-parallel gather), weight [v_pad/tp, h] (this rank's output-layer shard, same
    dtype as hidden), labels [s, b] int64 global ids -> [s, b] fp32, differentiable w.r.t. hidden
    and weight.

    The s*b tokens are processed ``chunk_size`` at a time: fp32 logits [chunk, v/tp] (matmul in
    the input dtype, then ``.float()``), ids >= vocab_size excluded (as ``mask_padded_vocab``'s
    -inf), max / target logit / sum-exp all-reduced over tp_group as in
    ``vocab_parallel_logprobs``. Saved for backward: the [s*b] fp32 logsumexp only, besides the
    inputs; backward recomputes each chunk's logits. Gradients: grad_hidden [s, b, h] is the full
    gradient on every rank (partials all-reduced SUM over tp_group; with reduce_hidden_grad=False
    each rank's partial is left as is, for a caller that reduce-scatters it, as the backward of a
    sequence-parallel gather does); grad_weight [v_pad/tp, h] is this rank's shard (no reduction;
    zero rows for padded ids), added straight into ``weight.main_grad`` when Megatron DDP gave the
    weight an fp32 one (then ``weight.grad`` gets nothing from this call, or, for a DDP
    parameter, an all-zero sparse tensor for DDP's backward hook: ``_ready_marker``). Neither
    input is modified; backward may run more than once (retain_graph).

    Every rank of tp_group must pass the same s, b and chunk_size (there are collectives per
    chunk). Rank r of tp_group holds ids [r * v_pad/tp, (r+1) * v_pad/tp) (Megatron's layout).
    Labels must be ids < vocab_size at every position (masked ones included: drop them with the
    loss mask). tp_group None or size 1 -> no communication. Transient memory: one [chunk, v/tp]
    fp32 logits chunk (plus its input-dtype matmul output); in backward also grad_hidden, an fp32
    [v_pad/tp, h] weight-gradient accumulator (none with main_grad) and, for a non-fp32 weight,
    one [v/tp, h] buffer.
    """
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a float [s, b, h] tensor, got {hidden.dtype} "
                         f"{tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.size(1) != hidden.size(2) or weight.dtype != hidden.dtype:
        raise ValueError(f"weight must be [v/tp, {hidden.size(2)}] of dtype {hidden.dtype}, got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be hidden's [s, b] "
                         f"{tuple(hidden.shape[:2])}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer vocab ids, got {labels.dtype}")
    world_size = _rank_and_size(tp_group)[1]
    if not 0 < vocab_size <= weight.size(0) * world_size:
        raise ValueError(f"vocab_size {vocab_size} must be in [1, {weight.size(0) * world_size}] "
                         f"(the padded vocabulary over {world_size} TP ranks)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _FusedVocabParallelLogprobs.apply(
        hidden, weight, labels.long(), tp_group, vocab_size, chunk_size, reduce_hidden_grad
    )
