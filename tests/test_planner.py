"""Layout planner: known layouts, the memory model against hand arithmetic, errors, `plan` CLI.

Pure arithmetic, no process group. Llama-3 shapes are written out here (not read from the bundled
examples config) so a wrong example file cannot make these pass.
"""

import dataclasses
import argparse
import json
import os
import re

import pytest

from megasimpo import memory_model, plan_cmd, planner
from megasimpo import pipeline_split as split_rules
from megasimpo.config import Layout, ModelConfig

pytestmark = pytest.mark.fast  # in `make test-fast`

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA3_8B = ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                        num_attention_heads=32, num_query_groups=8, head_dim=128,
                        vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
LLAMA3_70B = ModelConfig(num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
                         num_attention_heads=64, num_query_groups=8, head_dim=128,
                         vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)


def check_consistent(p: planner.Plan, model: ModelConfig, gpus: int, gpu_mem_gb: float = 80.0):
    """Every constraint the trainer and Megatron's schedules impose, and the memory budget."""
    assert p.world_size == gpus
    assert Layout.resolve(model, gpus, tp=p.layout.tp, pp=p.layout.pp, vpp=p.layout.vpp, cp=p.layout.cp,
                          sequence_parallel=p.layout.sequence_parallel,
                          first_stage_layers=p.layout.first_stage_layers,
                          last_stage_layers=p.layout.last_stage_layers) == p.layout
    assert sum(p.layout.stage_layers(model.num_layers)) == model.num_layers
    assert p.micro_batch_size * p.layout.dp * p.num_microbatches == p.global_batch_size
    assert p.num_microbatches >= p.layout.pp
    if p.layout.vpp:
        assert p.num_microbatches % p.layout.pp == 0
        assert all(c % p.layout.vpp == 0 for c in p.layout.stage_layers(model.num_layers))
    assert p.seq_length % (2 * p.layout.cp * (p.layout.tp if p.layout.sequence_parallel else 1)) == 0
    assert p.layout.sequence_parallel == (p.layout.tp > 1)
    assert p.memory.total <= 0.9 * gpu_mem_gb
    assert p.memory.total == max(s.total for s in p.stages)
    assert len(p.reasons) >= 8 and all(isinstance(r, str) and r for r in p.reasons)


# ----- known layouts -------------------------------------------------------------------------

def test_llama3_8b_on_8_gpus():
    p = planner.plan(LLAMA3_8B, 8, seq_length=4096)
    check_consistent(p, LLAMA3_8B, 8)
    assert p.layout.tp in (1, 2) and p.layout.pp == 1 and p.layout.cp == 1 and p.layout.dp >= 4
    assert not p.recompute


@pytest.mark.parametrize("seq_length", [4096, 8192])
@pytest.mark.parametrize("loss", ["simpo", "dpo"])
def test_llama3_70b_on_64_gpus(seq_length, loss):
    p = planner.plan(LLAMA3_70B, 64, seq_length=seq_length, loss=loss)
    check_consistent(p, LLAMA3_70B, 64)
    assert p.layout.tp == 8 and p.layout.sequence_parallel  # 70B needs all of a node's NVLink
    assert p.layout.pp in (2, 4, 8) and p.layout.dp >= 1
    assert (p.memory.reference > 0) == (loss == "dpo")


def test_llama3_70b_4096_simpo_expected_layout():
    p = planner.plan(LLAMA3_70B, 64, seq_length=4096)
    assert (p.layout.tp, p.layout.pp, p.layout.cp, p.layout.dp, p.recompute) == (8, 2, 1, 4, False)
    assert p.memory.total <= 72.0


def test_recompute_only_when_nothing_fits_without_it():
    assert not planner.plan(LLAMA3_70B, 64, seq_length=8192).recompute
    p = planner.plan(LLAMA3_70B, 64, seq_length=32768)
    check_consistent(p, LLAMA3_70B, 64)
    assert p.recompute
    with pytest.raises(ValueError, match="does not fit|needs at least"):
        planner.plan(LLAMA3_70B, 64, seq_length=32768, overrides={"recompute": False})


def test_long_sequences_use_context_parallelism():
    p = planner.plan(LLAMA3_8B, 16, seq_length=32768)
    check_consistent(p, LLAMA3_8B, 16)
    assert p.layout.cp > 1


def test_context_parallelism_only_with_a_backend_that_has_it():
    # sdpa has CP (parallel/cp_attention.py) and plans it like te; unfused has none: CP=1 and
    # a reason saying why, and a fixed --cp is refused in one line.
    assert planner.plan(LLAMA3_8B, 16, seq_length=32768, attention_backend="sdpa").layout.cp > 1
    p = planner.plan(LLAMA3_8B, 16, seq_length=32768, attention_backend="unfused",
                     gpu_mem_gb=1000.0)
    check_consistent(p, LLAMA3_8B, 16, gpu_mem_gb=1000.0)
    assert p.layout.cp == 1
    assert "CP=1: the unfused attention has no context parallelism" in p.reasons
    with pytest.raises(ValueError, match="--attention-backend unfused has no context "
                                         "parallelism \\(--cp 2\\)"):
        planner.plan(LLAMA3_8B, 16, attention_backend="unfused", overrides={"cp": 2})


def test_sdpa_context_parallelism_keeps_the_gathered_keys_and_values():
    layout = dict(tp=8, pp=1, cp=2, dp=1, micro_batch_size=1, num_microbatches=8)
    te = memory_model.memory_breakdown(LLAMA3_8B, seq_length=8192, **layout)
    sdpa = memory_model.memory_breakdown(LLAMA3_8B, seq_length=8192, attention_backend="sdpa",
                                         **layout)
    # Per layer: the other rank's K and V (2 x 4096 tokens x 2 sequences x 1 KV head x 128 x
    # 2 B), 32 layers held plus the working one; once: the bf16 [4096, 8192] mask.
    per_layer = 2 * 2 * 4096 * 2 * 128
    assert sdpa.activations - te.activations == pytest.approx(
        (33 * per_layer + 2 * 4096 * 8192) / 1e9)


def test_smaller_gpus_get_a_leaner_plan():
    big = planner.plan(LLAMA3_8B, 8, seq_length=4096)
    small = planner.plan(LLAMA3_8B, 8, seq_length=4096, gpu_mem_gb=40)
    check_consistent(small, LLAMA3_8B, 8, gpu_mem_gb=40)
    assert small.memory.total <= 36.0 < big.memory.total


# ----- the memory model ----------------------------------------------------------------------

def test_distributed_optimizer_bytes_by_hand():
    # Llama-3-70B, tp=8, pp=4, dp=2, first stage: 20 layers and the embedding.
    # layer: QKV 8192*(8192+2*8*128) + proj 8192*8192 + SwiGLU 3*8192*28672 = 855,638,016 (/tp)
    #        + 2 norms of 8192 (replicated); embedding 128256*8192 (/tp).
    params = 20 * (855_638_016 / 8 + 2 * 8192) + 128256 * 8192 / 8  # = 2,270,756,864
    assert params == pytest.approx(2.27e9, rel=1e-3)
    expected_gb = params * (6 + 12 / 2) / 1e9  # bf16 weight + fp32 grad, fp32 master + Adam / DP
    m = memory_model.stage_memory(LLAMA3_70B, tp=8, pp=4, vpp=None, cp=1, dp=2,
                                  sequence_parallel=True, seq_length=4096, micro_batch_size=1,
                                  num_microbatches=64, loss="simpo", recompute=False, stage=0)
    assert m.weights + m.grads + m.optimizer == pytest.approx(expected_gb, rel=1e-6)
    assert expected_gb == pytest.approx(27.25, abs=0.01)
    assert m.weights == pytest.approx(2 * params / 1e9)
    # CP ranks share the optimizer shards too (Megatron's dp_cp group).
    m_cp = memory_model.stage_memory(LLAMA3_70B, tp=8, pp=4, vpp=None, cp=2, dp=1,
                                     sequence_parallel=True, seq_length=4096, micro_batch_size=1,
                                     num_microbatches=128, loss="simpo", recompute=False, stage=0)
    assert m_cp.optimizer == pytest.approx(m.optimizer)


def test_activations_by_hand():
    s, b, h, tp = 4096, 2, 8192, 8  # one pair per micro-batch = 2 sequences
    per_layer = memory_model.layer_activation_bytes(LLAMA3_70B, tokens=s * b, tp=tp,
                                                    sequence_parallel=True, recompute=False)
    # (14 + 6g)h + 6f bytes per token with g = 1/8, all sharded by TP+SP: Korthikanti's
    # (12 + 4g)h + 6f plus the rotary copies of Q and K, (2 + 2g)h.
    assert per_layer == 8192 * (14.75 * 8192 + 6 * 28672) / 8
    assert per_layer == pytest.approx(36 * s * b * h / tp, rel=0.02)
    assert memory_model.layer_activation_bytes(LLAMA3_70B, tokens=s * b, tp=tp,
                                               sequence_parallel=True,
                                               recompute=True) == 2 * s * b * h / tp
    no_sp = memory_model.layer_activation_bytes(LLAMA3_70B, tokens=s * b, tp=tp,
                                                sequence_parallel=False, recompute=False)
    assert no_sp == pytest.approx(per_layer + s * b * 8 * h * (1 - 1 / tp))
    # 1F1B, pp=4: stage 0 holds 4 micro-batches x 20 layers (+ one layer of working set).
    m = memory_model.stage_memory(LLAMA3_70B, tp=8, pp=4, vpp=None, cp=1, dp=2,
                                  sequence_parallel=True, seq_length=s, micro_batch_size=1,
                                  num_microbatches=64, loss="simpo", recompute=False, stage=0)
    assert m.activations == pytest.approx((80 + 1) * per_layer / 1e9)
    assert m.logits == 0.0
    last = memory_model.stage_memory(LLAMA3_70B, tp=8, pp=4, vpp=None, cp=1, dp=2,
                                     sequence_parallel=True, seq_length=s, micro_batch_size=1,
                                     num_microbatches=64, loss="simpo", recompute=False, stage=3)
    assert last.activations == pytest.approx((20 + 1) * per_layer / 1e9)
    inputs = 2 * 2 * s * b * h / tp  # final-norm and output-layer inputs, SP-sharded
    # Fused (default): one 1024-token chunk of logits, the bf16 weight-gradient buffer, and the
    # gathered hidden states in fp32 + bf16 + their bf16 gradient.
    fused = 1024 * 128256 / tp * 10 + 2 * 128256 / tp * h + 8 * s * b * h + inputs
    assert last.logits == pytest.approx(fused / 1e9)
    plain = memory_model.stage_memory(LLAMA3_70B, tp=8, pp=4, vpp=None, cp=1, dp=2,
                                      sequence_parallel=True, seq_length=s, micro_batch_size=1,
                                      num_microbatches=64, loss="simpo", recompute=False, stage=3,
                                      logprob_chunk=0)
    assert plain.logits == pytest.approx((s * b * 128256 / tp * 10 + inputs) / 1e9)
    assert fused < 0.8 * (s * b * 128256 / tp * 10 + inputs)  # v/tp = 16k: a modest saving


def test_in_flight_matches_megatron_schedules():
    assert memory_model.in_flight_chunks(1, None, 0, 64) == 1
    assert [memory_model.in_flight_chunks(4, None, r, 64) for r in range(4)] == [4, 3, 2, 1]
    assert memory_model.in_flight_chunks(4, None, 0, 2) == 2  # fewer micro-batches than stages
    # interleaved: warm-up 2*(pp-r-1) + (vpp-1)*pp, plus one; layers = L*(1 + (pp-1)/(pp*vpp))
    chunks = memory_model.in_flight_chunks(4, 5, 0, 64)
    assert chunks == 2 * 3 + 4 * 4 + 1
    assert chunks * 80 // 20 == pytest.approx(80 * (1 + 3 / 20))


def test_padded_vocab_matches_the_model():
    from megasimpo.model import padded_vocab_size

    for v in (64, 32000, 128256, 151936, 50257):
        assert memory_model.padded_vocab_size(v) == padded_vocab_size(v)


def test_tied_embeddings_counted_once_without_pipeline():
    tied = ModelConfig(**dict(LLAMA3_8B.to_dict(), tie_word_embeddings=True))
    emb = memory_model.padded_vocab_size(tied.vocab_size) * tied.hidden_size
    assert memory_model.stage_parameters(tied, 1, 1, 0) == pytest.approx(tied.num_parameters)
    assert memory_model.stage_parameters(LLAMA3_8B, 1, 1, 0) == pytest.approx(
        LLAMA3_8B.num_parameters)
    # with a pipeline the last stage keeps its own copy for the output layer: both ends hold
    # the embedding, the last adds the final norm
    first, last = (memory_model.stage_parameters(tied, 1, 2, s) for s in (0, 1))
    assert last - first == pytest.approx(tied.hidden_size)
    assert first == pytest.approx(tied.num_parameters / 2 + emb / 2 - tied.hidden_size / 2)


@pytest.mark.parametrize("model,gpus", [(LLAMA3_8B, 8), (LLAMA3_70B, 64)])
@pytest.mark.parametrize("seq_length", [2048, 8192])
def test_dpo_never_below_simpo_on_the_same_layout(model, gpus, seq_length):
    layouts = list(planner._layouts(model, gpus, gpus_per_node=8, seq_length=seq_length,
                                    global_batch_size=128, fixed={}))
    assert len(layouts) > 20
    for layout in layouts:
        simpo = memory_model.stage_breakdowns(model, seq_length=seq_length, loss="simpo", **layout)
        dpo = memory_model.stage_breakdowns(model, seq_length=seq_length, loss="dpo", **layout)
        pre = memory_model.stage_breakdowns(model, seq_length=seq_length, loss="dpo",
                                            ref="precomputed", **layout)
        for s, d, q in zip(simpo, dpo, pre):
            assert d.total > s.total, layout
            assert d.reference == pytest.approx(s.weights)  # 2 B/param, same sharding
            assert d.total - d.reference == pytest.approx(s.total)
            assert q.total == pytest.approx(s.total)


# ----- overrides -----------------------------------------------------------------------------

def test_overrides_are_kept_and_the_rest_planned():
    p = planner.plan(LLAMA3_70B, 64, overrides={"tp": 4})
    check_consistent(p, LLAMA3_70B, 64)
    assert p.layout.tp == 4 and any("fixed by override" in r for r in p.reasons)
    p = planner.plan(LLAMA3_70B, 64, overrides={"tp": 8, "pp": 4, "vpp": 5, "micro_batch_size": 1,
                                                "cp": None})
    assert (p.layout.tp, p.layout.pp, p.layout.vpp, p.micro_batch_size) == (8, 4, 5, 1)
    assert p.layout.dp == 2 and p.num_microbatches == 64
    p = planner.plan(LLAMA3_8B, 8, overrides={"recompute": True})
    assert p.recompute
    p = planner.plan(LLAMA3_8B, 8, overrides={"vpp": 1, "pp": 2})
    assert p.layout.pp == 2 and p.layout.vpp is None


@pytest.mark.parametrize("backend", ["te", "sdpa", "unfused"])
def test_sequence_parallelism_without_transformer_engine(backend):
    # Every backend's norms support SP (layer_spec.TorchRMSNorm on the local spec).
    p = planner.plan(LLAMA3_70B, 64, attention_backend=backend)
    assert p.layout.tp > 1 and p.layout.sequence_parallel
    assert p.to_dict()["attention_backend"] == backend
    assert not planner.plan(LLAMA3_70B, 64, overrides={"sequence_parallel": False}).layout.sequence_parallel


def test_unfused_attention_pays_for_its_score_matrices():
    layout = dict(tp=8, pp=2, dp=4, micro_batch_size=1, num_microbatches=32)
    flash = memory_model.memory_breakdown(LLAMA3_70B, seq_length=4096, **layout)
    sdpa = memory_model.memory_breakdown(LLAMA3_70B, seq_length=4096, attention_backend="sdpa",
                                         **layout)
    unfused = memory_model.memory_breakdown(LLAMA3_70B, seq_length=4096,
                                            attention_backend="unfused", **layout)
    assert sdpa.total == flash.total  # flash-style kernels keep no s x s scores
    # 2 sequences x 8 heads per TP rank x 4096^2 scores x 6 B, per layer held (41 layer-slots).
    per_layer = 6 * 2 * 4096 * 4096 * 8 / 1e9
    assert unfused.activations - flash.activations > 40 * per_layer
    with pytest.raises(ValueError, match="attention backend 'auto'"):
        planner.plan(LLAMA3_70B, 64, attention_backend="auto")


@pytest.mark.parametrize("gpus,overrides,msg", [
    (64, {"tp": 16}, "does not divide the model's 8 KV heads"),
    (64, {"tp": 3}, "world size 64 is not divisible by tp\\*pp\\*cp = 3\\*1\\*1"),
    (48, {"pp": 2, "vpp": 3}, "80 layers do not split evenly"),
    (64, {"tp": 0}, "--tp 0 must be >= 1"),
    (64, {"zero": 3}, "unknown plan override"),
])
def test_bad_overrides_name_the_value(gpus, overrides, msg):
    with pytest.raises(ValueError, match=msg):
        planner.plan(LLAMA3_70B, gpus, overrides=overrides)


# ----- impossible requests -------------------------------------------------------------------

def _minimum(message: str) -> int:
    found = re.search(r"needs at least (\d+) GPUs", message)
    assert found, message
    return int(found.group(1))


def test_70b_on_four_24gb_gpus_names_the_minimum():
    with pytest.raises(ValueError) as err:
        planner.plan(LLAMA3_70B, 4, gpu_mem_gb=24)
    minimum = _minimum(str(err.value))
    assert "24 GB" in str(err.value) and "--gpus 4" in str(err.value)
    check_consistent(planner.plan(LLAMA3_70B, minimum, gpu_mem_gb=24), LLAMA3_70B, minimum, 24)
    with pytest.raises(ValueError):
        planner.plan(LLAMA3_70B, minimum // 2, gpu_mem_gb=24)


@pytest.mark.parametrize("gpus", [8, 16])
def test_too_few_gpus_for_70b(gpus):
    with pytest.raises(ValueError) as err:
        planner.plan(LLAMA3_70B, gpus)
    minimum = _minimum(str(err.value))
    # 16 cannot shard the optimizer state enough (checked by the other case); 24 can, at
    # TP=2 x PP=12, whose 80 layers split unevenly
    assert minimum == 24
    assert planner.plan(LLAMA3_70B, minimum).layout.first_stage_layers is not None


@pytest.mark.parametrize("model,gpus,near", [(LLAMA3_8B, 37, (36, 40)), (LLAMA3_70B, 83, (82, 84))])
def test_gpu_count_that_does_not_split_names_the_nearest(model, gpus, near):
    with pytest.raises(ValueError, match=f"nearest GPU counts that work: {near[0]} or {near[1]}"):
        planner.plan(model, gpus)
    for n in near:
        check_consistent(planner.plan(model, n), model, n)


def test_model_that_fits_nowhere():
    # 0.5 GB left after the overhead: not even the embedding shard (1.05e9/8 params x 6 B) fits
    with pytest.raises(ValueError, match="does not fit on GPUs of 5 GB .* at any GPU count"):
        planner.plan(LLAMA3_70B, 64, gpu_mem_gb=5)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(gpus=0), "--gpus 0 must be >= 1"),
    (dict(gpus=8, gpu_mem_gb=2), "--gpu-mem-gb 2 is too small"),
    (dict(gpus=8, loss="kto"), "--loss 'kto' is not one of"),
    (dict(gpus=8, seq_length=0), "--seq-length 0 must be >= 1"),
])
def test_bad_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        planner.plan(LLAMA3_8B, **kwargs)


# ----- the `plan` command --------------------------------------------------------------------

def _run_plan(argv, capsys):
    parser = argparse.ArgumentParser(prog="megasimpo")
    plan_cmd.add_parser(parser.add_subparsers(dest="command"))
    rc = plan_cmd.run(parser.parse_args(["plan"] + argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_plan_json_for_bundled_70b_config(capsys):
    config = os.path.join(REPO, "examples", "configs", "llama3_70b.json")
    assert ModelConfig.from_hf(config) == LLAMA3_70B  # the bundled file has the real values
    rc, out, err = _run_plan(["--hf-config", config, "--gpus", "64", "--json"], capsys)
    assert rc == 0, err
    d = json.loads(out)  # exactly one JSON object
    for key in ("tp", "pp", "vpp", "cp", "dp", "micro_batch_size", "num_microbatches",
                "recompute", "memory_gb", "gpu_mem_gb"):
        assert key in d
    parts = ("weights", "grads", "optimizer", "reference", "activations", "logits", "overhead")
    assert d["memory_gb"]["total"] == pytest.approx(sum(d["memory_gb"][k] for k in parts), abs=0.05)
    assert d["memory_gb"]["total"] <= 72.0 and d["gpu_mem_gb"] == 80.0
    assert d["tp"] * d["pp"] * d["cp"] * d["dp"] == 64


def test_plan_table_and_dpo(capsys):
    config = os.path.join(REPO, "examples", "configs", "llama3_70b.json")
    rc, out, _ = _run_plan(["--hf-config", config, "--gpus", "64", "--seq-length", "8192",
                            "--loss", "dpo"], capsys)
    assert rc == 0
    for text in ("layout  TP=8", "DP=", "micro-batches", "reference model", "total", "budget",
                 "why", "live reference"):
        assert text in out, text


def test_plan_from_checkpoint(tmp_path, capsys):
    from megasimpo.checkpoint_meta import FORMAT
    from megasimpo.run_paths import META_FILE

    (tmp_path / META_FILE).write_text(json.dumps({"format": FORMAT, "model": LLAMA3_8B.to_dict()}))
    rc, out, err = _run_plan(["--load", str(tmp_path), "--gpus", "8", "--json", "--tp", "4"],
                             capsys)
    assert rc == 0, err
    assert json.loads(out)["tp"] == 4


@pytest.mark.parametrize("argv,msg", [
    (["--gpus", "8"], "needs at least 24 GPUs"),
    (["--gpus", "83"], "nearest GPU counts that work: 82 or 84 (minimum 24)"),
    (["--gpus", "64", "--tp", "3"], "not divisible"),
])
def test_plan_errors_exit_2(capsys, argv, msg):
    config = os.path.join(REPO, "examples", "configs", "llama3_70b.json")
    rc, out, err = _run_plan(["--hf-config", config] + argv, capsys)
    assert rc == 2 and out == ""
    assert err.startswith("megasimpo plan: error: ") and msg in err


def test_plan_missing_inputs_exit_2(tmp_path, capsys):
    rc, _, err = _run_plan(["--hf-config", str(tmp_path / "none.json"), "--gpus", "8"], capsys)
    assert rc == 2 and "megasimpo plan: error:" in err
    rc, _, err = _run_plan(["--load", str(tmp_path), "--gpus", "8"], capsys)
    assert rc == 2 and "not a megasimpo checkpoint" in err


def test_405b_plans_on_256_gpus_with_an_uneven_pipeline():
    # 126 layers divide by no power-of-two PP x VPP >= 4: before uneven stages nothing fit
    model = ModelConfig.from_hf(os.path.join(REPO, "examples", "configs", "llama3_405b.json"))
    p = planner.plan(model, 256)
    check_consistent(p, model, 256)
    counts = p.layout.stage_layers(model.num_layers)
    assert len(set(counts)) > 1 and max(counts[0], counts[-1]) <= max(counts[1:-1])
    assert any("an uneven split" in r for r in p.reasons)
    # every priced stage is priced with its own layer count: stage memory minus what only the
    # end stages hold is proportional to the stage's layers (weights, grads, optimizer)
    per_layer = {m.stage: (m.weights + m.grads + m.optimizer) for m in p.stages}
    stage1 = per_layer.pop(1) / counts[1]
    emb = memory_model.padded_vocab_size(model.vocab_size) * model.hidden_size / p.layout.tp
    ends = emb * (2 + 4 + 12 / p.layout.dp) / 1e9
    assert per_layer[0] - ends == pytest.approx(stage1 * counts[0], rel=1e-3)
    assert p.memory.total == max(m.total for m in p.stages)


def test_uneven_split_is_the_least_memory_one_and_overrides_fix_it():
    model = dataclasses.replace(LLAMA3_8B, num_layers=30)  # 30 over 4 stages: uneven
    p = planner.plan(model, 16, overrides={"tp": 4, "pp": 4, "recompute": False,
                                           "micro_batch_size": 1})
    counts = p.layout.stage_layers(30)
    peaks = {}
    for f, mid, last in split_rules.uneven_splits(30, 4, p.layout.vpp):
        lay = dict(tp=4, pp=4, vpp=p.layout.vpp, dp=1, micro_batch_size=1, num_microbatches=128,
                   first_stage_layers=f, last_stage_layers=last)
        peaks[(f, mid, last)] = memory_model.memory_breakdown(model, seq_length=4096, **lay).total
    assert p.memory.total == pytest.approx(min(peaks.values()), abs=0.01)
    assert counts[1] == 8 and counts[0] < counts[-1]  # 6 + 8 + 8 + 8 = 30: stage 0 runs deepest
    fixed = planner.plan(model, 16, overrides={"tp": 4, "pp": 4, "first_stage_layers": 8,
                                               "last_stage_layers": 6})
    assert fixed.layout.stage_layers(30) == (8, 8, 8, 6)
    assert any("fixed by override" in r for r in fixed.reasons)
    with pytest.raises(ValueError, match="do not split as 8 \\(first stage\\) \\+ 5"):
        planner.plan(model, 16, overrides={"tp": 4, "pp": 4, "first_stage_layers": 8,
                                           "last_stage_layers": 5})
