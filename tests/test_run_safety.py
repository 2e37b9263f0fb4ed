"""Nothing lost, nothing silent, end to end: finished runs, resumes under another configuration,
unwritable outputs, a full disk at the final save, damaged checkpoints, batch arithmetic."""

import json
import os
import shutil

import pytest

from fixtures import TINY
from multirank import run_main, run_ranks


@pytest.fixture(scope="module")
def inputs(shared_inputs):
    return shared_inputs()


def _train(ckpt, data, out, *flags):
    return run_main("megasimpo", ["train", "--load", ckpt, "--data", data, "--out", str(out),
                                  "--global-batch-size", "8", "--micro-batch-size", "4",
                                  "--precision", "fp32", *flags], timeout=300)


def _steps(out):
    return [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]


def test_finished_run_is_kept_unless_forced(inputs, tmp_path):
    ckpt, data, _ = inputs
    out = tmp_path / "run"
    p = _train(ckpt, data, out, "--steps", "2")
    assert p.returncode == 0, p.stderr[-2000:]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 2
    assert not (out / ".megasimpo.lock").exists()
    weights = sorted(os.listdir(out / "final_model"))
    again = _train(ckpt, data, out, "--steps", "2")
    assert again.returncode == 2 and "is a finished run at step 2" in again.stderr, again.stderr
    own = _train(str(out / "final_model"), data, out, "--steps", "2")
    assert own.returncode == 2 and "must neither be nor contain --load" in own.stderr
    assert sorted(os.listdir(out / "final_model")) == weights  # the input model is untouched
    forced = _train(ckpt, data, out, "--steps", "2", "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert _steps(out) == [1, 2]  # redone, not appended


def test_resume_under_another_configuration_is_refused(inputs, tmp_path):
    ckpt, data, _ = inputs
    out = tmp_path / "run"
    p = _train(ckpt, data, out, "--steps", "3", "--exit-interval", "1", "--lr", "1e-3")
    assert p.returncode == 0 and "stopping after step 1" in p.stdout, p.stderr[-2000:]
    assert json.loads((out / "status.json").read_text())["state"] == "stopped"
    other = _train(ckpt, data, out, "--steps", "3", "--lr", "2e-3")
    assert other.returncode == 2, other.stderr[-2000:]
    assert "lr: 0.001 -> 0.002" in other.stderr and "--resume-anyway" in other.stderr
    safe = _train(ckpt, data, out, "--steps", "4", "--exit-interval", "2", "--lr", "1e-3",
                  "--log-interval", "2")
    assert safe.returncode == 0, safe.stderr[-2000:]
    assert "resuming with changed" in safe.stdout and "steps: 3 -> 4" in safe.stdout
    assert "after step 1" in safe.stdout
    anyway = _train(ckpt, data, out, "--steps", "4", "--lr", "2e-3", "--resume-anyway")
    assert anyway.returncode == 0, anyway.stderr[-2000:]
    assert "--resume-anyway: resuming with changed lr" in anyway.stdout


def test_unwritable_out_is_one_line(inputs, tmp_path):
    ckpt, data, _ = inputs
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    p = _train(ckpt, data, blocker / "run", "--steps", "1")
    assert p.returncode == 2 and "cannot write there" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def _full_disk_at_final_save(rank, world, ckpt, data, out):
    from unittest import mock

    from megatron.core import dist_checkpointing

    from megasimpo.config import TrainConfig
    from megasimpo.trainer import Trainer

    real = dist_checkpointing.save

    def full(state, path, *a, **k):
        if "final_model" in path:  # what torch's zip writer says when a write comes up short
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 32")
        return real(state, path, *a, **k)

    cfg = TrainConfig(load=ckpt, data=(data,), out=out, steps=1, global_batch_size=8,
                      micro_batch_size=4, precision="fp32", force=True)
    with mock.patch.object(dist_checkpointing, "save", full):
        trainer = Trainer(cfg)
        try:
            trainer.run()
        except ValueError as e:
            return str(e)
        finally:
            trainer.close()
    return "no error"


def test_full_disk_at_the_final_save_keeps_the_old_model(inputs, tmp_path):
    ckpt, data, _ = inputs
    out = tmp_path / "run"
    old = out / "final_model"
    shutil.copytree(ckpt, old)  # a previous final model that --force would replace
    message = run_ranks(_full_disk_at_final_save, 1, ckpt, data, str(out))[0]
    assert "no space left on the device" in message and "nothing was replaced" in message
    assert sorted(os.listdir(old)) == sorted(os.listdir(ckpt))
    assert not (out / "final_model.partial").exists() and not (out / "final_model.old").exists()
    assert json.loads((out / "status.json").read_text())["state"] == "failed"


def _load_all(rank, world, paths):
    from megasimpo import checkpoint
    from megasimpo.config import Layout
    from megasimpo.model import Precision, build_chunks
    from megasimpo.parallel import groups

    groups.initialize(Layout.resolve(TINY, 1), 0)
    results = []
    for path in paths:
        model = checkpoint.model_config(path)
        chunks = build_chunks(model, Layout.resolve(model, 1), Precision(name="fp32"))
        try:
            checkpoint.load_model(chunks, path)
            results.append("loaded")
        except ValueError as e:
            results.append(str(e))
    return results


def test_damaged_checkpoints_are_named(inputs, tmp_path):
    ckpt, _, _ = inputs
    cases = {}
    for case in ("missing", "truncated", "shape"):
        d = tmp_path / case
        shutil.copytree(ckpt, d)
        shard = sorted(d.glob("*.distcp"))[-1]
        if case == "missing":
            shard.unlink()
        elif case == "truncated":
            with open(shard, "r+b") as f:
                f.truncate(100)
        else:
            meta = json.loads((d / "megasimpo.json").read_text())
            meta["model"]["ffn_hidden_size"] = TINY.ffn_hidden_size + 32
            (d / "megasimpo.json").write_text(json.dumps(meta))
        cases[case] = (str(shard), str(d))
    results = run_ranks(_load_all, 1, [c[1] for c in cases.values()])[0]
    missing, truncated, shape = results
    assert missing.startswith(cases["missing"][0]) and "shard file missing" in missing
    assert truncated.startswith(cases["truncated"][0]) and "100 bytes" in truncated
    assert "other shapes than the model" in shape and "linear_fc1" in shape


def test_batch_that_does_not_split_is_explained():
    from megasimpo import planner

    with pytest.raises(ValueError, match="--global-batch-size 10 is not a multiple of "
                                         "--micro-batch-size 4"):
        planner.plan(TINY, 2, gpu_mem_gb=10, seq_length=64, global_batch_size=10,
                     overrides=dict(micro_batch_size=4))
    with pytest.raises(ValueError, match="DP x micro-batch dividing the global batch of 6 pairs"):
        planner.plan(TINY, 4, gpu_mem_gb=10, seq_length=64, global_batch_size=6,
                     overrides=dict(micro_batch_size=2, tp=1, pp=1))


def test_token_ids_outside_the_vocabulary_are_refused(inputs, tmp_path):
    from megasimpo.data.indexed import write_pairs

    ckpt, _, _ = inputs
    # Ids 64..70: above TINY's 64-token vocabulary, inside its padded embedding rows.
    prefix = str(tmp_path / "wide")
    pairs = [([1, 2, 3], [4, 5, 64 + i % 7], [6, 7]) for i in range(16)]
    write_pairs(prefix, pairs, vocab_size=128)
    p = _train(ckpt, prefix, tmp_path / "run", "--steps", "1")
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"{prefix}: token id 70 >= the model's vocabulary size 64 ({ckpt})" in p.stderr
    assert not (tmp_path / "run").exists()  # a start that fails its checks leaves nothing
    s = run_main("megasimpo", ["score", "--load", ckpt, "--data", prefix, "--out",
                               str(tmp_path / "s.jsonl")], timeout=300)
    assert s.returncode == 2 and "token id 70 >= the model's vocabulary size 64" in s.stderr


def _overlapping_shards(rank, world, path):
    import torch
    from megatron.core.dist_checkpointing import ShardedTensor

    from megasimpo import checkpoint

    # Both ranks claim to be the main replica of the same whole tensor: a sharding bug.
    state = {"w": ShardedTensor.from_rank_offsets("w", torch.ones(2, 3), replica_id=(0, 0, 0))}
    try:
        checkpoint.atomic_save(path, state, meta={})
    except ValueError as e:
        return str(e)
    return "no error"


def test_shards_that_do_not_fit_fail_on_every_rank_instead_of_hanging(tmp_path):
    # Megatron raises this on rank 0 only; the others would wait in the next collective.
    path = str(tmp_path / "ckpt")
    messages = run_ranks(_overlapping_shards, 2, path, timeout=120)
    for m in messages:
        assert "shards do not fit together" in m and "nothing was replaced" in m, m
    assert not os.path.exists(path) and not os.path.exists(path + ".partial")
