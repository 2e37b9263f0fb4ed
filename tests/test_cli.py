"""The command line end to end: torchrun train at TP=2, fail-fast layouts, YAML config."""

import json
import os
import subprocess
import sys
import time

import pytest

from megasimpo.cli import train_config
from multirank import run_main

CONTRACT = ("step", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "rewards/accuracies", "logps/chosen", "logps/rejected", "lengths/chosen",
            "lengths/rejected", "lr", "grad_norm", "tokens_per_sec", "tflops_per_gpu", "mfu",
            "mem_peak_gb")


@pytest.fixture(scope="module")
def inputs(shared_inputs):
    return shared_inputs()


def _torchrun(args, nproc, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc}"]
    return subprocess.run(launcher + ["-m", "megasimpo"] + args, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_torchrun_train_tp2_writes_contract_metrics(inputs, tmp_path):
    # A real torchrun (a subprocess on purpose): the launcher, its environment and the console
    # entry are what this test is about.
    ckpt, train, held_out = inputs
    out = tmp_path / "run"
    p = _torchrun(["train", "--load", ckpt, "--data", train, "--eval-data", held_out, "--out",
                   str(out), "--tp", "2", "--steps", "3", "--global-batch-size", "8",
                   "--micro-batch-size", "2"], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for r in train_rows:
        assert set(CONTRACT) <= set(r), set(CONTRACT) - set(r)
        assert r["tokens_per_sec"] > 0 and r["lengths/chosen"] > 0
    assert "eval_loss" in rows[0] and rows[0]["step"] == 0 and "eval_loss" in rows[-1]
    # stdout/stderr are pipes, as in a log file: plain lines, no progress bar, the model named
    steps = [line for line in p.stdout.splitlines() if line.startswith("megasimpo train: step ")]
    assert [line.split()[3] for line in steps] == ["1/3", "2/3", "3/3"], p.stdout[-2000:]
    assert "eval_loss" in steps[-1] and "\r" not in p.stdout + p.stderr
    assert f"final model: {out / 'final_model'}" in p.stdout.splitlines()[-1]
    assert (out / "config.yaml").exists()
    assert (out / "final_model" / "megasimpo.json").exists()
    assert not (out / "final_model.partial").exists()
    # The run review reads this real run: report, data and plot.
    r = run_main("tools/review_run.py", [str(out)], timeout=120)
    assert r.returncode == 0, r.stderr
    assert "## Early vs late" in r.stdout
    for name in ("review.md", "review.json", "review.png"):
        assert (out / "review" / name).stat().st_size > 0


@pytest.mark.parametrize("flags,msg", [
    (["--tp", "2"], "world size 1 is not divisible by tp*pp*cp = 2*1*1 = 2"),
    (["--vpp", "2"], "needs at least 2 GPUs"),
    (["--pp", "3", "--tp", "1"], "world size 1 is not divisible"),
])
def test_bad_layout_fails_fast(inputs, tmp_path, flags, msg):
    ckpt, train, _ = inputs
    t0 = time.monotonic()
    p = run_main("megasimpo", ["train", "--load", ckpt, "--data", train, "--out",
                               str(tmp_path / "x")] + flags)
    assert p.returncode == 2
    assert msg in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "x").exists()  # nothing was built or written
    assert time.monotonic() - t0 < 60


def test_yaml_config_with_flag_override(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("load: m\ndata: [a, b]\nout: o\nloss: dpo\nbeta: 0.3\nsteps: 10\nlr: 1.0e-6\n")
    cfg = train_config({"config": str(cfg_file), "steps": 4, "gamma": None} | {})
    assert cfg.loss.name == "dpo" and cfg.loss.beta == 0.3
    assert cfg.steps == 4 and cfg.lr == 1e-6 and cfg.data == ("a", "b")
    cfg = train_config({"load": "m", "data": ["a"], "out": "o", "beta": 2.5, "gamma": 1.0})
    assert cfg.loss.gamma_beta_ratio == pytest.approx(0.4)
    with pytest.raises(ValueError, match="train needs --out"):
        train_config({"load": "m", "data": ["a"]})
    with pytest.raises(ValueError, match="unknown option"):
        train_config({"load": "m", "data": ["a"], "out": "o", "bogus": 1})


def test_every_config_field_is_a_flag():
    # The train flags are built from the dataclasses: a field added there is a flag at once.
    import argparse
    import dataclasses

    from megasimpo.config import LoraConfig, LossConfig, TrainConfig
    from megasimpo.train_flags import add_train_flags

    parser = argparse.ArgumentParser()
    add_train_flags(parser)
    flags = {a.dest for a in parser._actions}
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"loss", "lora"}
    fields |= {"loss" if f.name == "name" else f.name for f in dataclasses.fields(LossConfig)}
    fields |= {"lora_" + f.name for f in dataclasses.fields(LoraConfig)}
    assert fields <= flags
    args = vars(parser.parse_args(["--load", "m", "--data", "a", "b", "--out", "o", "--loss", "ipo",
                                   "--adam-beta2", "0.95", "--no-pack", "--force", "--lora-rank",
                                   "8", "--lora-targets", "linear_qkv", "linear_fc2"]))
    cfg = train_config(args)
    assert (cfg.loss.name, cfg.adam_beta2, cfg.pack, cfg.force) == ("ipo", 0.95, False, True)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets) == (8, 16.0, ("linear_qkv", "linear_fc2"))
    with pytest.raises(ValueError, match="--lora-targets linear_q: each must be one of linear_qkv"):
        train_config({**args, "lora_targets": ["linear_q"]})
    assert cfg.lr == TrainConfig.__dataclass_fields__["lr"].default  # no flag, no value
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision", "fp16"])  # choices come from the field


def test_config_file_loss_mapping_and_run_sections(tmp_path):
    # A run's config.yaml: options under run:, the loss as a mapping, the other sections ignored.
    path = tmp_path / "config.yaml"
    path.write_text("run:\n  load: m\n  data: [a]\n  out: o\n  loss: {name: rdpo, beta: 0.2, "
                    "rdpo_alpha: 0.01}\n  steps: 7\nmodel: {num_layers: 2}\nderived: {steps: 7}\n")
    cfg = train_config({"config": str(path), "out": "o2"})
    assert (cfg.loss.name, cfg.loss.beta, cfg.loss.rdpo_alpha) == ("rdpo", 0.2, 0.01)
    assert cfg.steps == 7 and cfg.out == "o2"
    path.write_text("load: m\ndata: a\nout: o\nloss: {name: dpo, beta: high}\n")
    with pytest.raises(ValueError, match="beta: expected a number, got 'high'"):
        train_config({"config": str(path)})
    path.write_text("load: m\ndata: a\nout: o\nloss: dpo\nloss_type: hinge\nlabel_smoothing: 0.1\n")
    with pytest.raises(ValueError, match="--label-smoothing 0.1 has no effect"):
        train_config({"config": str(path)})
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        train_config({"config": str(path)})


def test_config_file_errors_name_the_file_and_the_fix(tmp_path):
    path = tmp_path / "run.yaml"
    for body, message in [
            ("save_intervall: 3\n", "unknown option 'save_intervall' (did you mean "
                                    "'save_interval'?)"),
            ("learning_rate: 1.0e-6\n", "unknown option 'learning_rate' (did you mean 'lr'?)"),
            ("lr: null\n", "lr: null; expected a number (delete the line to use the default)"),
            ("keep_checkpoints: -1\n", "keep_checkpoints: -1 must be >= 0"),
            ("data: null\n", "data: null; expected a path or a list of paths (required)")]:
        path.write_text("load: m\ndata: d\nout: o\n" + body)
        with pytest.raises(ValueError) as e:
            train_config({"config": str(path)})
        assert str(e.value) == f"{path}: {message}"
    path.write_text("load: m\ndata: d\nout: o\ntp: null\nsteps: 3\n")  # Optional: the default
    assert train_config({"config": str(path)}).tp is None
    with pytest.raises(ValueError, match=r"unknown option\(s\): sed \(did you mean 'seed'\?\)"):
        train_config({"load": "m", "data": ["a"], "out": "o", "sed": 1})


def test_plan_prints_small_models_in_millions_and_export_of_a_run_points_to_its_model(
        tmp_path, capsys):
    from fixtures import write_tiny_hf_config

    from megasimpo import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--hf-config", write_tiny_hf_config(tmp_path / "config.json"),
                  "--gpus", "1", "--seq-length", "32"])
    assert e.value.code == 0
    assert " M parameters" in capsys.readouterr().out
    run = tmp_path / "run"
    (run / "final_model").mkdir(parents=True)
    p = run_main("tools/convert_hf.py", ["export", "--load", str(run), "--out",
                                         str(tmp_path / "hf")])
    assert p.returncode == 2
    assert f"{run} is a run directory; its trained model is {run / 'final_model'}" in p.stderr
