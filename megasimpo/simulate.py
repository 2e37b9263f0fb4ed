"""``plan --simulate``: one rank of the planned job, run for real on fake tensors in a fake world.

The rank builds and runs exactly what a GPU rank of the job would: ``Trainer`` (the planned
layout, Megatron's GPTModel chunks, Float16Module + DDP buffers, the distributed optimizer, a live
reference where the loss has one), then optimizer steps through Megatron's pipeline schedule,
fused log-probs, finalize_model_grads and Adam. Tensors are ``FakeTensorMode`` tensors (shapes,
dtypes and storages, no memory) and the world is torch's fake process group of the job's size
(collectives return at once), so a 70B rank of a 64-GPU job runs on a laptop CPU.
``memory_tracker.MemoryTracker`` counts every storage. The Adam moments are created before the
step (torch's Adam would make them lazily inside the first one), so the step measured is the
steady state of a run.

What differs from the GPU rank: the CUDA-only calls go through ``parallel/cpu.py``'s redirect,
the layer spec is the local one with SDPA attention (a flash kernel on CPU too: outputs and
log-sum-exp saved, no score matrix), and data-dependent scalars of fake tensors read 1.0 (the
gradient norm, the metrics) or 0.0 (Megatron's found-inf flag, so the update runs). Only the
allocator's own slack is not seen (``memory_model.OVERHEAD_GB``).

Mixture-of-experts ranks run Megatron's MoELayer with the alltoall dispatcher, but fake tensors
cannot route: the dispatcher reads per-expert token counts on the host to size its all-to-all
and split the tokens among the local experts. The simulation therefore states its routing:
**uniform routing** -- every expert receives exactly ``tokens x top-k / experts`` token copies
from every rank (``_uniform_routing``: the counts the dispatcher reads are these, and its
permutation is the static capacity-shaped one, which for a perfectly balanced router is the
dropless one). The router itself (gating GEMM, softmax, top-k) runs as built. A real router is
never this even: the memory model's ``MOE_IMBALANCE`` headroom (its own line of the plan) is what
the planner keeps for that, and is not simulated.
"""

import contextlib
import os
import tempfile
from typing import Optional

from megasimpo.config import LoraConfig, LossConfig, ModelConfig, TrainConfig
from megasimpo.known_warnings import quiet_known_warnings
from megasimpo.memory_tracker import CATEGORIES, MemoryTracker

GB = 1e9
SIM_STEPS = 1  # the Adam moments are created first (as a resume does), so step 1 is steady
SIM_MICROBATCHES_PER_STAGE = 2  # micro-batches simulated per pipeline stage (train_config)


def stage_rank(layout, stage: int) -> int:
    """Global rank 0 of pipeline stage ``stage`` in Megatron's default tp-cp-dp-pp rank order."""
    return stage * layout.tp * layout.cp * layout.dp


def train_config(plan, model: ModelConfig, workdir: str, *, loss: LossConfig, ref: str,
                 logprob_chunk: int, attention_backend: str = "sdpa",
                 precision: str = "bf16") -> TrainConfig:
    """The TrainConfig of ``plan`` (every layout choice fixed) over full-row random pairs written
    under ``workdir`` (and, for ``ref`` precomputed, their reference scores)."""
    import numpy as np

    from megasimpo.data.indexed import write_pairs
    from megasimpo.data.synthetic import random_pairs
    from megasimpo.score import default_scores_path, write_scores

    prefix, lay = os.path.join(workdir, "pairs"), plan.layout
    # Peak memory is set by the micro-batches in flight, which 1F1B bounds by the pipeline depth
    # (interleaved: x vpp): more of them only repeat the same passes, so at most twice that run.
    microbatches = min(plan.num_microbatches, SIM_MICROBATCHES_PER_STAGE * lay.pp * (lay.vpp or 1))
    global_batch = lay.dp * plan.micro_batch_size * microbatches
    num_pairs = global_batch * SIM_STEPS
    write_pairs(prefix, random_pairs(num_pairs, plan.seq_length, model.vocab_size),
                model.vocab_size)
    if loss.needs_reference and ref == "precomputed":
        n = plan.seq_length + 1 - max(1, plan.seq_length // 4)
        write_scores(default_scores_path(prefix), np.tile([-1.0 * n, -1.0 * n, n, n], (num_pairs, 1)))
    return TrainConfig(
        load="<simulated>", data=(prefix,), out=os.path.join(workdir, "run"), loss=loss, ref=ref,
        tp=lay.tp, pp=lay.pp, vpp=lay.vpp, cp=lay.cp, sequence_parallel=lay.sequence_parallel,
        first_stage_layers=lay.first_stage_layers, last_stage_layers=lay.last_stage_layers,
        micro_batch_size=plan.micro_batch_size, recompute=plan.recompute,
        gpu_mem_gb=plan.gpu_mem_gb, global_batch_size=global_batch,
        seq_length=plan.seq_length, steps=SIM_STEPS, precision=precision, pack=False,
        logprob_chunk=logprob_chunk, attention_backend=attention_backend,
        lora=plan.lora or LoraConfig(),  # a LoRA plan simulates LoRA
        **({"ep": lay.ep, "etp": lay.etp, "moe_dispatcher": lay.moe_dispatcher}
           if model.num_experts else {}))


def _label(trainer, tracker: MemoryTracker) -> None:
    """Charges what the Trainer built to its categories (later labels win on shared storage)."""
    from megasimpo.model import unwrap

    for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        inner = opt.optimizer
        tracker.relabel([g["params"] for g in inner.param_groups], "optimizer")
        tracker.relabel(list(inner.state.values()), "optimizer")
    if trainer.reference is not None:
        for m in trainer.reference:
            tracker.relabel(list(m.parameters()) + list(m.buffers()), "reference")
    for chunk in trainer.model:
        tracker.relabel(list(unwrap(chunk).buffers()), "activations")  # rotary tables and such
        tracker.relabel(list(chunk.parameters()), "weights")
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            if buffer.param_data is not None:
                tracker.relabel(buffer.param_data, "weights")
            tracker.relabel(buffer.grad_data, "grads")


@contextlib.contextmanager
def _phases(trainer, tracker: MemoryTracker):
    """Charges the optimizer step, the output layer + log-probs and the pipeline's receive
    buffers to their categories while the block runs."""
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    from megasimpo.model import unwrap
    from megasimpo.parallel.fused_logprobs import _FusedVocabParallelLogprobs as Fused

    def charged(fn, category):
        def run(*args, **kwargs):
            with tracker.phase(category):
                return fn(*args, **kwargs)
        return run

    step = trainer.step_fn
    saved = [(trainer.optimizer, "step"), (step, "loss_func"), (step, "score_func")]
    originals = [(obj, name, getattr(obj, name)) for obj, name in saved]
    for obj, name, fn in originals:
        setattr(obj, name, charged(fn, "optimizer" if name == "step" else "logits"))
    class_patches = [(P2PCommunicator, "_communicate", "pipeline"), (Fused, "backward", "logits")]
    class_originals = [(cls, name, cls.__dict__[name]) for cls, name, _ in class_patches]
    for (cls, name, category), (_, _, orig) in zip(class_patches, class_originals):
        fn = orig.__func__ if isinstance(orig, staticmethod) else orig
        wrapped = charged(fn, category)
        setattr(cls, name, staticmethod(wrapped) if isinstance(orig, staticmethod) else wrapped)
    hooks = []
    for m in list(trainer.model) + list(trainer.reference or []):
        gpt = unwrap(m)
        if gpt.post_process:
            stack = contextlib.ExitStack()
            hooks.append(gpt.output_layer.register_forward_pre_hook(
                lambda *_, s=stack: s.enter_context(tracker.phase("logits"))))
            hooks.append(gpt.output_layer.register_forward_hook(lambda *_, s=stack: s.close()))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for obj, name, _ in originals:
            delattr(obj, name)
        for cls, name, orig in class_originals:
            setattr(cls, name, orig)


def _one_by_one(single):
    """A coalesced c10d collective as one ``single`` call per tensor pair: the coalesced ops
    (DDP's bucketed reduce-scatter, the distributed optimizer's all-gather) have no fake
    implementation, the single ones do (they move nothing on fake tensors)."""
    def run(outputs, inputs, group, *rest):
        work = None
        for out, inp in zip(outputs, inputs):
            _, work = single(out, inp, group, *rest)
        return work
    return run


def _fake_op_overrides() -> dict:
    import torch

    c10d = torch.ops.c10d
    return {c10d.reduce_scatter_tensor_coalesced_.default: _one_by_one(c10d._reduce_scatter_base_.default),
            c10d.allgather_into_tensor_coalesced_.default: _one_by_one(c10d._allgather_base_.default)}


def _bfloat16_in_place(module):
    """``Module.bfloat16`` by ``.data =`` (the classic conversion), for fake parameters."""
    import torch

    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point() and t.dtype != torch.bfloat16:
            t.data = t.data.to(torch.bfloat16)
    return module


def _l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Megatron's torch fallback of ``multi_tensor_l2norm`` builds its result with
    ``torch.tensor(list of norms)``, which reads data; the same norm by tensor ops only."""
    import torch

    norms = torch.stack([torch.linalg.vector_norm(t.float()) for ts in tensor_lists for t in ts])
    return torch.linalg.vector_norm(norms).reshape(1), None


@contextlib.contextmanager
def _uniform_routing(fake: bool):
    """While simulating an MoE rank on fake tensors: the alltoall dispatcher's host-side token
    counts are those of uniform routing (each expert gets ``tokens x topk // experts`` copies from
    every rank of its TP x EP group) and its first permutation is the capacity-shaped one (static
    shapes; for balanced routing exactly the dropless result). See the module docstring."""
    if not fake:
        yield
        return
    import numpy as np
    import torch
    from megatron.core.transformer.moe import token_dispatcher as td
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    cls = td.MoEAlltoAllTokenDispatcher
    orig_preprocess, orig_permute, orig_sort = cls.preprocess, td.permute, td.sort_chunks_by_idxs
    chunk = [0]  # token copies per (source rank, local expert) chunk: all equal when uniform

    def preprocess(self, routing_map):
        orig_preprocess(self, routing_map)  # the same tensors (and sync points) as a real rank
        per = routing_map.size(0) * self.config.moe_router_topk // self.num_experts
        local, ranks = self.num_local_experts, self.tp_size * self.ep_size
        self.num_out_tokens, chunk[0] = per * self.num_experts, per
        with unset_fake_temporarily():
            self.input_splits = np.full(self.ep_size, per * local)
            self.output_splits = np.full(self.ep_size, per * local)
            self.output_splits_tp = np.full(self.tp_size, per * local * self.ep_size)
            if local > 1:
                self.num_global_tokens_per_local_expert = torch.full((ranks, local), per)
            return torch.full((local,), per * ranks)

    def permute(tokens, routing_map, probs=None, num_out_tokens=None, fused=False,
                drop_and_pad=False):
        return orig_permute(tokens, routing_map, probs, num_out_tokens, fused, True)

    def sort_chunks_by_idxs(input, split_sizes, sorted_idxs, probs=None, fused=False):
        # the dispatcher's count matrix and chunk order are fake tensors here; equal chunks
        # make every order the same shapes
        with unset_fake_temporarily():
            sizes = torch.full(tuple(split_sizes.shape), chunk[0], dtype=torch.long)
            order = torch.arange(sorted_idxs.numel())
        return orig_sort(input, sizes, order, probs=probs, fused=fused)

    patches = dict(permute=permute, sort_chunks_by_idxs=sort_chunks_by_idxs)
    cls.preprocess = preprocess
    for name, fn in patches.items():
        setattr(td, name, fn)
    try:
        yield
    finally:
        cls.preprocess = orig_preprocess
        td.permute, td.sort_chunks_by_idxs = orig_permute, orig_sort


@contextlib.contextmanager
def _fake_safe_kernels(fake: bool):
    """While simulating: ``Module.bfloat16`` by ``.data =`` (``Module._apply`` swaps fake
    parameters in place, which they refuse while the fake mode holds weak references to them)
    and a data-free grad-norm fallback."""
    import torch
    from megatron.core.optimizer import clip_grads

    if not fake:
        yield
        return
    saved = [(torch.nn.Module, "bfloat16", _bfloat16_in_place)]
    if clip_grads.l2_norm_impl.__module__ == "megatron.core.utils":  # no apex / TE kernel
        saved.append((clip_grads, "l2_norm_impl", _l2_norm))
    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in saved]
    for obj, name, fn in saved:
        setattr(obj, name, fn)
    try:
        yield
    finally:
        for obj, name, fn in originals:
            setattr(obj, name, fn)


def measure(cfg: TrainConfig, model: ModelConfig, *, fake: bool, steps: int = SIM_STEPS):
    """Builds the Trainer of ``cfg`` on random ``model`` weights and runs ``steps`` optimizer
    steps under a MemoryTracker, on fake tensors when ``fake``; the default process group must
    exist. Returns (report, trainer, tracker): report = {category: GB at the last step's peak,
    "total": peak GB, "static": {category: GB live after the steps}}."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    from megasimpo.parallel import compat
    from megasimpo.trainer import Trainer

    flags = []  # Megatron's found-inf flags: read as 0 so the update runs
    tracker = MemoryTracker(scalar=lambda t: 0.0 if any(t is f for f in flags) else 1.0,
                            overrides=_fake_op_overrides() if fake else None)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    if fake and model.num_experts and cfg.moe_dispatcher != "alltoall":
        raise ValueError(f"--moe-dispatcher {cfg.moe_dispatcher}: the simulation routes MoE "
                         "tokens with the alltoall dispatcher only; simulate with "
                         "--moe-dispatcher alltoall")
    with fake_mode, tracker, _fake_safe_kernels(fake), _uniform_routing(fake and model.is_moe):
        with tracker.phase("other"):  # what _label does not claim stays "other"
            trainer = Trainer(cfg, random_init=model)
        with tracker.phase("optimizer"):  # torch's Adam makes its moments lazily: make them now
            compat.prepare_optimizer_for_load(trainer.optimizer)
        _label(trainer, tracker)
        flags += [getattr(o, "found_inf", None) for o in
                  getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])]
        collate = trainer.step_batches

        def real_batches(step):  # data come from real files: collate them outside fake mode
            with unset_fake_temporarily() if fake else contextlib.nullcontext():
                return collate(step)

        trainer.step_batches = real_batches
        with _phases(trainer, tracker), tracker.phase("activations"):
            for s in range(steps):
                if s == steps - 1:
                    tracker.reset_peak()
                trainer.train_step(s)
    report = {k: v / GB for k, v in tracker.peak_by_category.items()}
    report["total"] = tracker.peak / GB
    report["static"] = {k: tracker.by_category[k] / GB for k in CATEGORIES}
    return report, trainer, tracker


def _same_objects_everywhere(dist) -> None:
    """Object collectives of the fake world: every rank holds what this one holds (the fake
    group moves no data, and Megatron gathers only keys that are the same on all ranks)."""
    def all_gather_object(object_list, obj, group=None):
        object_list[:] = [obj] * len(object_list)

    def broadcast_object_list(object_list, src=None, group=None, device=None, group_src=None):
        return None

    dist.all_gather_object = all_gather_object
    dist.broadcast_object_list = broadcast_object_list


def _simulate_rank(plan, model: ModelConfig, rank: int, gpus_per_node: int, loss: LossConfig,
                   ref: str, logprob_chunk: int) -> dict:
    """Child process: the fake world of ``plan.world_size`` ranks, rank ``rank``, measured."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megasimpo.parallel import cpu
    from megasimpo.parallel import groups as pgroups

    quiet_known_warnings()
    os.environ.update(LOCAL_WORLD_SIZE=str(gpus_per_node), RANK=str(rank),
                      WORLD_SIZE=str(plan.world_size))
    cpu.enable()
    dist.init_process_group("fake", rank=rank, world_size=plan.world_size, store=FakeStore())
    _same_objects_everywhere(dist)
    try:
        with tempfile.TemporaryDirectory(prefix="megasimpo-sim-") as workdir:
            cfg = train_config(plan, model, workdir, loss=loss, ref=ref,
                               logprob_chunk=logprob_chunk)
            report, trainer, _ = measure(cfg, model, fake=True)
            report.update(rank=rank, stage=trainer.groups.pp_rank)
            return report
    finally:
        pgroups.destroy()


_PRELOAD = ["torch", "torch.distributed", "megatron.core", "megasimpo.trainer", "megasimpo.simulate"]


def simulate(plan, model: ModelConfig, *, ranks: Optional[list] = None, gpus_per_node: int = 8,
             loss: Optional[LossConfig] = None, ref: str = "live",
             logprob_chunk: Optional[int] = None, timeout: float = 1800.0) -> list:
    """Simulated memory of ``ranks`` (default: rank 0 of each pipeline stage the plan priced:
    the first, the last, and of an uneven split the first middle one) of the job ``plan``
    describes, each in its own process; a list of reports."""
    import multiprocessing as mp

    loss = loss or LossConfig(name=plan.loss)
    logprob_chunk = plan.logprob_chunk if logprob_chunk is None else logprob_chunk
    if ranks is None:
        # the stages the plan priced: first, last and, of an uneven split, the first middle one
        ranks = sorted({stage_rank(plan.layout, m.stage) for m in plan.stages}
                       | {stage_rank(plan.layout, 0), stage_rank(plan.layout, plan.layout.pp - 1)})
    for r in ranks:
        if not 0 <= r < plan.world_size:
            raise ValueError(f"--rank {r} is outside the job's {plan.world_size} ranks")
    # One fresh process per rank: Megatron's parallel state is global to a process. They are
    # forked from a server that has imported torch, Megatron-Core and megasimpo once (and
    # nothing else: no torch op has run there, no thread started), so each rank starts in a
    # fraction of a second instead of re-importing, and a bench of many rows pays the imports once.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    with ctx.Pool(min(len(ranks), os.cpu_count() or 1), maxtasksperchild=1) as pool:
        jobs = [pool.apply_async(_child, (plan, model, r, gpus_per_node, loss, ref,
                                          logprob_chunk)) for r in ranks]
        results = [job.get(timeout=timeout) for job in jobs]
    for r in results:
        if isinstance(r, str):
            raise RuntimeError(f"simulating a rank failed:\n{r}")
    return results


def _child(*args):
    """``_simulate_rank`` in a pool process; a failure comes back as its traceback text (some
    exceptions of torch's C++ side do not pickle)."""
    import traceback

    try:
        return _simulate_rank(*args)
    except Exception:
        return traceback.format_exc()
