"""One start of a run: config.yaml, metrics, evaluation, checkpoints, stops, status, final model.

The loop around ``Trainer.train_step``. Stops early, with a checkpoint and no final model, at
``--exit-interval`` or on SIGTERM/SIGUSR1 (all ranks agree after each step, so all stop together).
``RUN_DIR/status.json`` follows it: running -> stopped | finished | failed (megasimpo/run_dir.py),
rewritten after every committed checkpoint so that it always names the one to resume from.

The console: a progress bar on a terminal; otherwise (torchrun into a log file, ``--no-progress``)
a plain line per ``progress_every`` steps, which a log keeps readable where a bar's carriage
returns pile up. The last line names the final model.
"""

import math
import os
import signal
import sys
import time

import torch
import yaml

from megasimpo import checkpoint, run_dir
from megasimpo.metrics import MetricsSink
from megasimpo.model import finish_param_gather, unwrap
from megasimpo.parallel import groups as pgroups


class RunLoop:
    """Runs a built ``Trainer`` from its start step to the end (or a stop)."""

    def __init__(self, trainer):
        self.t = trainer
        self.cfg = trainer.cfg
        self.is_rank0 = trainer.is_rank0
        self._signal = None
        # The checkpoint to resume from, which status.json names: the one this start resumed,
        # then each one it commits.
        self._checkpoint = checkpoint.latest_checkpoint(self.cfg.out) if trainer.start_step else None

    def _stop_requested(self) -> bool:
        """Whether any rank received SIGTERM/SIGUSR1 (all ranks agree, so all stop together)."""
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self._signal else 0.0])
        return bool(pgroups.all_reduce_host(flag, dist.ReduceOp.MAX).item())

    def _on_signal(self, signum, frame):
        self._signal = signum

    def _start_metrics(self) -> MetricsSink:
        """Opens metrics.jsonl after dropping the rows of steps this start redoes (a run that
        died after its last checkpoint logged steps that are about to be redone)."""
        if self.is_rank0:
            run_dir.truncate_metrics(self.cfg.out, self.t.start_step)
        return MetricsSink(self.cfg.out, self.is_rank0)

    def _status(self, state: str, step: int, checkpoint_path=None, reason: str = "") -> None:
        """status.json; without ``checkpoint_path``, the last checkpoint committed (or None)."""
        if self.is_rank0:
            run_dir.write_status(self.cfg.out, state, step=step, steps=self.t.num_steps,
                                 checkpoint=checkpoint_path or self._checkpoint, reason=reason)

    def _save(self, done: int) -> str:
        """A resumable checkpoint after step ``done``; status.json then names it."""
        path = self.t.save(done)
        self._checkpoint = path
        self._status("running", done)
        if self.is_rank0:
            print(f"megasimpo train: checkpoint {path}", flush=True)
        return path

    def _announce(self) -> None:
        """config.yaml (every derived choice) and the one-line summary, on rank 0."""
        resolved = self.t.resolved()
        if self.is_rank0:
            with open(os.path.join(self.cfg.out, "config.yaml"), "w") as f:
                yaml.safe_dump(resolved, f, sort_keys=False)
            print("megasimpo train:", yaml.safe_dump(resolved["derived"] | resolved["layout"],
                                                    default_flow_style=True).strip(), flush=True)
            for reason in self.t.plan.reasons:
                print(f"  plan: {reason}", flush=True)
            dropped = self.t.sampler.dropped_note()
            if dropped:
                print(f"megasimpo train: {dropped}", flush=True)

    def run(self) -> list:
        """Trains to the configured step count, resuming from RUN_DIR's latest checkpoint;
        returns the metric rows of this start."""
        from tqdm import tqdm

        t, cfg = self.t, self.cfg
        self._announce()
        use_bar = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        every = progress_every(cfg.log_interval, t.num_steps)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        sink = self._start_metrics()
        self._status("running", t.start_step)
        rows, skipped_in_a_row, finished, done = [], 0, False, t.start_step
        try:
            if t.eval_data is not None and t.start_step == 0:
                row = {"step": 0, **t.evaluate(t.eval_data)}
                sink.write(row)
                rows.append(row)
            t0 = time.monotonic()
            bar = tqdm(range(t.start_step, t.num_steps), desc="train",
                       disable=not (self.is_rank0 and use_bar), dynamic_ncols=True,
                       initial=t.start_step, total=t.num_steps)
            for step in bar:
                row = t.train_step(step)
                done = step + 1
                skipped_in_a_row = skipped_in_a_row + 1 if row["skipped"] else 0
                if t.eval_data is not None and (
                        done == t.num_steps
                        or (cfg.eval_interval and done % cfg.eval_interval == 0)):
                    row.update(t.evaluate(t.eval_data))
                if (done % cfg.log_interval == 0 or done == t.num_steps or row["skipped"]
                        or "eval_loss" in row):
                    sink.write(row)
                rows.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
                if self.is_rank0 and not use_bar and (
                        done % every == 0 or done in (t.start_step + 1, t.num_steps)
                        or "eval_loss" in row):
                    eta = (time.monotonic() - t0) / (done - t.start_step) * (t.num_steps - done)
                    print("megasimpo train: " + progress_line(row, t.num_steps, eta), flush=True)
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
                                   and done < t.num_steps)
                if exiting or (cfg.save_interval and done % cfg.save_interval == 0
                               and done < t.num_steps):
                    self._save(done)
                if exiting:
                    why = f"signal {self._signal}" if stop else f"--exit-interval {cfg.exit_interval}"
                    if self.is_rank0:
                        print(f"megasimpo train: stopping after step {done} ({why}); run the "
                              "same command to resume", flush=True)
                    self._status("stopped", done, reason=why)
                    finished = True
                    return rows
            finish_param_gather(t.model)
            final = os.path.join(cfg.out, run_dir.FINAL_MODEL)
            checkpoint.save_model([unwrap(m) for m in t.model], t.model_cfg, final,
                                  source=cfg.load, tokenizer_dir=checkpoint.tokenizer_dir(cfg.load),
                                  base=t.lora_base)
            self._status("finished", t.num_steps, final)
            finished = True
            if self.is_rank0:
                print(f"megasimpo train: finished {t.num_steps} steps; final model: {final} "
                      f"(to Hugging Face: python tools/convert_hf.py export --load {final} "
                      "--out HF_DIR)", flush=True)
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


def progress_every(log_interval: int, num_steps: int) -> int:
    """Steps between plain console lines: ``--log-interval``, but at most about 100 lines."""
    return max(log_interval, math.ceil(num_steps / 100))


def progress_line(row: dict, num_steps: int, eta_s: float) -> str:
    """One console line of a step's row: step, loss, reward accuracy, tokens/s, MFU, ETA (and
    the held-out loss and accuracy when the row has them)."""
    mfu = row.get("mfu")
    parts = [f"step {row['step']}/{num_steps}", f"loss {row['loss']:.4f}",
             f"acc {row['rewards/accuracies']:.2f}", f"tokens/s {row['tokens_per_sec']:.0f}",
             f"MFU {mfu:.1%}" if mfu is not None else "MFU -"]
    if "eval_loss" in row:
        parts.append(f"eval_loss {row['eval_loss']:.4f}")
        if "eval_rewards/accuracies" in row:
            parts.append(f"eval_acc {row['eval_rewards/accuracies']:.2f}")
    eta = int(round(eta_s))
    parts.append(f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
    return "  ".join(parts)
