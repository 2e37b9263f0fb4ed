"""Layout and config validation: pure, no process group."""

import json

import pytest

from megasimpo.config import Layout, LossConfig, ModelConfig, TrainConfig

pytestmark = pytest.mark.fast  # in `make test-fast`

LLAMA8B = ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                      num_query_groups=8, head_dim=128, vocab_size=128256,
                      max_position_embeddings=8192)


def test_layout_dp_takes_remaining_ranks():
    lay = Layout.resolve(LLAMA8B, 16, tp=2, pp=2)
    assert (lay.tp, lay.pp, lay.cp, lay.dp, lay.world_size) == (2, 2, 1, 4, 16)
    assert lay.sequence_parallel  # on by default whenever tp > 1 (every layer spec supports it)
    assert not Layout.resolve(LLAMA8B, 16, pp=2).sequence_parallel
    assert not Layout.resolve(LLAMA8B, 16, tp=2, sequence_parallel=False).sequence_parallel


@pytest.mark.parametrize("kw,world,msg", [
    (dict(tp=3), 6, "does not divide the model's 32 attention heads"),
    (dict(tp=16), 16, "does not divide the model's 8 KV heads"),
    (dict(tp=2), 3, "world size 3 is not divisible by tp*pp*cp = 2*1*1 = 2"),
    (dict(pp=33), 33, "32 layers do not split evenly over pp*vpp = 33*1"),
    (dict(pp=2, vpp=3), 2, "32 layers do not split evenly over pp*vpp = 2*3"),
    (dict(vpp=2), 1, "--vpp 2 needs --pp > 1"),
    (dict(tp=0), 1, "--tp 0 must be >= 1"),
    (dict(sequence_parallel=True), 1, "sequence parallelism needs --tp > 1"),
])
def test_bad_layouts_name_the_values(kw, world, msg):
    with pytest.raises(ValueError, match=msg.replace("*", r"\*").replace("(", r"\(")):
        Layout.resolve(LLAMA8B, world, **kw)


def test_model_config_from_hf_llama3(tmp_path):
    hf = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
          "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
          "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
          "rope_theta": 500000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    m = ModelConfig.from_hf(str(tmp_path))
    assert (m.head_dim, m.num_query_groups, m.rope_scaling.factor, m.dtype) == (128, 8, 8.0, "bfloat16")
    # Llama-3-8B has 8.03e9 parameters.
    assert abs(m.num_parameters - 8.03e9) < 0.01e9
    assert ModelConfig.from_dict(m.to_dict()) == m


def test_model_config_refuses_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="not supported; supported: LlamaForCausalLM"):
        ModelConfig.from_hf(str(tmp_path))
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="line 1"):
        ModelConfig.from_hf(str(tmp_path))


def test_loss_and_train_config_validation():
    assert LossConfig().beta == 2.0 and LossConfig(name="dpo").beta == 0.1
    assert LossConfig(beta=2.5, gamma_beta_ratio=0.4).gamma == pytest.approx(1.0)
    with pytest.raises(ValueError, match="--loss 'kto'"):
        LossConfig(name="kto")
    with pytest.raises(ValueError, match="--ref 'none'"):
        TrainConfig(load="m", data=("d",), out="o", ref="none")
    with pytest.raises(ValueError, match="--global-batch-size 0"):
        TrainConfig(load="m", data=("d",), out="o", global_batch_size=0)


def test_from_hf_refuses_output_biases_and_records_sliding_window(tmp_path):
    base = {"architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
            "vocab_size": 100}
    assert ModelConfig.from_hf_dict(dict(base, sliding_window=4096)).sliding_window == 4096
    qwen = dict(base, architectures=["Qwen2ForCausalLM"], sliding_window=4096)
    assert ModelConfig.from_hf_dict(qwen).sliding_window is None  # use_sliding_window false
    assert ModelConfig.from_hf_dict(qwen).qkv_bias
    llama = dict(base, architectures=["LlamaForCausalLM"], attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias=true"):
        ModelConfig.from_hf_dict(llama)



def test_numeric_ranges_are_declared_with_the_field_and_enforced():
    # Negative numbers that used to mean something else (-1: save every step, stop after step 1,
    # no clipping, keep all) are refused in one line naming the flag, the value and the range;
    # 0 keeps its documented meaning.
    import dataclasses
    import re
    import typing

    from megasimpo.config import LoraConfig, range_text

    for flag, value, allowed in [
            ("save_interval", -1, ">= 0"), ("eval_interval", -1, ">= 0"),
            ("exit_interval", -1, ">= 1"), ("clip_grad", -1.0, ">= 0"),
            ("keep_checkpoints", -1, ">= 0"), ("warmup_ratio", 1.0, "in [0, 1)"),
            ("adam_beta2", 1.0, "in [0, 1)"), ("lr", float("nan"), "a finite number"),
            ("seed", -3, ">= 0"), ("gpu_mem_gb", 0.0, "> 0"), ("logprob_chunk", -1, ">= 0")]:
        with pytest.raises(ValueError, match=re.escape(f"--{flag.replace('_', '-')} {value!r} "
                                                       f"must be {allowed}")):
            TrainConfig(load="m", data=("d",), out="o", **{flag: value})
    for flag in ("save_interval", "eval_interval", "keep_checkpoints", "clip_grad"):
        assert getattr(TrainConfig(load="m", data=("d",), out="o", **{flag: 0}), flag) == 0
    # Every numeric field of the run's dataclasses declares its range.
    unbounded = {("LossConfig", "alphapo_alpha"),  # any finite alpha is a reward shape
                 ("LossConfig", "rdpo_alpha")}  # a negative one favours length (test_losses)
    missing = []
    for cls in (TrainConfig, LossConfig, LoraConfig, Layout):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kinds = set(typing.get_args(hints[f.name]) or (hints[f.name],))
            if kinds & {int, float} and not range_text(f) \
                    and (cls.__name__, f.name) not in unbounded:
                missing.append(f"{cls.__name__}.{f.name}")
    assert not missing
    with pytest.raises(ValueError, match=r"--alphapo-alpha inf must be a finite number"):
        LossConfig(name="alphapo", alphapo_alpha=float("inf"))
    with pytest.raises(ValueError, match=r"--lora-alpha -1.0 must be >= 0"):
        LoraConfig(rank=4, alpha=-1.0)
    with pytest.raises(ValueError, match=r"--lora-alpha 0.0 must be > 0 with --lora-rank 4"):
        LoraConfig(rank=4, alpha=0.0)
    with pytest.raises(ValueError, match=r"--vpp 0 must be >= 1"):
        Layout(vpp=0)
    assert LoraConfig(alpha=0.0).alpha == 0.0  # rank 0: what config.yaml records
