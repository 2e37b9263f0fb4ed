"""The run directory (``--out``): who may write it, whether a start resumes, what it says it is.

Rules, all checked by rank 0 before anything is built and agreed by every rank:

- ``--out`` must neither be nor contain ``--load`` (a finished run would replace its own input).
- One run at a time: ``RUN_DIR/.megasimpo.lock`` names the holder (host, pid, process start
  time). A lock whose process is gone (same host) is stale and taken over; a live holder, or one
  on another host (which cannot be checked from here), is an error that says how to proceed.
- A finished run (``status.json`` says so, or ``final_model`` exists) is not trained again
  without ``--force``.
- A resume compares the new run configuration with the one the checkpoint was written under:
  identical -> resume; only ``SAFE_TO_CHANGE`` fields differ -> resume and print them; anything
  else -> an error naming the fields, unless ``--resume-anyway``.

``RUN_DIR/status.json`` (rank 0, replaced atomically) is what a requeue script reads:
``{"state": "running"|"stopped"|"finished"|"failed", "step": N, "steps": N, "checkpoint": PATH
or null, "reason": str, "host": str, "pid": int, "time": ISO-8601}``.
"""

import dataclasses
import json
import os
import socket
import time
from typing import Optional

from megasimpo import atomic
from megasimpo.run_paths import FINAL_MODEL, STATUS_FILE
from megasimpo.config import TrainConfig

LOCK_FILE = ".megasimpo.lock"
METRICS_FILE = "metrics.jsonl"
# Fields that may differ between a run and its resume without --resume-anyway. The schedule
# (steps, epochs), how often things happen, held-out data and the layout (a checkpoint loads at
# any layout; the math is the same). Everything else changes what is being trained.
SAFE_TO_CHANGE = ("steps", "epochs", "eval_data", "eval_interval", "save_interval",
                  "exit_interval", "log_interval", "keep_checkpoints", "max_skipped_steps",
                  "tp", "pp", "vpp", "cp", "sequence_parallel", "micro_batch_size", "recompute",
                  "gpu_mem_gb", "attention_backend", "pack", "logprob_chunk",
                  "overlap_grad_reduce", "overlap_param_gather", "progress",
                  "first_stage_layers", "last_stage_layers", "ep", "etp", "moe_dispatcher")
NOT_RUN_CONFIG = ("out", "force", "resume_anyway")  # how this start behaves, not what it trains
PATH_FIELDS = ("load", "data", "eval_data", "ref_logps")


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def run_record(cfg: TrainConfig) -> dict:
    """The run configuration a checkpoint is written under: ``cfg.to_dict()`` with real paths
    (a resume from another working directory compares the files, not the spellings)."""
    record = cfg.to_dict()
    for key in PATH_FIELDS:
        value = record.get(key)
        if isinstance(value, str):
            record[key] = _real(value)
        elif value:
            record[key] = [_real(v) for v in value]
    for key in NOT_RUN_CONFIG:
        record.pop(key, None)
    return record


def replay_record(cfg: TrainConfig) -> dict:
    """RUN_DIR/config.yaml's ``run:`` section: the run record with its ``--out`` first, so that
    ``train --config RUN_DIR/config.yaml`` replays the run (and ``--out NEW`` replays it
    elsewhere). ``--force`` and ``--resume-anyway`` are about one start, so they are not in it."""
    return {"out": _real(cfg.out), **run_record(cfg)}


def _flat(record: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = list(value) if isinstance(value, tuple) else value
    return out


def config_changes(old: dict, new: dict) -> tuple:
    """(safe, unsafe): lists of (field, old value, new value) between two run records. A field
    one record lacks (written by another version) counts as its default in the other."""
    old_flat, new_flat = _flat(old), _flat(new)
    defaults = _flat(run_record_defaults())
    safe, unsafe = [], []
    for key in sorted(set(old_flat) | set(new_flat)):
        a = old_flat.get(key, defaults.get(key))
        b = new_flat.get(key, defaults.get(key))
        if key == "ref_logps":  # only the training part of the reference is the run's
            n = len(new_flat.get("data") or [])
            a, b = (a or [])[:n], (b or [])[:n]
        if a != b:
            (safe if key in SAFE_TO_CHANGE else unsafe).append((key, a, b))
    return safe, unsafe


def run_record_defaults() -> dict:
    """Default values of every TrainConfig field (loss fields nested as in ``to_dict``)."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def _describe(changes) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)


def resume_decision(checkpoint_path: str, old: dict, new: dict, resume_anyway: bool) -> list:
    """Messages to print for a resume from ``checkpoint_path``; ValueError when a field outside
    ``SAFE_TO_CHANGE`` differs and ``resume_anyway`` is off."""
    safe, unsafe = config_changes(old, new)
    notes = []
    if unsafe and not resume_anyway:
        raise ValueError(
            f"{checkpoint_path} was written by a run with another configuration ("
            f"{_describe(unsafe)}); resuming it would continue that run, not start this one. "
            "Use a new --out for a new run, or pass --resume-anyway to continue it with the "
            "new values")
    if unsafe:
        notes.append(f"--resume-anyway: resuming with changed {_describe(unsafe)}")
    if safe:
        notes.append(f"resuming with changed {_describe(safe)}")
        if any(k in ("steps", "epochs") for k, _, _ in safe):
            notes.append("the LR schedule is recomputed for the new number of steps")
    return notes


# ----- the lock -----------------------------------------------------------------------------

def _process_start(pid: int) -> Optional[float]:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "process_start": _process_start(os.getpid()), "since": time.strftime("%FT%T%z")}


def _is_stale(holder: dict) -> bool:
    """True when the lock's process is gone (or its pid now belongs to another process)."""
    if holder.get("host") != socket.gethostname():
        return False
    if holder.get("pid") == os.getpid():  # an earlier Trainer of this process that was not closed
        return True
    started = _process_start(int(holder.get("pid", -1)))
    if started is None:
        return True
    recorded = holder.get("process_start")
    return recorded is not None and abs(started - recorded) > 1.0


class RunLock:
    """Exclusive ownership of a run directory by one process (rank 0 of a run)."""

    def __init__(self, run_dir: str, created: bool = False):
        """``created``: this start made ``run_dir``, so releasing removes it again if empty
        (a start that failed its checks leaves nothing behind)."""
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.created = created
        self.held = False

    def acquire(self) -> None:
        """Takes the lock (or a stale one); ValueError naming the holder if it is taken."""
        me = _holder()
        tmp = f"{self.path}.{me['pid']}.tmp"
        with open(tmp, "w") as f:
            json.dump(me, f)
        try:
            for _ in range(2):
                try:
                    os.link(tmp, self.path)  # atomic, and the file is complete when it appears
                    self.held = True
                    return
                except FileExistsError:
                    pass
                try:
                    with open(self.path) as f:
                        holder = json.load(f)
                except (OSError, ValueError):
                    holder = {}
                if holder and not _is_stale(holder):
                    raise ValueError(
                        f"{os.path.dirname(self.path)} is in use by another run (pid "
                        f"{holder.get('pid')} on {holder.get('host')} since {holder.get('since')}); "
                        "wait for it or use another --out. If that process is dead (another host "
                        f"cannot be checked from here), delete {self.path}")
                print(f"megasimpo train: taking over the stale lock of pid {holder.get('pid')} "
                      f"on {holder.get('host')} ({self.path})", flush=True)
                os.remove(self.path)
            raise ValueError(f"{self.path}: could not take the lock; another run started at the "
                             "same moment?")
        finally:
            os.remove(tmp)

    def release(self) -> None:
        """Removes the lock if this process still holds it."""
        if not self.held:
            return
        self.held = False
        try:
            with open(self.path) as f:
                if json.load(f).get("pid") != os.getpid():
                    return
            os.remove(self.path)
            if self.created and not os.listdir(os.path.dirname(self.path)):
                os.rmdir(os.path.dirname(self.path))
        except (OSError, ValueError):
            pass


# ----- status and metrics -------------------------------------------------------------------

def read_status(run_dir: str) -> Optional[dict]:
    """RUN_DIR/status.json, or None when there is none."""
    path = os.path.join(run_dir, STATUS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it if the run is not finished")


def write_status(run_dir: str, state: str, *, step: int, steps: int,
                 checkpoint: Optional[str] = None, reason: str = "") -> None:
    """Replaces RUN_DIR/status.json (call on rank 0)."""
    atomic.write_json(os.path.join(run_dir, STATUS_FILE), {
        "state": state, "step": step, "steps": steps, "checkpoint": checkpoint,
        "reason": reason, "host": socket.gethostname(), "pid": os.getpid(),
        "time": time.strftime("%FT%T%z")})


def check_not_finished(run_dir: str, force: bool) -> None:
    """ValueError when ``run_dir`` holds a finished run and ``force`` is off."""
    status = read_status(run_dir) or {}
    final = os.path.join(run_dir, FINAL_MODEL)
    if force or not (status.get("state") == "finished" or os.path.isdir(final)):
        return
    when = f" at step {status['step']}" if "step" in status else ""
    raise ValueError(
        f"{run_dir} is a finished run{when} (its model is {final}). To train further, start a "
        f"new run from it: --load {final} --out NEW_DIR; --force trains into {run_dir} again and "
        "replaces its final_model")


def truncate_metrics(run_dir: str, start_step: int) -> None:
    """Keeps only the metric rows of steps a resume at ``start_step`` will not redo (none for a
    start from step 0). A torn last line (a crash mid-write) is dropped; any other line that is
    not JSON is an error naming the file and line."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    keep = []
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            if lineno == len(lines):  # no newline after it: the write that died
                print(f"megasimpo train: {path}:{lineno}: dropping an incomplete last row",
                      flush=True)
                continue
            # json's own message says "line 1" of the one line it was given: name the file's
            why = f"{e.msg}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
            raise ValueError(f"{path}:{lineno}: not a JSON metrics row ({why}); fix or delete "
                             "that line, then run the same command again") from None
        if start_step > 0 and row.get("step", 0) <= start_step:
            keep.append(raw.decode() + "\n")
    atomic.write_text(path, "".join(keep))


# ----- a start ------------------------------------------------------------------------------

def _recorded_config(checkpoint_path: str, meta: dict, run_dir: str) -> Optional[dict]:
    """The run record a checkpoint was written under: its own, else RUN_DIR/config.yaml's (for
    checkpoints of versions that did not store it)."""
    if "run" in meta:
        return meta["run"]
    path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(path):
        import yaml

        with open(path) as f:
            record = (yaml.safe_load(f) or {}).get("run")
        return {k: v for k, v in record.items() if k not in NOT_RUN_CONFIG} if record else None
    return None


def prepare(cfg: TrainConfig, model: dict) -> tuple:
    """Rank 0's checks before a run starts: paths, the lock, a finished run, the resume rules.
    ``model``: the ModelConfig dict of the model being trained (a resume must match it).

    Returns (the held RunLock, messages to print); ValueError for anything that stops the start.
    """
    from megasimpo import checkpoint, checkpoint_meta

    if cfg.load and not cfg.load.startswith("<"):  # "<random>": benchmarks' random weights
        atomic.check_out_not_over_input(cfg.out, cfg.load)
    try:
        created = not os.path.isdir(cfg.out)
        os.makedirs(cfg.out, exist_ok=True)
        lock = RunLock(cfg.out, created)
        lock.acquire()
    except OSError as e:
        raise ValueError(f"--out {cfg.out}: cannot write there ({e.strerror or e}); choose a "
                         "writable directory") from None
    try:
        final = os.path.join(cfg.out, FINAL_MODEL)
        atomic.recover(final)
        atomic.delete(final + atomic.PARTIAL_SUFFIX)  # a final save that died; never complete
        check_not_finished(cfg.out, cfg.force)
        notes = []
        latest = checkpoint.latest_checkpoint(cfg.out)
        if latest is not None:
            meta = checkpoint_meta.read_meta(latest)
            if meta.get("model") != model:
                diff = sorted(k for k in set(model) | set(meta.get("model", {}))
                              if model.get(k) != meta.get("model", {}).get(k))
                raise ValueError(
                    f"{latest} holds another model than --load {cfg.load} (differs in "
                    f"{', '.join(diff)}); it cannot be resumed with it: use a new --out")
            old = _recorded_config(latest, meta, cfg.out)
            if old is None:
                notes.append(f"{latest} records no run configuration; resuming without comparing")
            else:
                notes += resume_decision(latest, old, run_record(cfg), cfg.resume_anyway)
        return lock, notes
    except BaseException:
        lock.release()
        raise


def resolved_record(trainer) -> dict:
    """Every derived choice of a ``trainer.Trainer``'s run (printed and saved as config.yaml)."""
    t = trainer
    lay = t.layout
    return {
        "run": replay_record(t.cfg),  # a valid --config
        "model": t.model_cfg.to_dict(),
        "layout": dataclasses.asdict(lay),
        "plan": t.plan.to_dict(),
        "derived": {
            "world_size": lay.world_size, "precision": t.precision.name,
            "seq_length": t.seq_length, "micro_batch_size": t.micro_batch_size,
            "recompute": t.plan.recompute, "packed_sequences": t.pack,
            "overlap_grad_reduce": t.overlap_grad_reduce,
            "overlap_param_gather": t.overlap_param_gather,
            "num_microbatches": t.num_microbatches, "steps": t.num_steps,
            "warmup_steps": t.warmup_steps, "beta": t.cfg.loss.beta,
            "train_pairs": len(t.train_data),
            "eval_pairs": len(t.eval_data) if t.eval_data else 0,
            "pairs_dropped_per_epoch": t.sampler.dropped_per_epoch,
            "pairs_prompt_truncated": t.num_truncated,
            "attention_backend": t.attention_backend,
            "transformer_engine": t.attention_backend == "te",
            "lora_rank": t.cfg.lora.rank,
            "trainable_parameters": t.plan.trainable_parameters,
            "total_parameters": t.plan.total_parameters,
        },
    }
