"""Model shapes and random preference pairs shared by the step benchmarks (ours and TRL's).

Every benchmark row of one run sees the same shapes and the same token ids: pairs are drawn from a
seeded generator, and every sequence fills the row exactly (prompt + response = seq_length + 1
tokens, so the seq_length input positions are all real and no row carries padding). That keeps the
FLOP count of a step exact and identical across engines.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megasimpo.config import ModelConfig, RopeScaling  # noqa: E402
from megasimpo.data.synthetic import random_pairs  # noqa: E402,F401 (re-exported)

LLAMA3_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)

# name -> ModelConfig. "8b-width" is Llama-3-8B's layer and vocabulary with 8 of its 32 layers (what
# one 80 GB GPU holds with optimizer state); "1b" is Llama-3.2-1B whole; "30b-a3b-width" an MoE
# slice; "tiny" runs on a CPU.
SHAPES = {
    "8b-width": ModelConfig(
        num_layers=8, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
        num_query_groups=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
        rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, norm_eps=1e-5, dtype="bfloat16"),
    "1b": ModelConfig(
        num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
        num_query_groups=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0,
                                                      high_freq_factor=4.0,
                                                      original_max_position_embeddings=8192),
        norm_eps=1e-5, tie_word_embeddings=True, dtype="bfloat16"),
    # Qwen3-30B-A3B's layer (128 experts of width 768, top-8 renormalised, q/k norms) and
    # vocabulary with 2 of its 48 layers: Transformer Engine's grouped-GEMM experts and the
    # alltoall dispatcher on one GPU.
    "30b-a3b-width": ModelConfig(
        architecture="Qwen3MoeForCausalLM", num_layers=2, hidden_size=2048,
        ffn_hidden_size=6144, num_attention_heads=32, num_query_groups=4, head_dim=128,
        vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, norm_eps=1e-6,
        qk_norm=True, num_experts=128, experts_per_token=8, moe_ffn_hidden_size=768,
        dtype="bfloat16"),
    "tiny": ModelConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        num_query_groups=2, head_dim=16, vocab_size=1000, max_position_embeddings=256,
        rope_theta=500000.0, dtype="float32"),
}


def shape(name: str, num_layers: int = 0) -> ModelConfig:
    """SHAPES[name], with ``num_layers`` layers when > 0."""
    import dataclasses

    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    model = SHAPES[name]
    return dataclasses.replace(model, num_layers=num_layers) if num_layers > 0 else model


def write_dataset(prefix: str, num_pairs: int, seq_length: int, vocab_size: int,
                  seed: int = 0) -> str:
    """Writes ``random_pairs`` as a megasimpo pair dataset at ``prefix``; returns the prefix."""
    from megasimpo.data.indexed import write_pairs

    write_pairs(prefix, random_pairs(num_pairs, seq_length, vocab_size, seed=seed), vocab_size)
    return prefix


def default_shape() -> str:
    """The shape whose untagged run fills a results file's top-level rows: 8b-width on CUDA,
    tiny on CPU."""
    import torch

    return "8b-width" if torch.cuda.is_available() else "tiny"


def add_workload_args(p) -> None:
    """The options every step benchmark shares (shape, lengths, batch, timing, output); defaults
    depend on whether CUDA is present."""
    import torch

    cuda = torch.cuda.is_available()
    p.add_argument("--shape", choices=sorted(SHAPES), default=default_shape())
    p.add_argument("--layers", type=int, default=0, help="layer count override (0: the shape's)")
    p.add_argument("--seq-length", type=int, default=4096 if cuda else 64)
    p.add_argument("--micro-batch-size", type=int, default=1, help="pairs per micro-batch")
    p.add_argument("--global-batch-size", type=int, default=8 if cuda else 2, help="pairs per step")
    p.add_argument("--steps", type=int, default=10 if cuda else 2, help="timed steps")
    p.add_argument("--warmup", type=int, default=3 if cuda else 1, help="untimed steps first")
    p.add_argument("--out", default=None, help="results JSON (default bench/results/<device>.json)")
    p.add_argument("--tag", default="", help="store under runs['<shape>-<tag>'], not the primary rows")


def check_workload_args(p, args) -> None:
    """``p.error`` for workload options out of range."""
    for name in ("seq_length", "micro_batch_size", "global_batch_size", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.warmup < 0 or args.layers < 0:
        p.error("--warmup and --layers must be >= 0")
