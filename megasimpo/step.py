"""forward_step and loss_func for Megatron's ``get_forward_backward_func``.

A micro-batch of b pairs is 2b rows (chosen rows, then rejected rows), so a pair's two sequences
always meet in the same loss call. On the last pipeline stage the output layer and vocab-parallel
per-token log-probs run fused in token chunks (default; ``logprob_chunk`` 0 computes full logits
first), then masked per-sequence sums (all-reduced over CP), then the preference loss.
The loss function returns the SUM over pairs and the pair count; Megatron divides the gradients by
the global pair count (``calculate_per_token_loss``), so any DP/PP/micro-batch split averages alike.
"""

from dataclasses import replace
from functools import partial
from typing import Optional

import torch

from megasimpo.config import LossConfig
from megasimpo.data.batches import MicroBatch
from megasimpo.losses import PairLogps, metric_names, preference_loss
from megasimpo.moe_aux import padding_mask
from megasimpo.model import (context_parallel_mask, emit_hidden_states, output_weight,
                             packed_attention, unwrap)
from megasimpo.parallel.fused_logprobs import fused_vocab_parallel_logprobs
from megasimpo.parallel.cp_attention import cp_positions, thd_cp_positions
from megasimpo.parallel.groups import ProcessGroups, all_reduce_host
from megasimpo.parallel.logprobs import (packed_sequence_logps, sequence_logps,
                                         vocab_parallel_logprobs)

# Statistics every reporting rank's loss sends, in this order, after the loss's own metrics.
COUNT_KEYS = ("lengths/chosen", "lengths/rejected", "rank_accuracy", "num_pairs")
# Totals the host knows before the micro-batches run (``host_totals``): reduce_stats adds them,
# they never go through the loss.
HOST_KEYS = ("num_tokens", "forward_flops")
TOTAL_KEYS = ("num_pairs",) + HOST_KEYS  # reported as totals, not per pair


def cp_split(t: torch.Tensor, cp_rank: int, cp_size: int) -> torch.Tensor:
    """This CP rank's share of a [rows, s] tensor: chunks r and 2cp-1-r of 2cp (load balance,
    ``parallel/cp_attention.cp_positions``: the split Megatron's RoPE and our attention expect)."""
    if cp_size == 1:
        return t
    return t[:, cp_positions(t.shape[1], cp_rank, cp_size, t.device)]


def cp_slice(batch: MicroBatch, cp_rank: int, cp_size: int) -> MicroBatch:
    """This CP rank's share of a micro-batch's per-position tensors: each padded row split by
    ``cp_split``; a packed row split segment by segment (``thd_cp_positions``; its segments are
    multiples of 2cp, ``data/packing.py``), its ``segment_ids`` too. The packed layout's
    ``cu_seqlens`` stay those of the whole row: attention and RoPE work in global positions."""
    if cp_size == 1:
        return batch
    if batch.packed is None:
        return replace(batch, **{k: cp_split(getattr(batch, k), cp_rank, cp_size)
                                 for k in MicroBatch.TENSORS})
    idx = thd_cp_positions(batch.packed.segments, cp_rank, cp_size, batch.tokens.device)
    packed = replace(batch.packed, segment_ids=batch.packed.segment_ids[:, idx])
    return replace(batch, packed=packed, **{k: getattr(batch, k)[:, idx]
                                            for k in MicroBatch.TENSORS})


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, tp_rank: int) -> torch.Tensor:
    """Sets logits of the padding rows of the embedding (ids >= vocab_size) to -inf.

    logits [..., v_pad/tp]; the padding exists only so every TP size divides the vocabulary, and it
    must not take probability mass the HF model would not give it.
    """
    shard = logits.shape[-1]
    first_pad = vocab_size - tp_rank * shard
    if first_pad >= shard:
        return logits
    pad = torch.arange(shard, device=logits.device) >= max(first_pad, 0)
    return logits.masked_fill(pad, float("-inf"))


class PairStep:
    """The per-micro-batch computation, bound to a loss and this rank's groups."""

    def __init__(self, loss: LossConfig, groups: ProcessGroups, vocab_size: int, *,
                 logprob_chunk: int = 0):
        """``logprob_chunk`` > 0: the fused path (output layer + log-probs in chunks of that many
        tokens, no full logits; models go through ``prepare_model``); 0: the plain path."""
        self.loss = loss
        self.groups = groups
        self.vocab_size = vocab_size
        self.logprob_chunk = logprob_chunk
        self.metric_keys = metric_names(loss)

    def prepare_model(self, chunks: list) -> list:
        """On the fused path, makes the last-stage chunks emit hidden states; returns ``chunks``."""
        if self.logprob_chunk:
            for chunk in chunks:
                emit_hidden_states(unwrap(chunk))
        return chunks

    @property
    def stat_keys(self) -> tuple:
        """Names of the entries of the statistics vector each micro-batch reports."""
        return ("loss",) + self.metric_keys + COUNT_KEYS

    def _sequence_logps(self, batch: MicroBatch, output: torch.Tensor,
                        output_weight: Optional[torch.Tensor]):
        """Last-stage output -> per-sequence (sums [2b], counts [2b]).

        output: [rows, s, v/tp] logits (plain path, ``output_weight`` None) or [rows, s, h] final
        hidden states (fused path, with the output layer's weight); rows, s = 2b, seq_length
        padded or 1, T packed.
        """
        if output_weight is None:
            logits = mask_padded_vocab(output, self.vocab_size, self.groups.tp_rank)
            token_logps = vocab_parallel_logprobs(logits, batch.labels, self.groups.tp)
        else:
            token_logps = self._fused_logps(batch, output, output_weight)
        if batch.packed is not None:  # one [1, T] row, one segment per sequence
            return packed_sequence_logps(token_logps, batch.loss_mask, batch.packed.segment_ids,
                                         len(batch.lengths), self.groups.cp)
        return sequence_logps(token_logps, batch.loss_mask, self.groups.cp)

    def _fused_logps(self, batch: MicroBatch, hidden: torch.Tensor, weight: torch.Tensor):
        """[rows, s, h] final hidden states -> [rows, s] log p(label), chunked (no full logits)."""
        # Float16Module hands the last stage's output over in fp32; back to the weight's dtype
        # (exact: it was that dtype) so the chunk GEMMs run in BF16.
        return fused_vocab_parallel_logprobs(
            hidden.to(weight.dtype), weight, batch.labels, tp_group=self.groups.tp,
            vocab_size=self.vocab_size, chunk_size=self.logprob_chunk,
            reduce_hidden_grad=not self.groups.layout.sequence_parallel)

    def forward_step(self, data_iterator, model, *, loss_fn=None):
        """Megatron forward_step: runs this stage's chunk on the next ``MicroBatch`` (already on
        the device), returns (output, loss closure); the closure gets the batch and, on the fused
        path, the output layer's weight as arguments."""
        batch = cp_slice(next(data_iterator), self.groups.cp_rank, self.groups.layout.cp)
        gpt = unwrap(model)
        mask, packed = (None, None) if batch.packed is None else \
            packed_attention(batch.packed, gpt.attention_backend)
        if self.groups.layout.cp > 1:
            mask = context_parallel_mask(batch, self.groups.cp_rank, self.groups.layout.cp,
                                         gpt.attention_backend, gpt.config.params_dtype)
        extra = {}
        if gpt.config.num_moe_experts:  # the routers' statistics count real tokens only
            extra["padding_mask"] = padding_mask(batch, self.groups, gpt.pre_process)
        output = model(batch.tokens, batch.position_ids, mask, packed_seq_params=packed, **extra)
        weight = None
        if getattr(gpt, "emits_hidden", False):
            assert self.logprob_chunk > 0, "model emits hidden states but the fused path is off"
            weight = output_weight(gpt)
        return output, partial(loss_fn or self.loss_func, batch, output_weight=weight)

    def loss_func(self, batch: MicroBatch, output: torch.Tensor, *,
                  output_weight: Optional[torch.Tensor] = None):
        """(loss sum x CP size, pair count, {"stats": vector in ``stat_keys`` order})."""
        sums, counts = self._sequence_logps(batch, output, output_weight)
        b = sums.shape[0] // 2
        ref = batch.ref_logps
        x = PairLogps(sums[:b], sums[b:], counts[:b], counts[b:],
                      None if ref is None else ref[:, 0], None if ref is None else ref[:, 1])
        weights = batch.weights
        loss_sum, metrics = preference_loss(self.loss, x, weights)
        w = weights.float()
        avg = sums.detach() / counts
        stats = [loss_sum.detach()] + [metrics[k] for k in self.metric_keys] + [
            (counts[:b] * w).sum(), (counts[b:] * w).sum(),
            ((avg[:b] > avg[b:]).float() * w).sum(), w.sum(),
        ]
        num_pairs = w.sum().to(torch.int)
        # Each CP rank computes the same loss from all-reduced sums but back-propagates only
        # into its own tokens; Megatron sums gradients over DP x CP and divides by the pair
        # count summed over DP x CP, so the CP factor restores the true gradient.
        return loss_sum * self.groups.layout.cp, num_pairs, {
            "stats": torch.stack([s.float().reshape(()) for s in stats])}

    def score_func(self, batch: MicroBatch, output: torch.Tensor, *,
                   output_weight: Optional[torch.Tensor] = None):
        """Forward-only loss closure returning per-pair summed log-probs and token counts."""
        sums, counts = self._sequence_logps(batch, output, output_weight)
        b = sums.shape[0] // 2
        return (sums.sum() * 0.0, torch.tensor(0, dtype=torch.int),
                {"logps": torch.stack([sums[:b], sums[b:]], 1).detach(),
                 "counts": torch.stack([counts[:b], counts[b:]], 1)})


def run_microbatches(model: list, batches: list, step: PairStep, *,
                     forward_only: bool, loss_fn=None) -> list:
    """This rank's micro-batches through Megatron's schedule for the layout (no pipelining,
    1F1B or interleaved); returns the loss closures' outputs on the last stage, [] elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fn = step.forward_step if loss_fn is None else partial(step.forward_step, loss_fn=loss_fn)
    iters = [iter(batches) for _ in model]  # one per model chunk (virtual stage)
    # The pipeline's point-to-point buffers are [seq_length, rows, h]: [s, 2b] padded, [T, 1]
    # packed (every micro-batch of a step has the same shape).
    rows, seq_length = batches[0].tokens.shape
    return get_forward_backward_func()(
        forward_step_func=fn, data_iterator=iters if len(iters) > 1 else iters[0], model=model,
        num_microbatches=len(batches), seq_length=seq_length,
        micro_batch_size=rows, forward_only=forward_only) or []


def host_totals(batches: list, flops) -> dict:
    """This rank's ``HOST_KEYS`` over ``batches`` (``MicroBatch``): real tokens and forward FLOPs
    (``flops(batch)``), from shapes and host lengths only."""
    return {"num_tokens": float(sum(b.num_tokens for b in batches)),
            "forward_flops": float(sum(flops(b) for b in batches))}


def reduce_stats(step: PairStep, outputs: list, groups: ProcessGroups,
                 totals: Optional[dict] = None) -> Optional[dict]:
    """Sums micro-batch statistics and this rank's ``host_totals``, then over the world (one
    reporting rank per DP replica).

    Returns per-pair means (and the totals) on every rank; every rank must call it.
    """
    keys = step.stat_keys + HOST_KEYS
    vec = torch.zeros(len(keys), dtype=torch.float64)
    if groups.reports_metrics:
        n = len(step.stat_keys)
        for out in outputs:
            vec[:n] += out["stats"].double().cpu()
        vec[n:] = torch.tensor([(totals or {}).get(k, 0.0) for k in HOST_KEYS],
                               dtype=torch.float64)
    vec = all_reduce_host(vec)
    total = dict(zip(keys, vec.tolist()))
    n = max(total["num_pairs"], 1.0)
    out = {k: v / n for k, v in total.items() if k not in TOTAL_KEYS}
    out.update({k: total[k] for k in TOTAL_KEYS})
    return out
