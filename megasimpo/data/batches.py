"""Micro-batches as the step function consumes them, from one or more pair datasets.

Training batches come from the sampler; a full pass (evaluation, scoring) covers every pair of a
dataset once, DP-sharded, with zero-weight filler pairs completing the last micro-batch so every
rank runs the same number of micro-batches and no pair is dropped, a window of micro-batches at a
time. A ``MicroBatch`` is built (and packed) on the CPU and moved to the device once.
"""

import math
from dataclasses import dataclass, replace
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from megasimpo.data.indexed import PairDataset
from megasimpo.data.loader import collate_pairs

PAD_ID = 0  # right padding under a causal mask is never attended to nor scored
WINDOW = 64  # micro-batches per schedule call of a full pass: bounds host and device memory


class ConcatPairs:
    """Several pair datasets read as one (``--data A B``), in the order given."""

    def __init__(self, prefixes):
        self.prefixes = list(prefixes)
        self.parts = [PairDataset(p) for p in self.prefixes]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    @property
    def max_token_id(self) -> int:
        """Largest token id over every part (-1 for none); see ``indexed.check_token_range``."""
        return max((p.max_token_id for p in self.parts), default=-1)

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.parts[k][int(i - self.offsets[k])]

    def lengths(self):
        """int64 [n, 3]: prompt, chosen, rejected lengths."""
        return np.concatenate([p.lengths() for p in self.parts])


@dataclass(frozen=True)
class PackedLayout:
    """Where the sequences of a packed row sit (``data/packing.py``): built on the CPU with its
    lengths known there, so nothing reads them back from the device."""

    segment_ids: torch.Tensor  # [1, T] int64: sequence i's positions hold i, a padding tail 2b
    cu_seqlens: torch.Tensor  # [segments + 1] int32 boundaries, ending at T
    segments: Tuple[int, ...]  # the segment lengths (the padding tail, if any, last)

    @property
    def max_seqlen(self) -> int:
        """The longest segment."""
        return max(self.segments)

    def to(self, device) -> "PackedLayout":
        return replace(self, segment_ids=self.segment_ids.to(device, non_blocking=True),
                       cu_seqlens=self.cu_seqlens.to(device, non_blocking=True))


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of b pairs as the step function consumes it.

    Padded: tokens/labels/loss_mask/position_ids [2b, s] (chosen rows, then rejected rows).
    Packed (``packed`` set; ``data/packing.py``): the same four as one row [1, T]. Built (and
    packed) on the CPU, then moved to the device once (``to``); ``lengths`` and ``num_tokens`` are
    host numbers (so are the FLOPs, ``metrics.batch_forward_flops``) and never need the device.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    lengths: Tuple[int, ...]  # [2b] used positions of each sequence (row of the padded batch)
    weights: torch.Tensor  # [b] float32: pair weights (0 for a full pass's filler pairs)
    ref_logps: Optional[torch.Tensor] = None  # [b, 2] reference log-probs (chosen, rejected)
    packed: Optional[PackedLayout] = None

    TENSORS = ("tokens", "labels", "loss_mask", "position_ids")  # [rows, s] per position

    @property
    def num_pairs(self) -> int:
        return len(self.lengths) // 2

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) positions."""
        return sum(self.lengths)

    def to(self, device=None) -> "MicroBatch":
        """This micro-batch on ``device`` (None: the current CUDA device if there is one, else
        unchanged); the one host-to-device copy of its tensors."""
        if device is None:
            if not torch.cuda.is_available():
                return self
            device = torch.device("cuda", torch.cuda.current_device())
        moved = {k: getattr(self, k).to(device, non_blocking=True)
                 for k in self.TENSORS + ("weights",)}
        if self.ref_logps is not None:
            moved["ref_logps"] = self.ref_logps.to(device, non_blocking=True)
        if self.packed is not None:
            moved["packed"] = self.packed.to(device)
        return replace(self, **moved)


def make_batch(dataset, indices, seq_length: int, weights=None,
               ref_logps: Optional[np.ndarray] = None) -> MicroBatch:
    """Collated CPU micro-batch for pair ``indices`` of ``dataset`` (anything indexable by int
    that returns a ``Pair``): padded [2b, s] rows, ``weights`` [b] (default 1) and, when given,
    the pairs' rows of ``ref_logps`` [n, 2]."""
    pairs = [dataset[int(i)] for i in indices]
    c = collate_pairs(pairs, seq_length, PAD_ID)
    ref = None
    if ref_logps is not None:
        ref = torch.as_tensor(ref_logps[np.asarray(indices, dtype=np.int64)], dtype=torch.float32)
    return MicroBatch(tokens=c["tokens"], labels=c["labels"], loss_mask=c["loss_mask"],
                      position_ids=c["position_ids"], lengths=tuple(c["lengths"].tolist()),
                      weights=torch.ones(len(pairs)) if weights is None else torch.as_tensor(weights),
                      ref_logps=ref)


def full_pass(num_pairs: int, dp_rank: int, dp_size: int, micro_batch_size: int):
    """(indices, weights) lists for every pair once: rank d takes pairs d, d+dp, ...; the
    last micro-batch is completed with zero-weight copies of pair 0."""
    per_rank = math.ceil(num_pairs / dp_size)
    total = math.ceil(per_rank / micro_batch_size) * micro_batch_size
    idx = list(range(dp_rank, num_pairs, dp_size))
    weights = [1.0] * len(idx) + [0.0] * (total - len(idx))
    idx += [0] * (total - len(idx))
    return idx, weights


class full_pass_windows:  # noqa: N801 (used like a generator function, with a len)
    """Every pair of ``dataset`` once (``full_pass``), ``window`` micro-batches at a time: yields
    (CPU micro-batches, their (pair indices, weights)). Every rank yields the same number of
    windows of the same sizes, so each window can be one schedule call; only one window is
    collated at a time (and, by the caller, packed and moved to the device)."""

    def __init__(self, dataset, dp_rank: int, dp_size: int, micro_batch_size: int,
                 seq_length: int, ref_logps: Optional[np.ndarray] = None, *,
                 window: int = WINDOW):
        self.dataset, self.seq_length, self.ref_logps = dataset, seq_length, ref_logps
        self.micro_batch_size = micro_batch_size
        self.idx, self.weights = full_pass(len(dataset), dp_rank, dp_size, micro_batch_size)
        self.per_window = window * micro_batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.idx) / self.per_window)

    def __iter__(self) -> Iterator[tuple]:
        mbs = self.micro_batch_size
        for start in range(0, len(self.idx), self.per_window):
            stop = min(start + self.per_window, len(self.idx))
            chunks = [(self.idx[k:k + mbs], self.weights[k:k + mbs])
                      for k in range(start, stop, mbs)]
            yield [make_batch(self.dataset, i, self.seq_length, w, self.ref_logps)
                   for i, w in chunks], chunks
