"""Optimizer-step throughput and peak memory: SimPO vs DPO (live reference) vs DPO (precomputed).

    python bench/bench_step.py --shape 8b-width                 # the primary rows (one H100)
    python bench/bench_step.py --shape 1b
    python bench/bench_step.py --shape 8b-width --precision fp8 --tag fp8
    python bench/bench_step.py --shape tiny --steps 1 --warmup 1  # CPU smoke run (the test)

What it measures. Three rows on the same model shape (bench/synthetic.py: random weights, no
checkpoint), the same random full-row pairs (no padding) and the same layout: ``simpo`` (loss
simpo), ``dpo_live_ref`` (loss dpo, a frozen reference copy running forward-only in the step) and
``dpo_precomputed`` (loss dpo, reference log-probs read from a ``megasimpo score`` file; the values
are those of a uniform model, -tokens x ln(vocab), since only their counts matter for timing).
Each row is ``Trainer(cfg, random_init=shape).train_step`` for ``--warmup`` + ``--steps`` steps,
world size 1, in its own child process (this script again with a hidden ``--_row``), so the
peak-memory counter and Megatron's global state start clean and a failing row (CUDA OOM) is
recorded as ``{"error": ...}`` without stopping the others.

Per row, over the timed steps: mean step_time_s, tokens_per_sec, tflops_per_gpu and mfu (from
megasimpo.metrics: Megatron's FLOP formula with causal-halved attention, training = 3x forward
plus one forward per live reference; peak 989 dense BF16 / 1979 FP8 TFLOP/s on H100; mfu is null on
CPU), the process's peak memory (``torch.cuda.max_memory_allocated``, and ``max_memory_reserved`` as
mem_reserved_peak_gb; peak RSS on CPU), the planner's choices (layout, recompute, micro-batch
size and count, its predicted memory), every step's time and loss. Derived: the SimPO / DPO(live)
step-time ratio, and the DPO(live) - SimPO peak-memory difference next to the reference weights'
bytes (num_parameters x bytes per parameter).

Where results go: merged into ``--out`` (default bench/results/<device>.json, bench/report.py)
under ``runs["<shape>[-<tag>]"]`` (``config`` + one entry per row + derived figures). The
top-level ``simpo`` / ``dpo_live_ref`` / ``dpo_precomputed`` rows and
``simpo_over_dpo_live_step_time`` mirror the *primary* run only: no ``--tag`` and the device's
default shape (8b-width on CUDA, tiny on CPU). Variants (fp8, --logprob-chunk 0, other layers or
lengths) should carry a --tag so they never replace the primary figures. Rows not measured by a
run keep their previous figures; derived figures are recomputed from what the file then holds.
"""

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import report  # noqa: E402
import synthetic  # noqa: E402

ROWS = {"simpo": ("simpo", "live"), "dpo_live_ref": ("dpo", "live"),
        "dpo_precomputed": ("dpo", "precomputed")}  # row -> (loss, ref)
# Every row carries all of these (None when unmeasured): report.merge_results merges nested dicts
# key by key, so a fixed key set makes a new row replace an old one (an old "error" included).
ROW_KEYS = ("step_time_s", "tokens_per_sec", "tflops_per_gpu", "mfu", "mem_peak_gb",
            "mem_reserved_peak_gb", "step_times_s", "losses", "loss_finite", "num_skipped",
            "layout", "recompute", "packed", "micro_batch_size", "num_microbatches",
            "planned_mem_gb",
            "error")
TABLE = ["step_time_s", "tokens_per_sec", "tflops_per_gpu", "mfu", "mem_peak_gb",
         "micro_batch_size", "num_microbatches", "recompute"]
MARKER = "BENCH_STEP_ROW "  # prefix of the child's result line on stdout


def parse_args(argv=None):
    """Command-line options; defaults depend on whether CUDA is present."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    synthetic.add_workload_args(p)
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
    p.add_argument("--precision", choices=["bf16", "fp8", "fp32"], default=None,
                   help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=None,
                   help="full activation recompute (default: what the planner picks for DPO "
                        "with a live reference, the most demanding row, for every row)")
    p.add_argument("--logprob-chunk", type=int, default=None,
                   help="TrainConfig.logprob_chunk (0: plain full-logits path; default: its default)")
    p.add_argument("--attention-backend", choices=["auto", "te", "sdpa", "unfused"], default="auto",
                   help="TrainConfig.attention_backend (auto: te with Transformer Engine, else sdpa)")
    p.add_argument("--row-timeout", type=float, default=3600.0, help="seconds per row process")
    p.add_argument("--_row", choices=sorted(ROWS), help=argparse.SUPPRESS)
    p.add_argument("--_workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in args.rows:
        if r not in ROWS:
            p.error(f"--rows: unknown row {r!r}; choose from {', '.join(ROWS)}")
    synthetic.check_workload_args(p, args)
    if args.precision == "fp8":
        from megasimpo.model import have_te

        if not have_te():
            p.error("--precision fp8 needs Transformer Engine on a CUDA GPU")
    return args


def uniform_scores(lengths: np.ndarray, vocab_size: int) -> np.ndarray:
    """[n, 4] score rows (score.FIELDS order) a uniform model would give pairs of ``lengths`` [n, 3]."""
    tokens = lengths[:, 1:].astype(np.float64)
    return np.concatenate([-tokens * math.log(vocab_size), tokens], axis=1)


def prepare_inputs(workdir: str, args, model_cfg) -> str:
    """Writes the pairs (and, when a precomputed-reference row runs, their score file)."""
    from megasimpo.data.batches import ConcatPairs
    from megasimpo.score import default_scores_path, write_scores

    prefix = os.path.join(workdir, "pairs")
    num_pairs = args.global_batch_size * (args.warmup + args.steps)
    synthetic.write_dataset(prefix, num_pairs, args.seq_length, model_cfg.vocab_size)
    if "dpo_precomputed" in args.rows:
        lengths = ConcatPairs([prefix]).lengths()
        write_scores(default_scores_path(prefix), uniform_scores(lengths, model_cfg.vocab_size))
    return prefix


def shared_layout(args, model_cfg) -> tuple:
    """(recompute, micro_batch_size) every row uses: the flags, else the planner's choice for the
    most demanding row, DPO with a live reference, so all rows time the same layout."""
    if args.recompute is not None:
        return args.recompute, args.micro_batch_size
    from megasimpo import planner
    from megasimpo.model import resolve_attention_backend

    if torch.cuda.is_available():
        mem = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1e9
    else:
        import psutil

        mem = psutil.virtual_memory().total / 1e9
    extra = {} if args.logprob_chunk is None else {"logprob_chunk": args.logprob_chunk}
    plan = planner.plan(model_cfg, 1, gpu_mem_gb=mem, seq_length=args.seq_length, loss="dpo",
                        ref="live", global_batch_size=args.global_batch_size,
                        attention_backend=resolve_attention_backend(args.attention_backend),
                        **extra,
                        overrides=dict(tp=1, pp=1, cp=1, micro_batch_size=args.micro_batch_size))
    return plan.recompute, plan.micro_batch_size


def measure_row(args, name: str) -> dict:
    """Child process: one row's warm-up + timed steps on random weights; its summary dict."""
    from megasimpo.config import LossConfig, TrainConfig
    from megasimpo.metrics import peak_memory_gb
    from megasimpo.model import Precision
    from megasimpo.parallel import groups as pgroups
    from megasimpo.score import default_scores_path
    from megasimpo.trainer import Trainer

    loss, ref = ROWS[name]
    model_cfg = synthetic.shape(args.shape, args.layers)
    recompute, micro_batch_size = shared_layout(args, model_cfg)
    prefix = os.path.join(args._workdir, "pairs")
    extra = {} if args.logprob_chunk is None else {"logprob_chunk": args.logprob_chunk}
    cfg = TrainConfig(
        load="<random>", data=(prefix,), out=os.path.join(args._workdir, name),
        loss=LossConfig(name=loss), ref=ref,
        ref_logps=(default_scores_path(prefix),) if ref == "precomputed" else (),
        global_batch_size=args.global_batch_size, micro_batch_size=micro_batch_size,
        seq_length=args.seq_length, steps=args.warmup + args.steps,
        precision=args.precision or Precision.default().name, recompute=recompute,
        tp=1, pp=1, cp=1, attention_backend=args.attention_backend, **extra)
    try:
        trainer = Trainer(cfg, random_init=model_cfg)
        steps = [trainer.train_step(s) for s in range(args.warmup + args.steps)]
    finally:
        pgroups.destroy()
    timed = steps[args.warmup:]
    cuda = torch.cuda.is_available()
    losses = [r["loss"] for r in steps]
    return {
        **{k: report.mean([r[k] for r in timed])
           for k in ("step_time_s", "tokens_per_sec", "tflops_per_gpu", "mfu")},
        "mem_peak_gb": peak_memory_gb(),
        "mem_reserved_peak_gb": torch.cuda.max_memory_reserved() / 1e9 if cuda else None,
        "step_times_s": [r["step_time_s"] for r in timed], "losses": losses,
        "loss_finite": all(math.isfinite(v) for v in losses),
        "num_skipped": sum(r["skipped"] for r in steps),
        "layout": dataclasses.asdict(trainer.layout), "recompute": trainer.plan.recompute,
        "packed": trainer.pack,
        "micro_batch_size": trainer.micro_batch_size,
        "num_microbatches": trainer.num_microbatches,
        "planned_mem_gb": round(trainer.plan.memory.total, 2), "error": None,
    }


def run_row(name: str, argv: list, workdir: str, timeout: float) -> dict:
    """Parent: runs one row in a fresh process; its summary, or {"error": ...} when it failed."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_row", name, "--_workdir", workdir]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        row = {"error": f"timed out after {timeout:g} s"}
    else:
        found = [line for line in p.stdout.splitlines() if line.startswith(MARKER)]
        if found:
            row = json.loads(found[-1][len(MARKER):])
        else:
            tail = [line for line in p.stderr.splitlines() if line.strip()]
            row = {"error": f"exit code {p.returncode}: {tail[-1] if tail else 'no output'}"}
        if row.get("error"):
            sys.stderr.write(p.stderr[-4000:])
    return {k: row.get(k) for k in ROW_KEYS}


def derived(rows: dict, bytes_per_param: int, num_parameters: int) -> dict:
    """SimPO/DPO(live) step-time ratio and DPO(live) - SimPO peak memory beside the reference bytes."""
    simpo, live = rows.get("simpo") or {}, rows.get("dpo_live_ref") or {}
    ratio = mem = None
    if simpo.get("step_time_s") and live.get("step_time_s"):
        ratio = simpo["step_time_s"] / live["step_time_s"]
    if simpo.get("mem_peak_gb") is not None and live.get("mem_peak_gb") is not None:
        mem = live["mem_peak_gb"] - simpo["mem_peak_gb"]
    return {"simpo_over_dpo_live_step_time": ratio, "dpo_live_minus_simpo_mem_gb": mem,
            "reference_weights_gb": num_parameters * bytes_per_param / 1e9}


def run_config(args, model_cfg, precision: str, device: str) -> dict:
    """Everything that defines the run: options, resolved shape and software versions."""
    from importlib.metadata import version

    from megasimpo.config import TrainConfig
    from megasimpo.model import have_te, resolve_attention_backend

    options = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    chunk = args.logprob_chunk
    if chunk is None:
        chunk = TrainConfig.__dataclass_fields__["logprob_chunk"].default
    return {**options, "layers": model_cfg.num_layers, "precision": precision,
            "logprob_chunk": chunk, "device": device, "model": model_cfg.to_dict(),
            "num_parameters": model_cfg.num_parameters,
            "num_pairs": args.global_batch_size * (args.warmup + args.steps),
            "torch": torch.__version__, "megatron_core": version("megatron-core"),
            "transformer_engine": have_te(),
            "attention_backend": resolve_attention_backend(args.attention_backend)}


def main(argv=None):
    """Runs the rows (each in a child process), prints the table and merges the JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args._row:  # child: one row, one JSON line back
        try:
            row = measure_row(args, args._row)
        except Exception as e:  # e.g. CUDA OOM: reported as the row's error, parent goes on
            traceback.print_exc()
            row = {"error": f"{type(e).__name__}: {e}"[:2000]}
        print(MARKER + json.dumps(row), flush=True)
        return

    from megasimpo.model import Precision

    model_cfg = synthetic.shape(args.shape, args.layers)
    precision = args.precision or Precision.default().name
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench_step_") as workdir:
        prepare_inputs(workdir, args, model_cfg)
        for name in args.rows:
            print(f"bench_step: {name} ...", file=sys.stderr, flush=True)
            rows[name] = run_row(name, argv, workdir, args.row_timeout)
    device = report.device_name()  # after the rows: this parent never holds GPU memory during them
    key = args.shape + (f"-{args.tag}" if args.tag else "")
    primary = not args.tag and args.shape == synthetic.default_shape()
    path = report.results_path(args.out)
    update = {"device": device, "runs": {key: {"config": run_config(args, model_cfg, precision,
                                                                    device), **rows}}}
    if primary:
        update.update(rows)
    merged = report.merge_results(path, update)
    figures = (Precision(name=precision).dtype.itemsize, model_cfg.num_parameters)
    extra = {"runs": {key: derived(merged["runs"][key], *figures)}}
    if primary:
        extra.update(derived(merged, *figures))
    merged = report.merge_results(path, extra)

    columns = TABLE + (["mem_reserved_peak_gb"] if torch.cuda.is_available() else [])
    columns += ["error"] if any(r["error"] for r in rows.values()) else []
    print(f"\n{key}: {model_cfg.num_layers} layers, seq {args.seq_length}, "
          f"{args.global_batch_size} pairs/step, {precision}, {args.steps} timed steps, {device}\n")
    print(report.markdown_table(rows, columns))
    d = merged["runs"][key]

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    print(f"\nSimPO / DPO(live) step time: {fmt(d['simpo_over_dpo_live_step_time'], '.3f')}; "
          f"peak memory DPO(live) - SimPO: {fmt(d['dpo_live_minus_simpo_mem_gb'], '.3g')} GB "
          f"(reference weights: {d['reference_weights_gb']:.3g} GB)")
    print(f"wrote {path} (runs[{key!r}]{', top-level rows' if primary else ''})")


if __name__ == "__main__":
    main()
