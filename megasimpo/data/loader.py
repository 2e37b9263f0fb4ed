"""Deterministic, DP-sharded micro-batches of preference pairs.

The sampler is a pure function of (seed, global step): no iterator state, so resuming a run is just
asking for the saved step again, and the global batch of a step does not depend on how the world is
split. ``collate_pairs`` turns a micro-batch of pairs into the [2b, s] token/label/mask tensors the
model step consumes, chosen rows first, so a pair's chosen and rejected rows share a micro-batch.
"""

from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import torch

from megasimpo.data.indexed import Pair, PairDataset
from megasimpo.data.tokenize import kept_prompt_length


@dataclass(frozen=True, kw_only=True)
class BatchLayout:
    """How a global batch of pairs is split over data-parallel ranks and micro-batches."""

    micro_batch_size: int  # pairs per micro-batch per DP rank
    num_microbatches: int  # micro-batches per step per DP rank
    dp_rank: int  # this rank's index in the data-parallel group
    dp_size: int  # data-parallel world size

    def __post_init__(self):
        for name in ("micro_batch_size", "num_microbatches", "dp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"batch layout: {name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"batch layout: dp_rank={self.dp_rank} not in [0, {self.dp_size})")

    @property
    def global_batch_size(self) -> int:
        """Pairs per optimizer step over all DP ranks."""
        return self.micro_batch_size * self.num_microbatches * self.dp_size


class PairSampler:
    """Epoch e is a permutation of all pair indices drawn from ``np.random.default_rng([seed, e])``
    (independent of DP size, TP, PP and of where a run was stopped). Consecutive slices of
    ``global_batch_size`` pairs form global steps; a trailing partial global batch is dropped (its
    size is ``dropped_per_epoch``). Within a global step, DP rank d takes pairs
    ``[d*mbs*nmb, (d+1)*mbs*nmb)`` of that slice, split into ``num_microbatches`` micro-batches of
    ``micro_batch_size``."""

    def __init__(self, num_pairs: int, layout: BatchLayout, seed: int):
        if num_pairs < layout.global_batch_size:
            raise ValueError(
                f"{num_pairs} pairs cannot fill one global batch of {layout.global_batch_size}"
            )
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0 (numpy SeedSequence)")
        self.num_pairs = num_pairs
        self.layout = layout
        self.seed = seed
        self.steps_per_epoch = num_pairs // layout.global_batch_size
        self.dropped_per_epoch = num_pairs - self.steps_per_epoch * layout.global_batch_size
        self._cached_epoch = -1  # memo only: recomputable from (seed, epoch), not iterator state
        self._cached_perm = None

    def dropped_note(self, most: float = 0.1) -> str:
        """One line when the trailing partial batch drops more than ``most`` of the pairs in
        every epoch, naming a --global-batch-size (a multiple of micro-batch x DP, so the plan
        still holds) that drops at most that share; "" otherwise."""
        n, g, dropped = self.num_pairs, self.layout.global_batch_size, self.dropped_per_epoch
        if dropped <= most * n:
            return ""
        unit = self.layout.micro_batch_size * self.layout.dp_size
        better = next((c for c in range(g - unit, 0, -unit) if n % c <= most * n), None)
        fix = (f"--global-batch-size {better} drops {n % better}" if better else
               "a smaller --global-batch-size drops fewer")
        return (f"--global-batch-size {g} drops {dropped} of the {n} training pairs "
                f"({dropped / n:.0%}) in every epoch ({self.steps_per_epoch} step(s) per epoch); "
                f"{fix} (or add pairs)")

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """int64 [num_pairs]: the order of pair indices in ``epoch``."""
        if epoch != self._cached_epoch:
            self._cached_perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_pairs)
            self._cached_epoch = epoch
        return self._cached_perm

    def step_indices(self, step: int) -> List[np.ndarray]:
        """Global step (0-based, counting across epochs) -> this rank's ``num_microbatches``
        micro-batches, each int64 [micro_batch_size] of pair indices."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        lay = self.layout
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        per_rank = lay.micro_batch_size * lay.num_microbatches
        start = step_in_epoch * lay.global_batch_size + lay.dp_rank * per_rank
        mine = self.epoch_permutation(epoch)[start:start + per_rank].astype(np.int64)
        return [mb.copy() for mb in np.split(mine, lay.num_microbatches)]


def _max_tokens(seq_length: int) -> int:
    """Tokens of a full sequence (prompt + response) that ``seq_length`` inputs hold: one more,
    since the inputs are the sequence without its last token."""
    return seq_length + 1


def _kept_prompt_length(p: int, longest_response: int, seq_length: int) -> int:
    """Prompt tokens kept so prompt + the longer response fits ``seq_length`` inputs (p >= 0):
    ``tokenize.kept_prompt_length``, with a ValueError where the pair cannot fit."""
    keep = int(kept_prompt_length(p, longest_response, _max_tokens(seq_length)))
    if keep < 0:
        raise ValueError(
            f"response of {longest_response} tokens does not fit seq_length={seq_length}"
            + (" with at least one prompt token; raise --seq-length or filter the data" if p else "")
        )
    return keep


def collate_pairs(pairs: List[Pair], seq_length: int, pad_id: int) -> Dict[str, torch.Tensor]:
    """b pairs -> 2b rows: rows [0, b) are the chosen sequences, rows [b, 2b) the rejected ones
    (pair i's chosen is row i, its rejected row b+i).

    Each row's full sequence is prompt + response (L tokens); ``tokens = seq[:-1]``,
    ``labels = seq[1:]``, both right-padded with ``pad_id`` to ``seq_length`` (s). Returns
    ``tokens`` [2b, s] int64, ``labels`` [2b, s] int64, ``loss_mask`` [2b, s] float32 (1.0 exactly
    where ``labels[t]`` is a response token: t in [len(prompt)-1, L-2]), ``position_ids``
    [2b, s] int64 (0..s-1) and ``lengths`` [2b] int64 (the used positions L-1 of each row).

    Too long (L-1 > s): the prompt is cut from the LEFT (its end, next to the response, is what the
    response depends on most). Both rows of a pair keep the SAME prompt tokens, cut for the longer
    response, so chosen and rejected are scored against one context. A response longer than s
    (no prompt token could be kept) raises ValueError. An empty prompt is allowed: its first
    response token has no predecessor and cannot be scored, so the mask then covers response
    tokens 2..L (t in [0, L-2]); a 1-token response with an empty prompt raises ValueError.
    """
    if seq_length < 1:
        raise ValueError(f"seq_length={seq_length} must be >= 1")
    b = len(pairs)
    if b == 0:
        raise ValueError("collate_pairs needs at least one pair")
    tokens = np.full((2 * b, seq_length), pad_id, dtype=np.int64)
    labels = np.full((2 * b, seq_length), pad_id, dtype=np.int64)
    loss_mask = np.zeros((2 * b, seq_length), dtype=np.float32)
    lengths = np.zeros(2 * b, dtype=np.int64)
    for i, pair in enumerate(pairs):
        prompt = np.asarray(pair.prompt_ids, dtype=np.int64)
        responses = (np.asarray(pair.chosen_ids, dtype=np.int64),
                     np.asarray(pair.rejected_ids, dtype=np.int64))
        longest = max(len(r) for r in responses)
        keep = _kept_prompt_length(len(prompt), longest, seq_length)
        prompt = prompt[len(prompt) - keep:]
        for row, resp in ((i, responses[0]), (b + i, responses[1])):
            if keep == 0 and len(resp) < 2:
                raise ValueError(
                    f"pair {i}: empty prompt and a {len(resp)}-token response leave nothing to score"
                )
            seq = np.concatenate([prompt, resp])
            n = len(seq) - 1  # input/label positions used by this row
            lengths[row] = n
            tokens[row, :n] = seq[:-1]
            labels[row, :n] = seq[1:]
            loss_mask[row, max(keep - 1, 0):n] = 1.0
    position_ids = np.broadcast_to(np.arange(seq_length, dtype=np.int64), (2 * b, seq_length))
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids.copy()),
        "lengths": torch.from_numpy(lengths),
    }


def pad_to_multiple(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n`` (n >= 0, multiple >= 1)."""
    if multiple < 1:
        raise ValueError(f"multiple={multiple} must be >= 1")
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    return -(-n // multiple) * multiple


def _input_lengths(lengths: np.ndarray) -> np.ndarray:
    """int64 [n, 3] (prompt, chosen, rejected) -> int64 [n]: untruncated inputs per pair row."""
    return lengths[:, 0] + np.maximum(lengths[:, 1], lengths[:, 2]) - 1


def default_seq_length(dataset: PairDataset, multiple: int, cap: int) -> int:
    """Longest pair in the dataset (max over pairs of max(p+c, p+r) - 1), rounded up to
    ``multiple``, capped at ``cap`` rounded down to ``multiple`` (so the result always divides
    evenly, e.g. for sequence/context parallelism)."""
    if len(dataset) == 0:
        raise ValueError(f"dataset {getattr(dataset, 'prefix', dataset)!r} is empty")
    if multiple < 1:
        raise ValueError(f"multiple={multiple} must be >= 1")
    capped = cap - cap % multiple
    if capped < 1:
        raise ValueError(f"cap={cap} is smaller than multiple={multiple}")
    longest = int(_input_lengths(dataset.lengths()).max())
    return min(pad_to_multiple(longest, multiple), capped)


def count_truncated(dataset: PairDataset, seq_length: int) -> int:
    """Number of pairs whose prompt ``collate_pairs`` will cut at ``seq_length``. Raises
    ValueError naming the first pair that cannot fit at all, so a run fails at start-up rather than
    mid-epoch."""
    lengths = dataset.lengths()
    prompt, longest = lengths[:, 0], np.maximum(lengths[:, 1], lengths[:, 2])
    kept = kept_prompt_length(prompt, longest, _max_tokens(seq_length))
    unfit = kept < 0
    if unfit.any():
        i = int(np.flatnonzero(unfit)[0])
        raise ValueError(
            f"{int(unfit.sum())} pairs cannot fit seq_length={seq_length}; first is pair {i} "
            f"with a response of {int(longest[i])} tokens"
        )
    return int((kept < prompt).sum())
