"""A built run and its step: Megatron schedules, DDP, distributed optimizer, cosine LR, eval.

One optimizer step = this rank's micro-batches through ``get_forward_backward_func`` (Megatron's
own no-pipelining, 1F1B or interleaved schedule), ``finalize_model_grads`` (DP reduce-scatter,
embedding sync, division by the global pair count), then the distributed optimizer. A live DPO
reference is a frozen copy at the same layout that runs forward-only over the same micro-batches.
The loop around the steps (checkpoints, stops, status, final model) is megasimpo/run_loop.py.
"""

import dataclasses
import math
import os
import time
from functools import partial
from typing import Optional

import torch

from megasimpo import checkpoint, lora, lora_targets, run_dir, score_meta
from megasimpo.config import ModelConfig, TrainConfig
from megasimpo.data.batches import WINDOW, ConcatPairs, full_pass_windows, make_batch
from megasimpo.data.indexed import check_token_range
from megasimpo.data.loader import BatchLayout, PairSampler, count_truncated, default_seq_length
from megasimpo.data.packing import prepare
from megasimpo.data.tokenizer_check import check_against_checkpoint
from megasimpo.lora_checkpoint import with_lora
from megasimpo.metrics import batch_forward_flops, peak_memory_gb, peak_tflops
from megasimpo.moe_aux import RouterStats
from megasimpo.model import (Precision, build_chunks, finish_param_gather,
                             resolve_attention_backend, set_sync_funcs, unwrap, wrap_for_training,
                             wrap_frozen)
from megasimpo.parallel import groups as pgroups
from megasimpo.parallel import processes
from megasimpo.step import TOTAL_KEYS, PairStep, host_totals, reduce_stats, run_microbatches

SEQ_MULTIPLE = 16  # default sequence lengths are rounded to this (2 x TP x CP <= 16 divides it)
PACK_MULTIPLE = 16  # packed rows are rounded to this (x TP): aligned FP8 GEMMs, SP splits evenly

class Trainer:
    """Builds everything for a TrainConfig at the current world size, then runs it."""

    def __init__(self, cfg: TrainConfig, *, random_init: Optional[ModelConfig] = None):
        """``random_init``: start from random weights of this architecture (drawn from cfg.seed)
        instead of loading ``cfg.load``; for benchmarks, which time steps and need no checkpoint."""
        processes.setup_rank()  # its helpers die with it; torchrun's death stops it
        self.cfg = cfg
        self.random_init = random_init
        rank, world = pgroups.init_distributed()
        self.is_rank0 = rank == 0
        self.model_cfg = random_init or checkpoint.model_config(cfg.load)
        if cfg.lora.enabled:  # before anything is planned or built: targets the model has
            targets, note = lora_targets.for_model(cfg.lora.targets, self.model_cfg)
            if note:
                self.cfg = cfg = dataclasses.replace(
                    cfg, lora=dataclasses.replace(cfg.lora, targets=targets))
                if rank == 0:
                    print(f"megasimpo train: note: {note}", flush=True)
            lora_targets.check_model(cfg.lora.targets, self.model_cfg)
        self.lock = self._claim_run_dir()
        try:
            self._build(world)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Gives up the run directory (its lock); the process group stays."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ----- set-up -------------------------------------------------------------------------

    def _claim_run_dir(self):
        """Rank 0 checks and locks --out (megasimpo/run_dir.py); every rank raises its error."""
        lock, notes, error = None, [], None
        if self.is_rank0:
            try:
                lock, notes = run_dir.prepare(self.cfg, self.model_cfg.to_dict())
            except ValueError as e:
                error = str(e)
        error = pgroups.from_rank0(error)
        if error:
            raise ValueError(error)
        for note in notes:
            print(f"megasimpo train: {note}", flush=True)
        return lock

    def _build(self, world: int) -> None:
        cfg = self.cfg
        self.attention_backend = resolve_attention_backend(cfg.attention_backend)
        if cfg.moe_aux_loss_coeff and not self.model_cfg.num_experts:
            raise ValueError(f"--moe-aux-loss-coeff {cfg.moe_aux_loss_coeff:g}: "
                             f"{self.model_cfg.architecture} has no experts (no router to "
                             "balance); drop the flag")
        self.train_data = ConcatPairs(cfg.data)
        self.eval_data = ConcatPairs(cfg.eval_data) if cfg.eval_data else None
        if self.random_init is None:  # the data's tokenizer is the checkpoint's (or a note)
            check_against_checkpoint([self.train_data] + ([self.eval_data] if self.eval_data else []),
                                     cfg.load, prog="megasimpo train", quiet=not self.is_rank0)
        # Every id below the checkpoint's real vocabulary (not the padded one): the max id is in
        # each dataset's index, so this reads no token.
        check_token_range([self.train_data] + ([self.eval_data] if self.eval_data else []),
                          self.model_cfg.vocab_size, cfg.load)
        self.seq_length = self._seq_length()
        self.plan = self._plan(world)
        self.layout = self.plan.layout
        self.precision = Precision(name=cfg.precision) if cfg.precision else Precision.default()
        if self.precision.name == "fp8" and self.attention_backend != "te":
            raise ValueError(f"--precision fp8 needs --attention-backend te (got "
                             f"{self.attention_backend}): FP8 GEMMs are Transformer Engine's")
        self.groups = pgroups.initialize(self.layout, cfg.seed)
        self.pack = self._packing()
        self.overlap_grad_reduce, self.overlap_param_gather = self._overlap()
        self.step_fn = PairStep(cfg.loss, self.groups, self.model_cfg.vocab_size,
                                logprob_chunk=cfg.logprob_chunk)
        self._setup_data()
        self._setup_model()

    def _seq_length(self) -> int:
        """--seq-length, else the longest pair of the data, rounded so TP x CP up to 8 divides it
        (capped by the model)."""
        datasets = [self.train_data] + ([self.eval_data] if self.eval_data else [])
        return self.cfg.seq_length or max(
            default_seq_length(d, SEQ_MULTIPLE, self.model_cfg.max_position_embeddings)
            for d in datasets)

    def _plan(self, world: int):
        """The layout and batch split: the planner's choice around the flags the user fixed."""
        from megasimpo import planner

        cfg = self.cfg
        if cfg.gpu_mem_gb:
            mem = cfg.gpu_mem_gb
        elif torch.cuda.is_available():
            mem = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1e9
        else:  # CPU ranks share the host's memory
            import psutil

            mem = psutil.virtual_memory().total / 1e9 / int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        return planner.plan(
            self.model_cfg, world, gpus_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
            gpu_mem_gb=mem, seq_length=self.seq_length, loss=cfg.loss.name, ref=cfg.ref,
            global_batch_size=cfg.global_batch_size, attention_backend=self.attention_backend,
            logprob_chunk=cfg.logprob_chunk, lora=cfg.lora if cfg.lora.enabled else None,
            overrides=dict(tp=cfg.tp, pp=cfg.pp, vpp=cfg.vpp, cp=cfg.cp,
                           first_stage_layers=cfg.first_stage_layers,
                           last_stage_layers=cfg.last_stage_layers, ep=cfg.ep, etp=cfg.etp,
                           moe_dispatcher=cfg.moe_dispatcher,
                           micro_batch_size=cfg.micro_batch_size, recompute=cfg.recompute,
                           sequence_parallel=cfg.sequence_parallel))

    def _packing(self) -> bool:
        """Whether micro-batches are packed: --pack/--no-pack, else whenever a variable-length
        attention kernel serves the THD rows (Transformer Engine, or SDPA on a GPU) and there is
        no context parallelism."""
        if self.cfg.pack and self.layout.cp > 1 and self.attention_backend != "sdpa":
            raise ValueError(f"--pack with context parallelism (cp={self.layout.cp}) needs "
                             "--attention-backend sdpa; use --no-pack or --cp 1")
        if self.cfg.pack is not None:
            return self.cfg.pack
        thd_kernel = self.attention_backend == "te" or (
            self.attention_backend == "sdpa" and torch.cuda.is_available())
        return thd_kernel and self.layout.cp == 1

    def _overlap(self) -> tuple:
        """(overlap_grad_reduce, overlap_param_gather): the flags, else on with CUDA and off on
        CPU (gloo runs keep Megatron's synchronous reduction unless asked)."""
        grad = self.cfg.overlap_grad_reduce
        grad = torch.cuda.is_available() if grad is None else grad
        param = grad if self.cfg.overlap_param_gather is None else self.cfg.overlap_param_gather
        if param and not grad:
            raise ValueError("--overlap-param-gather needs --overlap-grad-reduce (off by default "
                             "without CUDA); pass both")
        return grad, param

    def _setup_data(self):
        cfg, lay = self.cfg, self.layout
        self.micro_batch_size = self.plan.micro_batch_size
        self.num_microbatches = self.plan.num_microbatches
        multiple = 2 * lay.cp * (lay.tp if lay.sequence_parallel else 1)
        datasets = [self.train_data] + ([self.eval_data] if self.eval_data else [])
        if self.seq_length % multiple:
            raise ValueError(f"--seq-length {self.seq_length} must be a multiple of {multiple} "
                             f"(2 x cp{' x tp with sequence parallelism' if lay.sequence_parallel else ''})")
        window = self.model_cfg.sliding_window
        if window and self.seq_length > window:
            raise ValueError(
                f"--seq-length {self.seq_length} exceeds the model's sliding_window {window}: this "
                "engine attends over the whole sequence, so longer runs would not match the model")
        self.num_truncated = sum(count_truncated(d, self.seq_length) for d in datasets)
        self.sampler = PairSampler(
            len(self.train_data),
            BatchLayout(micro_batch_size=self.micro_batch_size, num_microbatches=self.num_microbatches,
                        dp_rank=self.groups.dp_rank, dp_size=lay.dp),
            cfg.seed)
        self.num_steps = cfg.steps or cfg.epochs * self.sampler.steps_per_epoch
        self.train_ref = self.eval_ref = None
        if cfg.loss.needs_reference and cfg.ref == "precomputed":
            self._load_reference_logps()

    def _load_reference_logps(self):
        """Reference log-probs scored ahead by ``megasimpo score`` (one file per prefix)."""
        from megasimpo.score import default_scores_path, read_reference

        cfg = self.cfg
        if self.num_truncated:
            raise ValueError(
                f"--ref precomputed: {self.num_truncated} pairs would have their prompt cut at "
                f"--seq-length {self.seq_length}, but scored reference log-probs assume whole "
                "prompts; raise --seq-length or preprocess with --max-length")
        prefixes = list(cfg.data) + list(cfg.eval_data)
        paths = list(cfg.ref_logps or []) or [default_scores_path(p) for p in prefixes]
        if len(paths) != len(prefixes):
            raise ValueError(f"--ref-logps: {len(paths)} files for {len(prefixes)} dataset prefixes "
                             "(--data then --eval-data; one scored file each)")
        read = [read_reference(path, ConcatPairs([prefix])) for path, prefix in zip(paths, prefixes)]
        arrays = [a for a, _ in read]
        self.reference_metas = [(path, prefix, meta)  # their model is checked in _setup_model
                                for path, prefix, (_, meta) in zip(paths, prefixes, read)]
        import numpy as np

        self.train_ref = np.concatenate(arrays[:len(cfg.data)])
        if cfg.eval_data:
            self.eval_ref = np.concatenate(arrays[len(cfg.data):])

    def _setup_model(self):
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg = self.cfg

        def weights(recompute: bool) -> list:
            seed = cfg.seed if self.random_init else None
            chunks = build_chunks(self.model_cfg, self.layout, self.precision,
                                  recompute=recompute, seed=seed,
                                  attention_backend=self.attention_backend)
            base = None if self.random_init else checkpoint.load_model(chunks, cfg.load)
            if cfg.lora.enabled or base is not None:
                self.lora_base = with_lora(chunks, cfg, self.model_cfg, base,
                                           random_init=bool(self.random_init))
            return self.step_fn.prepare_model(chunks)

        self.lora_base = None  # a LoRA run's base record (its checkpoints reference it)
        self.model = wrap_for_training(weights(self.plan.recompute), self.precision,
                                       overlap_grad_reduce=self.overlap_grad_reduce,
                                       overlap_param_gather=self.overlap_param_gather)
        if self.train_ref is not None and any(m for _, _, m in self.reference_metas):
            # --load's weights (the base of a LoRA run) before a resume replaces them
            score_meta.check_model(self.reference_metas, score_meta.weights_identity(self.model),
                                   (self.lora_base or {}).get("path", cfg.load))
        self.router_stats = None if not self.model_cfg.num_experts else RouterStats(
            self.model, self.model_cfg, self.groups, cfg.moe_aux_loss_coeff,
            self.micro_batch_size, cfg.global_batch_size)
        self.live_reference = cfg.loss.needs_reference and cfg.ref == "live"  # LoRA: adapters off
        self.reference = None
        if self.live_reference and not cfg.lora.enabled:
            self.reference = wrap_frozen(weights(False), self.precision)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr,
                            weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1,
                            adam_beta2=cfg.adam_beta2, adam_eps=1e-8,
                            bf16=self.precision.dtype == torch.bfloat16,
                            params_dtype=self.precision.dtype, clip_grad=cfg.clip_grad,
                            use_distributed_optimizer=True,
                            overlap_param_gather=self.overlap_param_gather,
                            # A constant scale of 1 changes no value but makes Megatron check the
                            # gradients for inf/nan and skip the update when it finds any.
                            loss_scale=1.0),
            self.model, use_gloo_process_groups=pgroups.has_gloo_groups())
        self.warmup_steps = int(cfg.warmup_ratio * self.num_steps)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
            lr_warmup_steps=self.warmup_steps, lr_decay_steps=self.num_steps,
            lr_decay_style="cosine", start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
            wd_incr_steps=self.num_steps, wd_incr_style="constant")
        config = unwrap(self.model[0]).config
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        set_sync_funcs(self.model)
        self.start_step = 0
        checkpoint.remove_stale_partials(cfg.out)
        latest = checkpoint.latest_checkpoint(cfg.out)
        if latest is not None:
            self.start_step = checkpoint.load_training_state(
                latest, self.model, self.optimizer, self.scheduler, dataclasses.asdict(self.layout))
            if self.is_rank0:
                print(f"megasimpo train: resuming from {latest} after step {self.start_step}",
                      flush=True)

    def resolved(self) -> dict:
        """Every derived choice of this run (printed and saved as config.yaml):
        ``run_dir.resolved_record``."""
        return run_dir.resolved_record(self)

    # ----- passes ---------------------------------------------------------------------------

    def _run(self, model, batches, *, forward_only: bool, loss_fn=None):
        return run_microbatches(model, batches, self.step_fn, forward_only=forward_only,
                                loss_fn=loss_fn)

    def _prepare(self, batches: list) -> tuple:
        """One schedule call's CPU micro-batches on the device, packed to one length when packing
        is on (decided once, ``_packing``), and their token and FLOP totals (host lengths)."""
        lay = self.layout  # under CP each packed segment splits in 2cp chunks (cp_attention)
        batches = prepare(batches, math.lcm(PACK_MULTIPLE, lay.tp * lay.cp, 2 * lay.cp)
                          if self.pack else None, segment_multiple=2 * lay.cp if lay.cp > 1 else 1)
        return batches, host_totals(batches, partial(batch_forward_flops, self.model_cfg))

    def _attach_reference(self, batches: list) -> list:
        """Live reference: a forward-only pass; on last-stage ranks the micro-batches come back
        with their [b, 2] reference log-probs (elsewhere unchanged: the loss is not there)."""
        if self.reference is not None:
            outputs = self._run(self.reference, batches, forward_only=True,
                                loss_fn=self.step_fn.score_func)
        else:  # LoRA: the base is this model with its adapters switched off
            with lora.disabled(self.model), torch.no_grad():
                outputs = self._run(self.model, batches, forward_only=True,
                                    loss_fn=self.step_fn.score_func)
        if not outputs:
            return batches
        return [dataclasses.replace(b, ref_logps=o["logps"]) for b, o in zip(batches, outputs)]

    def step_batches(self, step: int) -> list:
        """The CPU micro-batches of optimizer step ``step`` (collated from the dataset, not yet
        packed nor on the device: ``_prepare``)."""
        return [make_batch(self.train_data, idx, self.seq_length, ref_logps=self.train_ref)
                for idx in self.sampler.step_indices(step)]

    def train_step(self, step: int) -> dict:
        """One optimizer step; returns the reduced metrics row."""
        t0 = time.perf_counter()
        batches, totals = self._prepare(self.step_batches(step))
        if self.live_reference:
            batches = self._attach_reference(batches)
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run(self.model, batches, forward_only=False)
        stats = reduce_stats(self.step_fn, outputs, self.groups, totals)
        ok, grad_norm = False, None
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses (TRL logs this one)
        if math.isfinite(stats["loss"]):  # else skip: the gradients cannot be trusted either
            ok, grad_norm, _ = self.optimizer.step()  # False when a gradient is inf/nan
        if ok:
            self.scheduler.step(increment=1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        row = {"step": step + 1, **{k: v for k, v in stats.items() if k not in TOTAL_KEYS}}
        if self.router_stats is not None:  # MoE: moe/aux_loss, moe/load_imbalance
            row.update(self.router_stats.step_metrics())
        # Forward FLOPs of the positions that ran (all micro-batches of all DP replicas), x3 for
        # forward + backward, plus one forward per live reference.
        flops = stats["forward_flops"] * (3 + (1 if self.live_reference else 0))
        tflops = flops / dt / self.layout.world_size / 1e12
        peak = peak_tflops(self.precision.name)
        row.update(skipped=0 if ok else 1, lr=lr,
                   grad_norm=float("nan") if grad_norm is None else float(grad_norm),
                   tokens_per_sec=stats["num_tokens"] / dt, tflops_per_gpu=tflops,
                   mfu=tflops / peak if peak else None, mem_peak_gb=peak_memory_gb(),
                   step_time_s=dt)
        return row

    def evaluate(self, dataset) -> dict:
        """Held-out metrics over every pair of ``dataset`` (filler pairs weigh 0), one window of
        micro-batches per schedule call (each packed to its own length; ``full_pass_windows``).
        Windows are a multiple of pp micro-batches, as the interleaved schedule wants."""
        outputs, totals, pp = [], {}, self.layout.pp
        for batches, _ in full_pass_windows(dataset, self.groups.dp_rank, self.layout.dp,
                                            self.micro_batch_size, self.seq_length, self.eval_ref,
                                            window=-(-WINDOW // pp) * pp):
            batches, window_totals = self._prepare(batches)
            for k, v in window_totals.items():
                totals[k] = totals.get(k, 0.0) + v
            if self.live_reference:
                batches = self._attach_reference(batches)
            with torch.no_grad():
                outputs += self._run(self.model, batches, forward_only=True)
        stats = reduce_stats(self.step_fn, outputs, self.groups, totals)
        return {f"eval_{k}": v for k, v in stats.items() if k not in TOTAL_KEYS}

    # ----- the run --------------------------------------------------------------------------

    def save(self, done: int) -> str:
        """Resumable checkpoint after ``done`` steps (collective)."""
        finish_param_gather(self.model)
        return checkpoint.save_training_state(
            self.cfg.out, done, self.model, self.optimizer, self.scheduler, self.model_cfg,
            dataclasses.asdict(self.layout), keep=self.cfg.keep_checkpoints,
            run=run_dir.run_record(self.cfg), base=self.lora_base)

    def run(self) -> list:
        """Trains to the configured step count (megasimpo/run_loop.py); returns the rows."""
        from megasimpo.run_loop import RunLoop

        return RunLoop(self).run()


def train(cfg: TrainConfig) -> list:
    """Runs one training job in this process (a rank of a torchrun job or a single process)."""
    try:
        trainer = Trainer(cfg)
        try:
            return trainer.run()
        finally:
            trainer.close()
    finally:
        pgroups.destroy()
