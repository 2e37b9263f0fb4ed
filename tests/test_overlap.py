"""Overlapped gradient reduce-scatter and parameter all-gather against the DP=1 run (fp32, gloo).

With ``overlap_grad_reduce`` Megatron DDP launches a bucket's reduce-scatter from the backward
hooks as soon as every parameter of the bucket has been marked ready; with
``overlap_param_gather`` the optimizer step leaves the all-gather to the next forward. Both run
here with tiny buckets (many per chunk) and the fused log-prob path, whose output-layer (or tied
embedding) gradient goes straight into ``main_grad``: if that weight were not marked ready after
its accumulation, its bucket would be reduced too early or never. Each layout must give the
same losses, grad norms and final weights as the DP=1 run without overlap (same fused path),
and the overlap must really have run (reductions launched from the backward hooks or by the
schedule, not all at the end).
"""

import os

import pytest
import yaml

from multirank import run_ranks
from test_parallel_training import TINY_TIED, _close, _load_full, _train

BUCKET_SIZE = 1000  # parameters per bucket: dozens of buckets for the tiny model (45k)
CHUNK = 16  # tokens per fused log-prob chunk (several per micro-batch)
OVERLAP = dict(overlap_grad_reduce=True, overlap_param_gather=True)


def _overlapped(rank, world, ckpt, data, out, layout_kw):
    """_train with tiny DDP buckets; also counts the bucket reductions launched during the
    backward pass (by the readiness hooks or the schedule's grad_sync_func) rather than by
    finalize_model_grads, which launches them all in the first step and without overlap."""
    from unittest import mock

    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup as Group

    from megasimpo import model

    start, finish = Group.start_grad_sync, Group.finish_grad_sync
    launches = {"early": 0, "finishing": False}

    def start_spy(self, *args, **kwargs):
        launches["early"] += not launches["finishing"]
        return start(self, *args, **kwargs)

    def finish_spy(self, *args, **kwargs):
        launches["finishing"] = True
        try:
            return finish(self, *args, **kwargs)
        finally:
            launches["finishing"] = False

    with mock.patch.object(model, "DDP_BUCKET_SIZE", BUCKET_SIZE), \
            mock.patch.object(Group, "start_grad_sync", start_spy), \
            mock.patch.object(Group, "finish_grad_sync", finish_spy):
        losses, norms = _train(rank, world, ckpt, data, out, "simpo", layout_kw, CHUNK)
    return losses, norms, launches["early"]


def _reference(inputs, root):
    """(ckpt, data, losses, grad norms, final weights) of the fused-path DP=1 run, no overlap."""
    ckpt, data, _ = inputs
    out = os.path.join(root, "dp1")
    losses, norms = run_ranks(_train, 1, ckpt, data, out, "simpo", {}, CHUNK)[0]
    return ckpt, data, losses, norms, run_ranks(_load_full, 1, os.path.join(out, "final_model"))[0]


@pytest.fixture(scope="module")
def untied(shared_inputs, tmp_path_factory):
    return _reference(shared_inputs(), str(tmp_path_factory.mktemp("untied")))


@pytest.fixture(scope="module")
def tied(shared_inputs, tmp_path_factory):
    return _reference(shared_inputs(model=TINY_TIED), str(tmp_path_factory.mktemp("tied")))


# PP=1 tied: the fused kernel's sparse marker meets the embedding's dense gradient in autograd;
# PP=2 tied: the last stage's copy gets its gradient from the fused kernel alone (1F1B schedule,
# grad_sync_func); PP=2/VPP=2: interleaved schedule, per-chunk sync functions, one bucket for
# the second chunk.
LAYOUTS = [("dp2", {}, "untied"), ("tied_dp2", {}, "tied"), ("tied_pp2", dict(pp=2), "tied"),
           ("pp2_vpp2", dict(pp=2, vpp=2), "untied")]


@pytest.mark.parametrize("name,layout,model", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_overlap_matches_dp1(name, layout, model, request, tmp_path):
    ckpt, data, ref_losses, ref_norms, ref_params = request.getfixturevalue(model)
    results = run_ranks(_overlapped, 2, ckpt, data, str(tmp_path), dict(layout, **OVERLAP))
    for losses, norms, early in results:
        assert _close(losses, ref_losses, 1e-5), (losses, ref_losses)
        assert _close(norms, ref_norms, 1e-5), (norms, ref_norms)
        # Reductions launched during backward: every step on a later pipeline stage (by the
        # schedule, one bucket), else from step 2 on, for each of the first chunk's buckets.
        assert early >= 3, early
    with open(os.path.join(tmp_path, "config.yaml")) as f:
        derived = yaml.safe_load(f)["derived"]
    assert derived["overlap_grad_reduce"] and derived["overlap_param_gather"]
    params = run_ranks(_load_full, 1, os.path.join(tmp_path, "final_model"))[0]
    assert params.keys() == ref_params.keys()
    for key, ref in ref_params.items():  # as tensors: see test_parallel_training
        rel = ((params[key].double() - ref.double()).norm() / ref.double().norm()).item()
        assert rel <= 1e-5, (key, rel)
    assert abs(ref_losses[-1] - ref_losses[0]) > 1e-3  # the weights really moved


def test_flags_parse_and_param_gather_needs_grad_reduce():
    import argparse

    from megasimpo.cli import _train_parser, train_config
    from megasimpo.config import TrainConfig

    parser = argparse.ArgumentParser()
    _train_parser(parser.add_subparsers(dest="command"))
    base = ["train", "--load", "m", "--data", "d", "--out", "o"]
    cfg = train_config(vars(parser.parse_args(base)))
    assert cfg.overlap_grad_reduce is None and cfg.overlap_param_gather is None  # by device
    cfg = train_config(vars(parser.parse_args(
        base + ["--overlap-grad-reduce", "--no-overlap-param-gather"])))
    assert cfg.overlap_grad_reduce is True and cfg.overlap_param_gather is False
    with pytest.raises(ValueError, match="--overlap-param-gather needs --overlap-grad-reduce"):
        TrainConfig(load="m", data=("d",), out="o", overlap_grad_reduce=False,
                    overlap_param_gather=True)
