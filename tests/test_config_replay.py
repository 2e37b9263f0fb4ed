"""RUN_DIR/config.yaml is a valid --config: replaying it (whole, or its run: section alone)
trains the same run again."""

import json
import os

import yaml

from multirank import run_main


def _train(*args):
    p = run_main("megasimpo", ["train", *args], timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


def _losses(run):
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    return [(r["step"], r["loss"], r["rewards/margins"]) for r in rows if "loss" in r]


def test_config_yaml_replays_the_run(shared_inputs, tmp_path):
    ckpt, data, _ = shared_inputs()
    first = str(tmp_path / "first")
    # Options away from their defaults, loss options among them (config.yaml nests them).
    _train("--load", ckpt, "--data", data, "--out", first, "--loss", "dpo", "--beta", "0.3",
           "--label-smoothing", "0.1", "--steps", "3", "--global-batch-size", "8",
           "--micro-batch-size", "2", "--lr", "1e-2", "--warmup-ratio", "0", "--seed", "5",
           "--no-pack")
    written = yaml.safe_load(open(os.path.join(first, "config.yaml")))
    assert written["run"]["loss"]["name"] == "dpo" and "force" not in written["run"]

    whole = str(tmp_path / "whole")
    _train("--config", os.path.join(first, "config.yaml"), "--out", whole)
    section = tmp_path / "section.yaml"  # the run: section on its own is a config file too
    section.write_text(yaml.safe_dump(written["run"]))
    alone = str(tmp_path / "alone")
    _train("--config", str(section), "--out", alone)

    assert len(_losses(first)) == 3
    assert _losses(whole) == _losses(first)
    assert _losses(alone) == _losses(first)
    replayed = yaml.safe_load(open(os.path.join(whole, "config.yaml")))
    assert replayed["run"] == {**written["run"], "out": os.path.realpath(whole)}
    assert replayed["derived"] == written["derived"]
