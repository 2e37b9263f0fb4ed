"""Micro-batches as the step function consumes them, from one or more pair datasets.

Training batches come from the sampler; a full pass (evaluation, scoring) covers every pair of a
dataset once, DP-sharded, with zero-weight filler pairs completing the last micro-batch so every
rank runs the same number of micro-batches and no pair is dropped.
"""

import math
from typing import Optional

import numpy as np
import torch

from megasimpo.data.indexed import PairDataset
from megasimpo.data.loader import collate_pairs

PAD_ID = 0  # right padding under a causal mask is never attended to nor scored


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


def make_batch(dataset, indices, seq_length: int, weights=None,
               ref_logps: Optional[np.ndarray] = None) -> dict:
    """Collated micro-batch for pair ``indices``: tokens/labels/loss_mask/position_ids [2b, s],
    ``lengths`` [2b], ``num_tokens`` (real tokens), ``weights`` [b] and, when given,
    ``ref_logps`` [b, 2]."""
    pairs = [dataset[int(i)] for i in indices]
    batch = collate_pairs(pairs, seq_length, PAD_ID)
    batch["num_tokens"] = batch["lengths"].sum()
    batch["weights"] = torch.ones(len(pairs)) if weights is None else torch.as_tensor(weights)
    if ref_logps is not None:
        batch["ref_logps"] = torch.as_tensor(ref_logps[np.asarray(indices, dtype=np.int64)],
                                             dtype=torch.float32)
    if torch.cuda.is_available():
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    return batch


def full_pass(num_pairs: int, dp_rank: int, dp_size: int, micro_batch_size: int):
    """(indices, weights) lists for every pair once: rank d takes pairs d, d+dp, ...; the
    last micro-batch is completed with zero-weight copies of pair 0."""
    per_rank = math.ceil(num_pairs / dp_size)
    total = math.ceil(per_rank / micro_batch_size) * micro_batch_size
    idx = list(range(dp_rank, num_pairs, dp_size))
    weights = [1.0] * len(idx) + [0.0] * (total - len(idx))
    idx += [0] * (total - len(idx))
    return idx, weights


def full_pass_batches(dataset, dp_rank: int, dp_size: int, micro_batch_size: int,
                      seq_length: int, ref_logps: Optional[np.ndarray] = None) -> tuple:
    """(micro-batches, their pair indices) covering every pair of ``dataset`` once."""
    idx, weights = full_pass(len(dataset), dp_rank, dp_size, micro_batch_size)
    batches, chunks = [], []
    for k in range(0, len(idx), micro_batch_size):
        sl = slice(k, k + micro_batch_size)
        batches.append(make_batch(dataset, idx[sl], seq_length, weights[sl], ref_logps))
        chunks.append((idx[sl], weights[sl]))
    return batches, chunks
