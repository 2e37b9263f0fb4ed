"""The training loop: Megatron schedules, DDP, distributed optimizer, cosine LR, eval, metrics.

One optimizer step = this rank's micro-batches through ``get_forward_backward_func`` (Megatron's
own no-pipelining, 1F1B or interleaved schedule), ``finalize_model_grads`` (DP reduce-scatter,
embedding sync, division by the global pair count), then the distributed optimizer. A live DPO
reference is a frozen copy at the same layout that runs forward-only over the same micro-batches.
"""

import dataclasses
import math
import signal
import json
import os
import time
from typing import Optional

import torch
import yaml

from megasimpo import checkpoint, run_dir
from megasimpo.config import ModelConfig, TrainConfig
from megasimpo.data.batches import ConcatPairs, full_pass_batches, make_batch
from megasimpo.data.loader import BatchLayout, PairSampler, count_truncated, default_seq_length
from megasimpo.data.packing import pack_step
from megasimpo.metrics import MetricsSink, batch_forward_flops, peak_memory_gb, peak_tflops
from megasimpo.model import (Precision, build_chunks, finish_param_gather,
                             resolve_attention_backend, set_sync_funcs, unwrap, wrap_for_training,
                             wrap_frozen)
from megasimpo.parallel import groups as pgroups
from megasimpo.parallel import processes
from megasimpo.step import TOTAL_KEYS, PairStep, reduce_stats, run_microbatches

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
        self.train_data = ConcatPairs(cfg.data)
        self.eval_data = ConcatPairs(cfg.eval_data) if cfg.eval_data else None
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

    def _plan(self, world: int):
        """The layout and batch split: the planner's choice around the flags the user fixed."""
        from megasimpo import planner

        cfg = self.cfg
        datasets = [self.train_data] + ([self.eval_data] if self.eval_data else [])
        # Without --seq-length: the longest pair, rounded so TP x CP up to 8 divides it.
        self.seq_length = cfg.seq_length or max(
            default_seq_length(d, SEQ_MULTIPLE, self.model_cfg.max_position_embeddings)
            for d in datasets)
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
            logprob_chunk=cfg.logprob_chunk,
            overrides=dict(tp=cfg.tp, pp=cfg.pp, vpp=cfg.vpp, cp=cfg.cp,
                           micro_batch_size=cfg.micro_batch_size, recompute=cfg.recompute,
                           sequence_parallel=cfg.sequence_parallel))

    def _packing(self) -> bool:
        """Whether micro-batches are packed: --pack/--no-pack, else whenever a variable-length
        attention kernel serves the THD rows (Transformer Engine, or SDPA on a GPU) and there is
        no context parallelism."""
        if self.cfg.pack and self.layout.cp > 1:
            raise ValueError(f"--pack does not support context parallelism (cp={self.layout.cp}); "
                             "use --no-pack or --cp 1")
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
        from megasimpo.score import read_scores, default_scores_path

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
        arrays = [read_scores(path, ConcatPairs([prefix]))
                  for path, prefix in zip(paths, prefixes)]
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
            if not self.random_init:
                checkpoint.load_model(chunks, cfg.load)
            return self.step_fn.prepare_model(chunks)

        self.model = wrap_for_training(weights(self.plan.recompute), self.precision,
                                       overlap_grad_reduce=self.overlap_grad_reduce,
                                       overlap_param_gather=self.overlap_param_gather)
        self.reference = None
        if cfg.loss.needs_reference and cfg.ref == "live":
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
        """Every derived choice of this run (printed and saved as config.yaml)."""
        lay = self.layout
        return {
            "run": self.cfg.to_dict(),
            "model": self.model_cfg.to_dict(),
            "layout": dataclasses.asdict(lay),
            "plan": self.plan.to_dict(),
            "derived": {
                "world_size": lay.world_size, "precision": self.precision.name,
                "seq_length": self.seq_length, "micro_batch_size": self.micro_batch_size,
                "recompute": self.plan.recompute, "packed_sequences": self.pack,
                "overlap_grad_reduce": self.overlap_grad_reduce,
                "overlap_param_gather": self.overlap_param_gather,
                "num_microbatches": self.num_microbatches, "steps": self.num_steps,
                "warmup_steps": self.warmup_steps, "beta": self.cfg.loss.beta,
                "train_pairs": len(self.train_data),
                "eval_pairs": len(self.eval_data) if self.eval_data else 0,
                "pairs_dropped_per_epoch": self.sampler.dropped_per_epoch,
                "pairs_prompt_truncated": self.num_truncated,
                "attention_backend": self.attention_backend,
                "transformer_engine": self.attention_backend == "te",
            },
        }

    # ----- passes ---------------------------------------------------------------------------

    def _run(self, model, batches, *, forward_only: bool, loss_fn=None):
        return run_microbatches(model, batches, self.step_fn, forward_only=forward_only,
                                loss_fn=loss_fn)

    def _prepare(self, batches: list) -> list:
        """Packs the step's micro-batches when packing is on; notes each one's forward FLOPs."""
        if self.pack:
            batches = pack_step(batches, math.lcm(PACK_MULTIPLE, self.layout.tp))
        for batch in batches:
            batch["forward_flops"] = batch_forward_flops(self.model_cfg, batch)
        return batches

    def _attach_reference(self, batches) -> None:
        """Live reference: forward-only pass; last-stage ranks get [b, 2] reference log-probs."""
        outputs = self._run(self.reference, batches, forward_only=True,
                            loss_fn=self.step_fn.score_func)
        for batch, out in zip(batches, outputs or []):
            batch["ref_logps"] = out["logps"]

    def step_batches(self, step: int) -> list:
        """The micro-batches of optimizer step ``step`` (collated from the dataset, unpacked)."""
        return [make_batch(self.train_data, idx, self.seq_length, ref_logps=self.train_ref)
                for idx in self.sampler.step_indices(step)]

    def train_step(self, step: int) -> dict:
        """One optimizer step; returns the reduced metrics row."""
        t0 = time.perf_counter()
        batches = self._prepare(self.step_batches(step))
        if self.reference is not None:
            self._attach_reference(batches)
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run(self.model, batches, forward_only=False)
        stats = reduce_stats(self.step_fn, outputs, self.groups)
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
        # Forward FLOPs of the positions that ran (all micro-batches of all DP replicas), x3 for
        # forward + backward, plus one forward per live reference.
        flops = stats["forward_flops"] * (3 + (1 if self.reference is not None else 0))
        tflops = flops / dt / self.layout.world_size / 1e12
        peak = peak_tflops(self.precision.name)
        row.update(skipped=0 if ok else 1, lr=lr,
                   grad_norm=float("nan") if grad_norm is None else float(grad_norm),
                   tokens_per_sec=stats["num_tokens"] / dt, tflops_per_gpu=tflops,
                   mfu=tflops / peak if peak else None, mem_peak_gb=peak_memory_gb(),
                   step_time_s=dt)
        return row

    def evaluate(self, dataset) -> dict:
        """Held-out metrics over every pair of ``dataset`` (filler pairs weigh 0)."""
        batches, _ = full_pass_batches(dataset, self.groups.dp_rank, self.layout.dp,
                                       self.micro_batch_size, self.seq_length, self.eval_ref)
        batches = self._prepare(batches)
        if self.reference is not None:
            self._attach_reference(batches)
        with torch.no_grad():
            outputs = self._run(self.model, batches, forward_only=True)
        stats = reduce_stats(self.step_fn, outputs, self.groups)
        return {f"eval_{k}": v for k, v in stats.items() if k not in TOTAL_KEYS}

    # ----- the run --------------------------------------------------------------------------

    def _stop_requested(self) -> bool:
        """Whether any rank received SIGTERM/SIGUSR1 (all ranks agree, so all stop together)."""
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self._signal else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            if torch.cuda.is_available():
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _on_signal(self, signum, frame):
        self._signal = signum

    def save(self, done: int) -> str:
        """Resumable checkpoint after ``done`` steps (collective)."""
        finish_param_gather(self.model)
        return checkpoint.save_training_state(
            self.cfg.out, done, self.model, self.optimizer, self.scheduler, self.model_cfg,
            dataclasses.asdict(self.layout), keep=self.cfg.keep_checkpoints,
            run=run_dir.run_record(self.cfg))

    def _start_metrics(self) -> MetricsSink:
        """Opens metrics.jsonl after dropping the rows of steps this start redoes (a run that
        died after its last checkpoint logged steps that are about to be redone)."""
        if self.is_rank0:
            run_dir.truncate_metrics(self.cfg.out, self.start_step)
        return MetricsSink(self.cfg.out, self.is_rank0)

    def _status(self, state: str, step: int, checkpoint_path=None, reason: str = "") -> None:
        if self.is_rank0:
            run_dir.write_status(self.cfg.out, state, step=step, steps=self.num_steps,
                                 checkpoint=checkpoint_path, reason=reason)

    def run(self) -> list:
        """Trains to the configured step count, resuming from RUN_DIR's latest checkpoint.

        Writes metrics, config.yaml, periodic checkpoints and RUN_DIR/final_model. Stops early,
        with a checkpoint and no final model, at ``--exit-interval`` or on SIGTERM/SIGUSR1.
        """
        from tqdm import tqdm

        cfg = self.cfg
        resolved = self.resolved()
        if self.is_rank0:
            os.makedirs(cfg.out, exist_ok=True)
            with open(os.path.join(cfg.out, "config.yaml"), "w") as f:
                yaml.safe_dump(resolved, f, sort_keys=False)
            print("megasimpo train:", yaml.safe_dump(resolved["derived"] | resolved["layout"],
                                                    default_flow_style=True).strip(), flush=True)
            for reason in self.plan.reasons:
                print(f"  plan: {reason}", flush=True)
        self._signal = None
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        sink = self._start_metrics()
        self._status("running", self.start_step)
        rows, skipped_in_a_row, finished, done = [], 0, False, self.start_step
        try:
            if self.eval_data is not None and self.start_step == 0:
                row = {"step": 0, **self.evaluate(self.eval_data)}
                sink.write(row)
                rows.append(row)
            bar = tqdm(range(self.start_step, self.num_steps), desc="train",
                       disable=not self.is_rank0, dynamic_ncols=True,
                       initial=self.start_step, total=self.num_steps)
            for step in bar:
                row = self.train_step(step)
                done = step + 1
                skipped_in_a_row = skipped_in_a_row + 1 if row["skipped"] else 0
                if self.eval_data is not None and (
                        done == self.num_steps
                        or (cfg.eval_interval and done % cfg.eval_interval == 0)):
                    row.update(self.evaluate(self.eval_data))
                if (done % cfg.log_interval == 0 or done == self.num_steps or row["skipped"]
                        or "eval_loss" in row):
                    sink.write(row)
                rows.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
                if row["skipped"] and self.is_rank0:
                    print(f"megasimpo train: step {done}: non-finite loss or gradient "
                          f"(loss={row['loss']}, grad_norm={row['grad_norm']}); update skipped",
                          flush=True)
                if skipped_in_a_row >= cfg.max_skipped_steps:
                    raise RuntimeError(
                        f"{skipped_in_a_row} consecutive steps (up to step {done}) had a non-finite "
                        "loss or gradient; stopping. Check the data and lower --lr; the last "
                        "checkpoint is intact")
                stop = self._stop_requested()
                exiting = stop or (cfg.exit_interval and done % cfg.exit_interval == 0
                                   and done < self.num_steps)
                if exiting or (cfg.save_interval and done % cfg.save_interval == 0
                               and done < self.num_steps):
                    path = self.save(done)
                    if self.is_rank0:
                        print(f"megasimpo train: checkpoint {path}", flush=True)
                if exiting:
                    why = f"signal {self._signal}" if stop else f"--exit-interval {cfg.exit_interval}"
                    if self.is_rank0:
                        print(f"megasimpo train: stopping after step {done} ({why}); run the "
                              "same command to resume", flush=True)
                    self._status("stopped", done, path, why)
                    finished = True
                    return rows
            finish_param_gather(self.model)
            final = os.path.join(cfg.out, run_dir.FINAL_MODEL)
            checkpoint.save_model([unwrap(m) for m in self.model], self.model_cfg, final,
                                  source=cfg.load, tokenizer_dir=checkpoint.tokenizer_dir(cfg.load))
            self._status("finished", self.num_steps, final)
            finished = True
        finally:
            if not finished:  # an exception (a kill -9 leaves "running" and a stale lock)
                try:
                    self._status("failed", done, reason="an error; see the log")
                except OSError:  # e.g. the disk that is full; the error itself matters more
                    pass
            sink.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return rows


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
