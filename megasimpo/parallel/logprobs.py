"""Vocab-parallel per-token log-probs and per-sequence sums over tensor/context parallel groups.

Shaped like Megatron's ``tensor_parallel/cross_entropy.py`` and built from its
``VocabParallelCrossEntropy`` helpers, with three differences: the tensor-parallel group is an
argument (nothing here reads ``parallel_state``), the result is the log-prob of the label
(``-cross_entropy``) with no label smoothing, and the caller's logits are never modified.
"""

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.utils import VocabUtility
from torch import Tensor
from torch.distributed import ProcessGroup


def _rank_and_size(group: Optional[ProcessGroup]) -> tuple[int, int]:
    """(rank, size) in ``group``; a missing group is a single rank."""
    if group is None:
        return 0, 1
    return dist.get_rank(group=group), dist.get_world_size(group=group)


class _VocabParallelLogprobs(torch.autograd.Function):
    """log p(label) from vocab-sharded logits; backward is ``g * (onehot - softmax)``."""

    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, tp_group):
        rank, world_size = _rank_and_size(tp_group)
        communicate = world_size > 1
        ctx.logits_dtype = vocab_parallel_logits.dtype

        # Megatron's helpers work in place on the fp32 logits. `.float()` aliases an fp32 input, so
        # take one contiguous fp32 copy ourselves: the caller's tensor stays intact whatever its
        # dtype, and for bf16/fp16 this is the same single copy Megatron would have made anyway.
        logits = vocab_parallel_logits.to(
            dtype=torch.float32, memory_format=torch.contiguous_format, copy=True
        )
        logits, logits_max = VocabParallelCrossEntropy.calculate_logits_max(logits)
        if communicate:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=tp_group)

        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            logits.size(-1), rank, world_size
        )
        (target_mask, masked_target_1d, predicted_logits, sum_exp_logits, exp_logits) = (
            VocabParallelCrossEntropy.calculate_predicted_logits(
                logits, target, logits_max, vocab_start, vocab_end
            )
        )
        if communicate:
            # Each label lives on exactly one shard (others contribute 0): SUM gathers it.
            dist.all_reduce(predicted_logits, op=dist.ReduceOp.SUM, group=tp_group)
            dist.all_reduce(sum_exp_logits, op=dist.ReduceOp.SUM, group=tp_group)

        softmax, loss = VocabParallelCrossEntropy.calculate_cross_entropy_loss(
            exp_logits, predicted_logits, sum_exp_logits
        )
        ctx.save_for_backward(softmax, target_mask, masked_target_1d)
        ctx.backward_done = False
        return -loss

    @staticmethod
    def backward(ctx, grad_output):
        # Megatron's gradient helpers overwrite the saved softmax; a second backward through the
        # same graph (retain_graph=True) would silently be wrong, so refuse it instead.
        if ctx.backward_done:
            raise RuntimeError(
                "vocab_parallel_logprobs supports one backward pass per forward (its saved "
                "softmax is consumed in place); recompute the forward instead of retain_graph=True"
            )
        ctx.backward_done = True
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        grad_2d, arange_1d, softmax_update, grad_input = (
            VocabParallelCrossEntropy.prepare_gradient_calculation_operands(softmax, target_mask)
        )
        # d(-CE)/dlogits = -(softmax - onehot): Megatron's CE gradient with the output grad negated.
        grad_input = VocabParallelCrossEntropy.calculate_gradients(
            grad_2d, arange_1d, masked_target_1d, softmax_update, grad_input,
            -grad_output.float().contiguous(),
        )
        return grad_input.to(ctx.logits_dtype), None, None


def vocab_parallel_logprobs(
    logits: Tensor, labels: Tensor, tp_group: Optional[ProcessGroup]
) -> Tensor:
    """Per-token log p(label) from vocab-sharded logits without gathering the vocabulary.

    logits [..., v/tp] (any float dtype; computed in fp32), labels [...] int64 (global vocab ids),
    returns [...] fp32. tp_group None or size 1 -> no communication. max, sum-exp and the target
    logit are all-reduced over tp_group; correct backward (gradient w.r.t. logits, same dtype as
    logits).

    Rank r of tp_group must hold vocab ids [r * v/tp, (r+1) * v/tp) (Megatron's layout). Labels
    must be valid ids in [0, v) at every position, masked ones included (use e.g. 0 there and drop
    them with the loss mask): an out-of-range id is not an error here, it yields ``-logsumexp``.
    The input logits are not modified (an fp32 working copy is made); one backward per forward.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits shape without the vocab "
            f"dimension {tuple(logits.shape[:-1])}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer vocab ids, got {labels.dtype}")
    return _VocabParallelLogprobs.apply(logits, labels.long().contiguous(), tp_group)


class _AllReduceSumIdentityBackward(torch.autograd.Function):
    """SUM all-reduce whose backward passes the gradient through unchanged (no communication)."""

    @staticmethod
    def forward(ctx, tensor, group):
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


def sequence_logps(
    token_logps: Tensor, loss_mask: Tensor, cp_group: Optional[ProcessGroup]
) -> tuple[Tensor, Tensor]:
    """Masked per-sequence sums. token_logps [b, s] fp32, loss_mask [b, s] (0/1, any dtype) ->
    (sums [b] fp32 with autograd, counts [b] fp32, no grad).

    With context parallelism each CP rank holds a slice of the sequence: sums and counts are
    all-reduced (SUM) over cp_group; the all-reduce of `sums` is differentiable with an IDENTITY
    backward (each rank's gradient flows to its own tokens only: the loss computed from the full
    sums is identical on every CP rank, and Megatron sums gradients across CP ranks).
    cp_group None or size 1 -> no communication.

    Masked positions (mask 0) contribute nothing and get a zero gradient, even where their
    token log-prob is -inf or nan (selected out, not multiplied by 0).
    """
    if token_logps.dim() != 2 or loss_mask.shape != token_logps.shape:
        raise ValueError(
            f"token_logps [b, s] and loss_mask [b, s] must have the same 2-D shape, got "
            f"{tuple(token_logps.shape)} and {tuple(loss_mask.shape)}"
        )
    keep = loss_mask != 0
    sums = torch.where(keep, token_logps.float(), 0.0).sum(dim=-1)
    counts = keep.sum(dim=-1, dtype=torch.float32)
    if _rank_and_size(cp_group)[1] > 1:
        sums = _AllReduceSumIdentityBackward.apply(sums, cp_group)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=cp_group)
    return sums, counts


def packed_sequence_logps(token_logps: Tensor, loss_mask: Tensor, segment_ids: Tensor,
                          num_sequences: int,
                          cp_group: Optional[ProcessGroup] = None) -> tuple[Tensor, Tensor]:
    """Masked per-sequence sums of a packed row (``data/packing.py``). token_logps [1, T] fp32,
    loss_mask [1, T], segment_ids [1, T] int64 (sequence i's positions hold i; a padding tail
    holds ``num_sequences``) -> (sums [num_sequences] fp32 with autograd, counts, no grad).

    Same masking rule as ``sequence_logps`` (masked positions get a zero gradient even where the
    log-prob is not finite). With context parallelism the row is this rank's share of every
    segment (``step.cp_slice``): sums and counts are all-reduced over ``cp_group`` as in
    ``sequence_logps`` (identity backward).
    """
    if not token_logps.shape == loss_mask.shape == segment_ids.shape:
        raise ValueError(f"token_logps, loss_mask and segment_ids must have one shape, got "
                         f"{tuple(token_logps.shape)}, {tuple(loss_mask.shape)}, "
                         f"{tuple(segment_ids.shape)}")
    keep = (loss_mask != 0).reshape(-1)
    seg = segment_ids.reshape(-1)
    values = torch.where(keep, token_logps.float().reshape(-1), 0.0)
    size = num_sequences + 1  # the padding tail's segment, dropped below
    sums = values.new_zeros(size).index_add(0, seg, values)[:num_sequences]
    counts = values.new_zeros(size).index_add(0, seg, keep.float())[:num_sequences]
    if _rank_and_size(cp_group)[1] > 1:
        sums = _AllReduceSumIdentityBackward.apply(sums, cp_group)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=cp_group)
    return sums, counts
