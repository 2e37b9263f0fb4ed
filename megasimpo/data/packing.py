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


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def packed_length(batch: MicroBatch, segment_multiple: int = 1) -> int:
    """Positions of ``batch``'s sequences once packed: the sum of its row lengths, each rounded
    up to ``segment_multiple``."""
    return sum(_round_up(n, segment_multiple) for n in batch.lengths)


def pack_batch(batch: MicroBatch, length: int, segment_multiple: int = 1) -> MicroBatch:
    """One padded CPU micro-batch -> one packed row of ``length`` positions.

    batch: tokens/labels/loss_mask/position_ids [2b, s] (``make_batch``); ``length`` >= its
    ``packed_length``. Returns a new MicroBatch: the four tensors as [1, length] (position_ids
    restart at 0 for each sequence) and ``packed``: ``segment_ids`` [1, length] int64 (row i of
    the padded batch is segment i; the padding tail, if any, is segment 2b), ``cu_seqlens`` int32
    [2b + 1] or [2b + 2] (segment boundaries, the tail included, ending at ``length``) and the
    segment lengths as host ints; lengths, weights and ref_logps unchanged. Reads the lengths
    from the host, never from the tensors.

    ``segment_multiple`` (2 x cp under context parallelism, where each segment is split in 2cp
    equal chunks: ``parallel/cp_attention.py``): each sequence's segment is padded to a multiple
    of it (pad tokens after its last token, loss mask 0; causal attention keeps them out of the
    sequence's own tokens), as Transformer Engine's THD context parallelism pads them.
    """
    if batch.packed is not None:
        raise ValueError("micro-batch is already packed")
    lengths = list(batch.lengths)
    padded = [_round_up(n, segment_multiple) for n in lengths]
    used = sum(padded)
    if length < used:
        raise ValueError(f"pack length {length} < the micro-batch's {used} packed positions")
    out = {}
    for key in MicroBatch.TENSORS:
        src = getattr(batch, key)
        like = dict(dtype=src.dtype, device=src.device)
        parts = []
        for i, (n, m) in enumerate(zip(lengths, padded)):
            if key == "position_ids":
                parts.append(torch.arange(m, **like))
                continue
            parts.append(src[i, :n])
            if m > n:
                parts.append(torch.full((m - n,), 0 if key == "loss_mask" else PAD_ID, **like))
        tail = length - used
        if tail:
            fill = torch.arange(tail, **like) if key == "position_ids" else \
                torch.full((tail,), 0 if key == "loss_mask" else PAD_ID, **like)
            parts.append(fill)
        out[key] = torch.cat(parts).unsqueeze(0)
    device = batch.tokens.device
    segments = padded + ([length - used] if length > used else [])
    segment_ids = torch.cat([torch.full((n,), i, dtype=torch.int64, device=device)
                             for i, n in enumerate(segments)]).unsqueeze(0)
    cu_seqlens = torch.tensor([0] + segments, device=device).cumsum(0).to(torch.int32)
    return replace(batch, **out, packed=PackedLayout(segment_ids=segment_ids,
                                                     cu_seqlens=cu_seqlens,
                                                     segments=tuple(segments)))


def pack_step(batches: list, multiple: int, segment_multiple: int = 1) -> list:
    """Packs every micro-batch of a step (or of a full-pass window) to one common length: the
    longest packed micro-batch rounded up to ``multiple`` (TP with sequence parallelism needs T
    divisible by TP; 16 keeps FP8 GEMMs aligned; with CP, a multiple of 2cp so the padding tail
    splits too), each sequence's segment padded to ``segment_multiple`` (``pack_batch``)."""
    longest = max(packed_length(b, segment_multiple) for b in batches)
    length = _round_up(longest, multiple)
    return [pack_batch(b, length, segment_multiple) for b in batches]


def prepare(batches: list, pack_multiple=None, segment_multiple: int = 1) -> list:
    """One schedule call's CPU micro-batches, ready to run: packed to one common length when
    ``pack_multiple`` is set (packing is decided once, by the caller; ``segment_multiple``: see
    ``pack_batch``), then moved to the device once."""
    if pack_multiple:
        batches = pack_step(batches, pack_multiple, segment_multiple)
    return [b.to() for b in batches]
