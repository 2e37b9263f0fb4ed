"""bench/bench_trl.py: TRL sees exactly the synthetic token ids, and a CPU run writes its row into
the shared results file without touching the other rows."""

import json
import math
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "bench", "bench_trl.py")
sys.path.insert(0, os.path.join(REPO, "bench"))

import bench_trl  # noqa: E402
import synthetic  # noqa: E402
from multirank import run_main  # noqa: E402

CPU = {"CUDA_VISIBLE_DEVICES": ""}  # CPU defaults even on a GPU machine

EOS = bench_trl.SPECIALS.index("<eos>")


def test_trl_tokenizes_the_synthetic_ids_exactly(tmp_path):
    args = bench_trl.parse_args(["--shape", "tiny", "--seq-length", "24", "--global-batch-size",
                                 "2", "--steps", "1", "--warmup", "1", "--param-dtype", "fp32"])
    model_cfg = synthetic.shape("tiny")
    pairs = list(synthetic.random_pairs(4, 24, model_cfg.vocab_size, seed=3))
    info = {}
    trainer = bench_trl.build_trainer(args, model_cfg, pairs, str(tmp_path), info)
    rows = trainer.train_dataset.to_dict()
    assert len(rows["prompt_input_ids"]) == len(pairs)
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        assert len(prompt) + len(chosen) == 25  # the row is full: seq_length + 1 ids
        assert rows["prompt_input_ids"][i] == prompt  # no BOS in front
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            # the response verbatim, then the one EOS TRL always appends; nothing truncated
            assert rows[f"{side}_input_ids"][i] == prompt + response + [EOS]
            assert rows[f"{side}_labels"][i] == [-100] * len(prompt) + response + [EOS]
    assert info["tokens_per_sequence"] == 26 and info["max_length"] == 26
    assert trainer.processing_class.bos_token_id is None
    # the script's own guard refuses rows that are not the pairs' ids
    other = list(synthetic.random_pairs(4, 24, model_cfg.vocab_size, seed=4))
    with pytest.raises(RuntimeError, match="differ from the synthetic ids"):
        bench_trl.check_tokenized(trainer.train_dataset, other, EOS)


def test_cpu_run_merges_its_row(tmp_path):
    out = tmp_path / "x.json"
    out.write_text(json.dumps({"simpo": {"x": 1}, "runs": {"tiny": {"simpo": {"y": 2}}}}))
    p = run_main(SCRIPT, ["--shape", "tiny", "--steps", "1", "--warmup", "1", "--out", str(out)],
                 timeout=600, env=CPU)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "| trl_simpo |" in p.stdout
    data = json.loads(out.read_text())
    assert data["simpo"] == {"x": 1} and data["runs"]["tiny"]["simpo"] == {"y": 2}
    row = data["trl_simpo"]
    assert row == data["runs"]["tiny"]["trl_simpo"]  # CPU default shape, no tag: the primary row
    assert row["error"] is None and row["loss_finite"]
    for key in ("tokens_per_sec", "mem_peak_gb", "step_time_s", "tflops_per_gpu"):
        assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, key
    assert row["mfu"] is None and row["mem_reserved_peak_gb"] is None
    assert len(row["step_times_s"]) == 1
    # our accounting: 2 pairs x 2 sequences x 64 positions per step; TRL fed 64 + 2 per sequence
    assert row["tokens_per_sec"] == pytest.approx(2 * 2 * 64 / row["step_time_s"])
    assert row["input_tokens_per_step"] == 2 * 2 * 66
    cfg = data["runs"]["tiny"]["trl_config"]
    assert cfg["trl"] == bench_trl.TRL_VERSION and cfg["loss_type"] == "simpo"
    assert cfg["cpo_alpha"] == 0.0 and cfg["beta"] == 2.0 and cfg["simpo_gamma"] == 1.0
    assert row["gradient_checkpointing"] is False  # TRL's configs default it to True
    assert cfg["attn_implementation"] == "sdpa" and cfg["gradient_checkpointing"] is False
    assert cfg["bf16_autocast"] is False and cfg["tokens_per_sequence"] == 66


def test_tagged_checkpointed_run_replaces_only_its_own_row(tmp_path):
    out = tmp_path / "x.json"
    primary = {"tokens_per_sec": 1.0, "error": None}
    stale = {"error": "CUDA out of memory (an older run)", "tokens_per_sec": None}
    out.write_text(json.dumps({"trl_simpo": primary, "runs": {"tiny-gc": {"trl_simpo": stale}}}))
    p = run_main(SCRIPT, ["--shape", "tiny", "--steps", "1", "--warmup", "1", "--seq-length", "32",
                          "--gradient-checkpointing", "--tag", "gc", "--out", str(out)], timeout=600,
                 env=CPU)
    assert p.returncode == 0, p.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["trl_simpo"] == primary  # a tagged run never replaces the primary row
    row = data["runs"]["tiny-gc"]["trl_simpo"]
    assert row["error"] is None and row["tokens_per_sec"] > 0  # the old error is gone
    assert row["gradient_checkpointing"] is True  # as the model ran
    assert data["runs"]["tiny-gc"]["trl_config"]["gradient_checkpointing"] is True
    assert row["input_tokens_per_step"] == 2 * 2 * 34


def test_oom_is_recorded_as_the_rows_error(tmp_path, monkeypatch, capsys):
    out = tmp_path / "x.json"

    def oom(args, model_cfg, workdir, info):
        info["attn_implementation"] = "sdpa"
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.91 GiB.")

    monkeypatch.setattr(bench_trl, "measure", oom)
    bench_trl.main(["--shape", "tiny", "--out", str(out)])  # returns: an OOM is a result
    data = json.loads(out.read_text())
    row = data["runs"]["tiny"]["trl_simpo"]
    assert row["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert row["tokens_per_sec"] is None and row["mem_peak_gb"] is None
    assert set(row) == set(bench_trl.ROW_KEYS)
    assert data["runs"]["tiny"]["trl_config"]["attn_implementation"] == "sdpa"
    assert "CUDA out of memory" in capsys.readouterr().out  # the table shows the error

    def bug(args, model_cfg, workdir, info):
        raise KeyError("not an OOM")

    monkeypatch.setattr(bench_trl, "measure", bug)
    with pytest.raises(SystemExit) as e:  # any other failure is recorded, then exits non-zero
        bench_trl.main(["--shape", "tiny", "--out", str(out)])
    assert e.value.code == 1
    assert "KeyError" in json.loads(out.read_text())["runs"]["tiny"]["trl_simpo"]["error"]
