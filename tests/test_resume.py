"""Checkpoints and resume: bit-exact restarts, other layouts, interrupted saves, SIGTERM, and
skipped non-finite steps."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from multirank import run_main, run_ranks


@pytest.fixture(scope="module")
def inputs(shared_inputs):
    return shared_inputs()


def _cmd(ckpt, data, out, *flags):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "megasimpo", "train", "--load", ckpt, "--data", data, "--out", str(out),
            "--steps", "6", "--global-batch-size", "8", "--micro-batch-size", "2", "--lr", "1e-2",
            "--seed", "3", *flags]


def _train(cmd):
    """``cmd`` (a torchrun of ``_cmd``) in fresh processes: used where a run must really end and
    a new one start (a resume that may use nothing but what is on disk, signals)."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def _train_in_ranks(cmd):
    """The same train command in the session's two long-lived ranks (no process boundary)."""
    argv = cmd[cmd.index("megasimpo") + 1:]
    p = run_main("megasimpo", argv, world_size=2, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def _losses(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _final_params(rank, world, path):
    from megasimpo import checkpoint
    from megasimpo.config import Layout
    from megasimpo.model import Precision, build_chunks
    from megasimpo.parallel import groups

    model = checkpoint.model_config(path)
    groups.initialize(Layout.resolve(model, 1), 0)
    chunks = build_chunks(model, Layout.resolve(model, 1), Precision(name="fp32"))
    checkpoint.load_model(chunks, path)
    return {k: v.clone() for k, v in chunks[0].state_dict().items() if "extra_state" not in k}


def test_exit_and_resume_is_bit_exact(inputs, tmp_path):
    # Real torchrun processes: the resumed run has nothing but the checkpoint on disk.
    ckpt, data, _ = inputs
    _train(_cmd(ckpt, data, tmp_path / "straight"))
    resumed = tmp_path / "resumed"
    cmd = _cmd(ckpt, data, resumed, "--exit-interval", "3", "--save-interval", "1",
               "--keep-checkpoints", "2")
    out1 = _train(cmd)
    assert "stopping after step 3" in out1
    assert sorted(os.listdir(resumed / "checkpoints")) == ["latest", "step_0000002", "step_0000003"]
    assert not (resumed / "final_model").exists()
    out2 = _train(cmd)  # the same command, unchanged
    assert "resuming from" in out2 and "after step 3" in out2
    straight, again = _losses(tmp_path / "straight"), _losses(resumed)
    assert sorted(again) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert again[step] == straight[step], (step, again[step], straight[step])
    a = run_ranks(_final_params, 1, str(tmp_path / "straight" / "final_model"))[0]
    b = run_ranks(_final_params, 1, str(resumed / "final_model"))[0]
    assert all((a[k] == b[k]).all() for k in a)


def test_resume_at_another_layout(inputs, tmp_path):
    # The layout change is the point here; a resume across real process restarts is
    # test_exit_and_resume_is_bit_exact's.
    ckpt, data, _ = inputs
    _train_in_ranks(_cmd(ckpt, data, tmp_path / "straight"))
    out = tmp_path / "relayout"
    _train_in_ranks(_cmd(ckpt, data, out, "--exit-interval", "3"))  # DP=2
    # LoRA turned on over this full-model run: what differs is said, not "corrupted" (#25 item 10)
    lora = _cmd(ckpt, data, out, "--lora-rank", "4", "--resume-anyway")
    p = run_main("megasimpo", lora[lora.index("megasimpo") + 1:], world_size=2, timeout=300)
    step3 = out / "checkpoints" / "step_0000003"
    assert p.returncode != 0
    assert (f"LoRA on a run saved without LoRA: {step3} holds the full model's weights" in p.stderr
            and f"--load {step3} --out NEW_DIR" in p.stderr), p.stderr[-3000:]
    assert "corrupted" not in p.stderr
    _train_in_ranks(_cmd(ckpt, data, out, "--tp", "2"))  # resumes at TP=2, DP=1
    straight, again = _losses(tmp_path / "straight"), _losses(out)
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(straight[step], rel=1e-5)


def _interrupted(rank, world, ckpt, data, out):
    from unittest import mock

    from megatron.core import dist_checkpointing

    from megasimpo.config import TrainConfig
    from megasimpo.trainer import Trainer

    real_save, calls = dist_checkpointing.save, []

    def failing_save(state, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint dies midway
            raise OSError("disk full (injected)")
        return real_save(state, path, *a, **k)

    cfg = TrainConfig(load=ckpt, data=(data,), out=out, steps=4, global_batch_size=8,
                      micro_batch_size=2, save_interval=1, precision="fp32")
    try:
        with mock.patch.object(dist_checkpointing, "save", failing_save):
            Trainer(cfg).run()
    except ValueError as e:  # every rank: one line, the unfinished .partial removed
        return str(e)
    return "no error"


def test_interrupted_save_keeps_previous_latest(inputs, tmp_path):
    ckpt, data, _ = inputs
    out = str(tmp_path / "run")
    message = run_ranks(_interrupted, 1, ckpt, data, out)[0]
    assert "step_0000002 failed, so nothing was replaced" in message
    assert "disk full (injected)" in message
    ckdir = os.path.join(out, "checkpoints")
    assert open(os.path.join(ckdir, "latest")).read().strip() == "step_0000001"
    assert not os.path.exists(os.path.join(ckdir, "step_0000002"))
    # The same run started again resumes from the intact checkpoint.
    p = run_main("megasimpo", ["train", "--load", ckpt, "--data", data, "--out", out, "--steps",
                               "4", "--global-batch-size", "8", "--micro-batch-size", "2",
                               "--precision", "fp32"], timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "after step 1" in p.stdout
    assert not os.path.exists(os.path.join(ckdir, "step_0000002.partial"))


def test_sigterm_checkpoints_and_exits_cleanly(inputs, tmp_path):
    # Real torchrun processes: the signal goes to them as SLURM sends it.
    import psutil

    ckpt, data, _ = inputs
    out = tmp_path / "run"
    cmd = _cmd(ckpt, data, out)
    cmd[cmd.index("--steps") + 1] = "100000"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    workers = psutil.Process(proc.pid).children(recursive=True)
    for w in workers:  # SLURM signals every task of the job step
        w.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopping after step" in stdout
    latest = (out / "checkpoints" / "latest").read_text().strip()
    done = int(latest.split("_")[1])
    assert done >= 2 and (out / "checkpoints" / latest / "megasimpo.json").exists()
    # Complete and resumable: the same command resumes there (and stops one step later).
    cmd += ["--exit-interval", str(done + 1)]
    again = _train(cmd)
    assert f"after step {done}" in again and f"stopping after step {done + 1}" in again


def _nonfinite(rank, world, ckpt, data, out, bad_steps, max_skipped):
    from unittest import mock

    import torch

    from megasimpo import step as step_mod
    from megasimpo.config import TrainConfig
    from megasimpo.trainer import Trainer

    calls = {"n": 0}
    real = step_mod.PairStep.loss_func

    def poisoned(self, batch, output, **kw):  # micro-batches of bad steps get a NaN loss
        loss, n, stats = real(self, batch, output, **kw)
        step = calls["n"] // 4 + 1  # 4 micro-batches per step here
        calls["n"] += 1
        if step in bad_steps:
            loss = loss * float("nan")
            stats = {"stats": stats["stats"].clone().index_fill_(0, torch.tensor([0]), float("nan"))}
        return loss, n, stats

    cfg = TrainConfig(load=ckpt, data=(data,), out=out, steps=4, global_batch_size=8,
                      micro_batch_size=2, precision="fp32", lr=1e-2, warmup_ratio=0.0,
                      max_skipped_steps=max_skipped)
    trainer = Trainer(cfg)
    snapshots = []
    orig_train_step = trainer.train_step

    def train_step(step):
        row = orig_train_step(step)
        snapshots.append([p.detach().clone() for m in trainer.model for p in m.parameters()])
        return row

    trainer.train_step = train_step
    try:
        with mock.patch.object(step_mod.PairStep, "loss_func", poisoned):
            rows = trainer.run()
    except RuntimeError as e:
        return str(e), None, None
    same = [all(torch.equal(a, b) for a, b in zip(snapshots[i], snapshots[i + 1]))
            for i in range(len(snapshots) - 1)]
    return [r["skipped"] for r in rows], [r["lr"] for r in rows], same


def test_nonfinite_step_is_skipped_and_run_continues(inputs, tmp_path):
    ckpt, data, _ = inputs
    skipped, lrs, unchanged = run_ranks(_nonfinite, 1, ckpt, data, str(tmp_path / "a"), {2}, 3)[0]
    assert skipped == [0, 1, 0, 0]
    assert unchanged == [True, False, False]  # step 2 changed nothing; steps 3, 4 trained
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert rows[1]["skipped"] == 1 and rows[1]["loss"] != rows[1]["loss"]  # logged as NaN
    msg = run_ranks(_nonfinite, 1, ckpt, data, str(tmp_path / "b"), {1, 2, 3, 4}, 2)[0][0]
    assert "2 consecutive steps (up to step 2) had a non-finite loss or gradient" in msg


def test_lora_differences_on_resume_are_named(tmp_path):
    # Pure: what lora_checkpoint.check_resume says for each way LoRA can differ (#25 item 10);
    # LoRA turned on over a full-model run is test_resume_at_another_layout's.
    from megasimpo.config import LoraConfig
    from megasimpo.lora_checkpoint import check_resume

    step, final = str(tmp_path / "checkpoints" / "step_0000003"), str(tmp_path / "final_model")
    saved = {"lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["linear_qkv"]}}
    check_resume({}, None, step, final)
    check_resume(saved, LoraConfig(rank=4, alpha=8.0, targets=("linear_qkv",)), step, final)
    check_resume(saved, LoraConfig(rank=4, alpha=16.0, targets=("linear_qkv",)), step, final)
    os.makedirs(final)
    with pytest.raises(ValueError, match=r"^LoRA on a run saved without LoRA: .* its final_model "
                                         rf"\(--load {final} --out NEW_DIR"):
        check_resume({}, LoraConfig(rank=4, targets=("linear_qkv",)), step, final)
    with pytest.raises(ValueError, match=r"^LoRA off on a run saved with LoRA: .*resume it with "
                                         r"--lora-rank 4 --lora-alpha 8 --lora-targets linear_qkv"):
        check_resume(saved, None, step, final)
    with pytest.raises(ValueError, match=r"adapters of --lora-rank 4 .*this run has --lora-rank 8"):
        check_resume(saved, LoraConfig(rank=8, targets=("linear_qkv",)), step, final)
