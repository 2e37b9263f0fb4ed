"""The Llama-3-70B launchers: DRY_RUN prints the plan and the torchrun command; SLURM or manual
node variables end up in that command; a real launch execs torchrun with the NCCL/CUDA settings.
The launchers are bash scripts, so they run as subprocesses."""

import os
import re
import shlex
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIMPO = os.path.join(REPO, "examples", "simpo_llama70b.sh")
DPO = os.path.join(REPO, "examples", "dpo_llama70b.sh")
NODE_VARS = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "CKPT", "DATA",
             "EVAL_DATA", "OUT", "LOSS", "REF", "DRY_RUN", "TORCHRUN", "EXTRA_ARGS", "SEQ_LENGTH",
             "LORA_RANK")


def _path_without_scontrol() -> str:
    dirs = os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
    return os.pathsep.join(d for d in dirs if not os.path.exists(os.path.join(d, "scontrol")))


def _launch(script, tmp_path, **env_vars):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in NODE_VARS}
    env["PYTHON"] = sys.executable
    # importable from a checkout too (after any PYTHONPATH the caller set)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), REPO]))
    env["PATH"] = _path_without_scontrol()
    env["CKPT"] = str(tmp_path / "no_such_checkpoint")
    env.update(env_vars)
    return subprocess.run(["bash", script], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=120)


def _command(stdout: str) -> list:
    lines = [line for line in stdout.splitlines() if line.startswith("torchrun ")]
    assert len(lines) == 1, stdout
    return shlex.split(lines[0])


def _flag(cmd: list, name: str) -> str:
    return cmd[cmd.index(name) + 1]


@pytest.mark.parametrize("script,loss", [(SIMPO, "simpo"), (DPO, "dpo")])
def test_dry_run_prints_plan_and_command(tmp_path, script, loss):
    p = _launch(script, tmp_path, DRY_RUN="1")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    # the plan: computed from the bundled Llama-3-70B config for 8 nodes x 8 GPUs
    assert "configs/llama3_70b.json" in out and "--gpus 64" in out
    assert re.search(r"layout  TP=8 +PP=\d+", out) and "total" in out
    assert f"loss {loss}" in out
    cmd = _command(out)
    assert " ".join(cmd[cmd.index("-m"):cmd.index("-m") + 3]) == "-m megasimpo train"
    assert _flag(cmd, "--nnodes") == "8" and _flag(cmd, "--nproc-per-node") == "8"
    assert _flag(cmd, "--node-rank") == "0"
    assert _flag(cmd, "--loss") == loss
    assert _flag(cmd, "--load") == str(tmp_path / "no_such_checkpoint")
    for flag in ("--data", "--out", "--seq-length", "--eval-data"):
        assert flag in cmd
    assert ("--ref" in cmd) == (loss == "dpo")
    if loss == "dpo":
        assert _flag(cmd, "--ref") == "live" and "live reference" in out


def test_dry_run_reads_slurm_variables_without_scontrol(tmp_path):
    p = _launch(SIMPO, tmp_path, DRY_RUN="1", SLURM_NNODES="4", SLURM_NODEID="3",
                SLURM_JOB_NODELIST="gpu-a17,gpu-a18,gpu-b01,gpu-b02", GPUS_PER_NODE="8")
    assert p.returncode == 0, p.stderr
    cmd = _command(p.stdout)
    assert (_flag(cmd, "--nnodes"), _flag(cmd, "--node-rank"), _flag(cmd, "--master-addr")) == \
        ("4", "3", "gpu-a17")
    assert "--gpus 32" in p.stdout and "world   32 GPUs" in p.stdout


@pytest.mark.parametrize("nodelist,master", [("node[03-10,12]", "node03"), ("solo", "solo")])
def test_compressed_slurm_nodelist(tmp_path, nodelist, master):
    p = _launch(SIMPO, tmp_path, DRY_RUN="1", SLURM_NNODES="8", SLURM_NODEID="1",
                SLURM_JOB_NODELIST=nodelist)
    assert p.returncode == 0, p.stderr
    assert _flag(_command(p.stdout), "--master-addr") == master


def test_scontrol_and_explicit_variables_win(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "scontrol"
    fake.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf 'hostx\\nhosty\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    path = f"{bin_dir}{os.pathsep}{_path_without_scontrol()}"
    p = _launch(SIMPO, tmp_path, DRY_RUN="1", SLURM_NNODES="4", SLURM_NODEID="1",
                SLURM_JOB_NODELIST="host[x-y]", PATH=path)
    assert p.returncode == 0, p.stderr
    assert _flag(_command(p.stdout), "--master-addr") == "hostx"
    p = _launch(SIMPO, tmp_path, DRY_RUN="1", SLURM_NNODES="2", SLURM_NODEID="1",
                SLURM_JOB_NODELIST="host[x-y]", PATH=path, NNODES="4", NODE_RANK="2",
                MASTER_ADDR="10.0.0.5", MASTER_PORT="6000")
    assert p.returncode == 0, p.stderr
    cmd = _command(p.stdout)
    assert [_flag(cmd, f) for f in ("--nnodes", "--node-rank", "--master-addr", "--master-port")] \
        == ["4", "2", "10.0.0.5", "6000"]


def test_dry_run_plans_an_existing_checkpoint(tmp_path):
    import json

    from megasimpo.checkpoint_meta import FORMAT
    from megasimpo.run_paths import META_FILE
    from megasimpo.config import ModelConfig

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    model = ModelConfig.from_hf(os.path.join(REPO, "examples", "configs", "llama3_70b.json"))
    (ckpt / META_FILE).write_text(json.dumps({"format": FORMAT, "model": model.to_dict()}))
    p = _launch(SIMPO, tmp_path, DRY_RUN="1", CKPT=str(ckpt))
    assert p.returncode == 0, p.stderr
    assert f"--load {ckpt}" in p.stdout and "bundled" not in p.stdout


def test_impossible_plan_fails_the_dry_run(tmp_path):
    p = _launch(SIMPO, tmp_path, DRY_RUN="1", NNODES="1")
    assert p.returncode == 2
    assert "megasimpo plan: error:" in p.stderr and "needs at least" in p.stderr
    assert _command(p.stdout)  # the command is still shown


@pytest.mark.parametrize("script", [SIMPO, DPO])
def test_lora_plans_and_trains_on_one_node(tmp_path, script):
    """LORA_RANK reaches the plan and the command: 70B LoRA r=16 fits one node of 8 x 80 GB
    (without it the same dry run fails, test above)."""
    p = _launch(script, tmp_path, DRY_RUN="1", NNODES="1", LORA_RANK="16")
    assert p.returncode == 0, p.stderr
    assert "--gpus 8" in p.stdout and "--lora-rank 16" in p.stdout.split("# DRY_RUN")[0]
    assert "175,636,480 trainable" in p.stdout
    assert _flag(_command(p.stdout), "--lora-rank") == "16"


def test_real_launch_execs_torchrun_with_the_environment(tmp_path):
    fake = tmp_path / "torchrun"
    fake.write_text("#!/bin/sh\necho \"CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS "
                    "TORCH_NCCL_ASYNC_ERROR_HANDLING=$TORCH_NCCL_ASYNC_ERROR_HANDLING "
                    "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE\"\necho torchrun \"$@\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    p = _launch(SIMPO, tmp_path, TORCHRUN=str(fake), NNODES="1", EXTRA_ARGS="--tp 8 --steps 5")
    assert p.returncode == 0, p.stderr
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_NVLS_ENABLE=0" \
        in p.stdout
    cmd = _command(p.stdout)
    assert cmd[-4:] == ["--tp", "8", "--steps", "5"] and _flag(cmd, "--nnodes") == "1"


def test_multi_node_launch_needs_a_master(tmp_path):
    p = _launch(SIMPO, tmp_path, TORCHRUN="false", NNODES="2")
    assert p.returncode == 2 and "MASTER_ADDR" in p.stderr
