"""Tiny random HF models for the converter tests, built from transformers configs (no downloads)."""

import json
import os

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

# name -> (config class name, config kwargs). Every vocab is off a multiple of 128 (padding).
MODELS = {
    # GQA, Llama-3 RoPE scaling (max positions 4x the original), non-default theta, untied.
    "llama3": ("LlamaConfig", dict(
        vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, rms_norm_eps=1e-5,
        tie_word_embeddings=False)),
    # Multi-head attention, tied embeddings.
    "llama_tied": ("LlamaConfig", dict(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=True)),
    # Q/K/V biases, GQA, tied (as the small Qwen2 models are).
    "qwen2": ("Qwen2Config", dict(
        vocab_size=150, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    # GQA with head_dim != hidden / heads, untied.
    "mistral": ("MistralConfig", dict(
        vocab_size=130, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        sliding_window=None, tie_word_embeddings=False)),
    # Mistral-Nemo's layout: an explicit head_dim below hidden / heads (Nemo: 128 < 5120 / 32), GQA 4:1,
    # theta 1e6, no sliding window, untied.
    "mistral_nemo": ("MistralConfig", dict(
        vocab_size=140, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=4, max_position_embeddings=64,
        rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False)),
    # Qwen2.5 7B+'s layout: Q/K/V biases, untied, a sliding_window that use_sliding_window=false
    # switches off.
    "qwen2_5": ("Qwen2Config", dict(
        vocab_size=160, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=1000000.0, rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=16,
        max_window_layers=1, tie_word_embeddings=False)),
    # Qwen3: RMSNorm on each head's queries and keys, head_dim != hidden / heads, no biases,
    # tied (as Qwen3 up to 4B is), large theta.
    "qwen3": ("Qwen3Config", dict(
        vocab_size=170, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    # Qwen3 8B+'s layout: untied, GQA 2:1 with four layers (PP=2 splits them 2 + 2).
    "qwen3_untied": ("Qwen3Config", dict(
        vocab_size=150, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)),
    # Qwen3-MoE: 4 experts, top-2 renormalised, layer 0 dense (mlp_only_layers), q/k norms,
    # untied; four layers so PP=2 puts the dense layer and an MoE layer on each stage.
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        vocab_size=150, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0],
        max_position_embeddings=64, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False)),
    # Mixtral: 4 experts in every layer, top-2 of a softmax renormalised, GQA, untied; three
    # layers, so PP=2 splits them unevenly (1 + 2).
    "mixtral": ("MixtralConfig", dict(
        vocab_size=140, hidden_size=32, intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, rope_theta=1000000.0, sliding_window=None,
        tie_word_embeddings=False)),
}


def tiny_tokenizer(path: str, vocab_size: int) -> None:
    """A word-level tokenizer over ``vocab_size`` made-up words, saved the HF way."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)


def build(name: str, path: str, *, dtype=torch.float32, max_shard_size=None, seed: int = 0,
          init_std: float = 0.2, tokenizer: bool = True) -> str:
    """Saves a random ``MODELS[name]`` (weights drawn with std ``init_std`` so log-probs are far
    from uniform) as safetensors in ``dtype``; sharded when ``max_shard_size`` is given."""
    import transformers

    cls_name, kwargs = MODELS[name]
    config = getattr(transformers, cls_name)(initializer_range=init_std, bos_token_id=1,
                                             eos_token_id=2, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms start at 1.0; make them matter (and differ per layer) too
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    model.to(dtype)
    extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **extra)
    if tokenizer:
        tiny_tokenizer(path, min(kwargs["vocab_size"], 64))
    return path


def load(path: str, dtype=torch.float32):
    """The HF model at ``path`` in ``dtype``, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def write_random_llama(path: str, *, num_layers: int, hidden: int, ffn: int, vocab: int,
                       heads: int, kv_heads: int, layers_per_shard: int, seed: int = 0) -> int:
    """A random fp32 Llama written straight with safetensors (no transformers model in memory),
    sharded every ``layers_per_shard`` layers with an index; returns the weight bytes."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    d = hidden // heads

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    weight_map, total = {}, 0
    def layer_names(i):
        p = f"model.layers.{i}."
        return {p + "input_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (heads * d, hidden),
                p + "self_attn.k_proj.weight": (kv_heads * d, hidden),
                p + "self_attn.v_proj.weight": (kv_heads * d, hidden),
                p + "self_attn.o_proj.weight": (hidden, heads * d),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "mlp.gate_proj.weight": (ffn, hidden),
                p + "mlp.up_proj.weight": (ffn, hidden),
                p + "mlp.down_proj.weight": (hidden, ffn)}

    groups = [{"model.embed_tokens.weight": (vocab, hidden)}]
    for start in range(0, num_layers, layers_per_shard):
        group = {}
        for i in range(start, min(start + layers_per_shard, num_layers)):
            group.update(layer_names(i))
        groups.append(group)
    groups.append({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    for n, group in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: rnd(*s) for k, s in group.items()}
        total += sum(t.nbytes for t in tensors.values())
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": num_layers,
                   "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                   "vocab_size": vocab, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False, "torch_dtype": "float32"}, f)
    return total
