"""One home for the model's stored shapes: padded vocabulary and one layer's GEMMs.

``ModelConfig.num_parameters``, the memory model's parameter counts and the FLOP count all derive
from ``megasimpo.shapes``; the figures below are the ones each gave before it moved there, and a
built GPTModel holds exactly the parameters they count.
"""

import pytest

from megasimpo import memory_model, metrics, model, shapes
from megasimpo.config import ModelConfig
from multirank import run_ranks

pytestmark = pytest.mark.fast  # in `make test-fast`

LLAMA3_8B = ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                        num_attention_heads=32, num_query_groups=8, head_dim=128,
                        vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
QWEN_LIKE = ModelConfig(num_layers=3, hidden_size=48, ffn_hidden_size=80, num_attention_heads=6,
                        num_query_groups=2, head_dim=8, vocab_size=1000,
                        max_position_embeddings=64, qkv_bias=True, tie_word_embeddings=True)
TINY = ModelConfig(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                   num_query_groups=2, head_dim=8, vocab_size=64, max_position_embeddings=64,
                   tie_word_embeddings=False, dtype="float32")

# (num_parameters, layer (sharded, replicated), dense FLOPs per token, attention FLOPs at 777)
BEFORE = {
    "llama": (LLAMA3_8B, 8030261248, (218103808, 8192), 15009316864.0, 158263934976.0),
    "qwen": (QWEN_LIKE, 101568, (17744, 96), 204288.0, 173873952.0),
    "tiny": (TINY, 41248, (9216, 64), 81920.0, 154554624.0),
}


def test_padded_vocab_has_one_home():
    assert model.padded_vocab_size is shapes.padded_vocab_size
    assert memory_model.padded_vocab_size is shapes.padded_vocab_size
    assert [shapes.padded_vocab_size(v) for v in (64, 128, 129, 32000, 128256, 151936, 50257)] \
        == [128, 128, 256, 32000, 128256, 151936, 50304]


def test_layer_gemms():
    layer = shapes.layer_shapes(LLAMA3_8B)
    assert layer.gemms == {"qkv": (4096, 4096 + 2048), "proj": (4096, 4096),
                           "fc1": (4096, 2 * 14336), "fc2": (14336, 4096)}
    assert layer.gemm_weights == 4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336
    assert layer.sharded_parameters == layer.gemm_weights  # no QKV bias
    bias = shapes.layer_shapes(QWEN_LIKE)
    assert bias.sharded_parameters == bias.gemm_weights + 48 + 16 * 2
    assert bias.parameters == bias.sharded_parameters + 2 * 48


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_counts_unchanged(name):
    cfg, params, layer, dense, attention = BEFORE[name]
    assert cfg.num_parameters == params
    assert memory_model.layer_parameters(cfg) == layer
    assert metrics._dense_flops_per_token(cfg) == dense
    assert metrics._attention_flops(cfg, 777) == attention
    assert metrics.forward_flops_per_token(cfg, 512) == dense + metrics._attention_flops(cfg, 512) / 512
    assert metrics.step_flops(cfg, 512, 8, reference_forwards=1) == \
        metrics.forward_flops_per_token(cfg, 512) * 512 * 8 * 4


def _built_parameters(rank, world_size, cfg):
    from megasimpo.config import Layout
    from megasimpo.model import Precision, build_chunks
    from megasimpo.parallel import groups

    groups.initialize(Layout.resolve(cfg, 1), 0)
    chunks = build_chunks(cfg, Layout.resolve(cfg, 1), Precision(name="fp32"), seed=0)
    return sum(p.numel() for c in chunks for p in c.parameters())


@pytest.mark.parametrize("cfg", [QWEN_LIKE, TINY], ids=["tied-qkv-bias", "untied"])
def test_built_model_holds_what_is_counted(cfg):
    """The memory model's one-GPU count is the built model's; num_parameters differs from it by
    the vocabulary padding only."""
    (built,) = run_ranks(_built_parameters, 1, cfg)
    assert memory_model.stage_parameters(cfg, 1, 1, 0) == built
    padding = (shapes.padded_vocab_size(cfg.vocab_size) - cfg.vocab_size) * cfg.hidden_size
    assert cfg.num_parameters + padding * (1 if cfg.tie_word_embeddings else 2) == built
