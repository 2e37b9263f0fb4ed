"""Packing a micro-batch's 2b padded rows into one row of real tokens (THD layout).

A padded micro-batch runs 2b x seq_length positions, most of them padding when sequences are short
next to the longest one. Packed, the chosen and rejected sequences of its pairs sit back to back
in ONE row ([1, T], T = the sum of their lengths rounded up), and attention is kept inside each
sequence by ``cu_seqlens`` (Transformer Engine's THD attention) or, on Megatron's local layer
spec, by a block-diagonal causal mask built from ``segment_ids``. Each sequence keeps its own
positions (0..n-1). Chosen and rejected of a pair stay in the same micro-batch, so the loss still
sees whole pairs; per-sequence sums come from ``segment_ids`` (``logprobs.packed_sequence_logps``).

All micro-batches of one step are padded to the same T (the pipeline's point-to-point buffers
have one shape per step); the padding is one extra segment at the end with a zero loss mask.
Packing runs on the CPU, before the micro-batches are moved to the device, from the host-known
lengths (no device read-back).
"""

from dataclasses import replace

import torch

from megasimpo.data.batches import PAD_ID, MicroBatch, PackedLayout


def packed_length(batch: MicroBatch) -> int:
    """Positions of ``batch``'s real tokens once packed (the sum of its row lengths)."""
    return batch.num_tokens


def pack_batch(batch: MicroBatch, length: int) -> MicroBatch:
    """One padded CPU micro-batch -> one packed row of ``length`` positions.

    batch: tokens/labels/loss_mask/position_ids [2b, s] (``make_batch``); ``length`` >= the sum of
    its lengths. Returns a new MicroBatch: the four tensors as [1, length] (position_ids restart
    at 0 for each sequence) and ``packed``: ``segment_ids`` [1, length] int64 (row i of the padded
    batch is segment i; the padding tail, if any, is segment 2b), ``cu_seqlens`` int32 [2b + 1]
    or [2b + 2] (segment boundaries, the tail included, ending at ``length``) and the segment
    lengths as host ints; lengths, weights and ref_logps unchanged. Reads the lengths from the
    host, never from the tensors.
    """
    if batch.packed is not None:
        raise ValueError("micro-batch is already packed")
    lengths = list(batch.lengths)
    used = sum(lengths)
    if length < used:
        raise ValueError(f"pack length {length} < the micro-batch's {used} real positions")
    out = {}
    for key in MicroBatch.TENSORS:
        src = getattr(batch, key)
        like = dict(dtype=src.dtype, device=src.device)
        parts = [src[i, :n] for i, n in enumerate(lengths)]
        if key == "position_ids":
            parts = [torch.arange(n, **like) for n in lengths]
        tail = length - used
        if tail:
            fill = torch.arange(tail, **like) if key == "position_ids" else \
                torch.full((tail,), 0 if key == "loss_mask" else PAD_ID, **like)
            parts.append(fill)
        out[key] = torch.cat(parts).unsqueeze(0)
    device = batch.tokens.device
    segments = lengths + ([length - used] if length > used else [])
    segment_ids = torch.cat([torch.full((n,), i, dtype=torch.int64, device=device)
                             for i, n in enumerate(segments)]).unsqueeze(0)
    cu_seqlens = torch.tensor([0] + segments, device=device).cumsum(0).to(torch.int32)
    return replace(batch, **out, packed=PackedLayout(segment_ids=segment_ids,
                                                     cu_seqlens=cu_seqlens,
                                                     segments=tuple(segments)))


def pack_step(batches: list, multiple: int) -> list:
    """Packs every micro-batch of a step (or of a full-pass window) to one common length: the
    longest packed micro-batch rounded up to ``multiple`` (TP with sequence parallelism needs T
    divisible by TP; 16 keeps FP8 GEMMs aligned)."""
    longest = max(packed_length(b) for b in batches)
    length = -(-longest // multiple) * multiple
    return [pack_batch(b, length) for b in batches]


def prepare(batches: list, pack_multiple=None) -> list:
    """One schedule call's CPU micro-batches, ready to run: packed to one common length when
    ``pack_multiple`` is set (packing is decided once, by the caller), then moved to the device
    once."""
    if pack_multiple:
        batches = pack_step(batches, pack_multiple)
    return [b.to() for b in batches]
