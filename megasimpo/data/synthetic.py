"""Random preference pairs whose every sequence fills its row: benchmarks and memory simulation.

Every sequence is prompt + response = seq_length + 1 tokens, so the seq_length input positions of
a row are all real (no padding): FLOP and memory counts are then exact and the same for every
engine that reads the same ids.
"""

from typing import Iterator, Tuple

import numpy as np


def random_pairs(num_pairs: int, seq_length: int, vocab_size: int, *, prompt_length: int = 0,
                 seed: int = 0) -> Iterator[Tuple[list, list, list]]:
    """``num_pairs`` (prompt, chosen, rejected) id lists; each sequence fills ``seq_length``.

    prompt_length (default a quarter of the row) + response length = seq_length + 1, for chosen and
    rejected alike. Ids avoid 0..3 (pad/BOS/EOS/unk in most vocabularies).
    """
    prompt_length = prompt_length or max(1, seq_length // 4)
    if not 0 < prompt_length < seq_length:
        raise ValueError(f"prompt_length {prompt_length} must be in [1, {seq_length})")
    response_length = seq_length + 1 - prompt_length
    rng = np.random.default_rng(seed)
    for _ in range(num_pairs):
        prompt, chosen, rejected = (
            rng.integers(4, vocab_size, size=n).tolist()
            for n in (prompt_length, response_length, response_length))
        yield prompt, chosen, rejected
