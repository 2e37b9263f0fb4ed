"""SimPO vs DPO at two LoRA ranks on the same pairs and steps (issue #16 item 6), with a decision.

    python examples/ablation_2x2.py --out DIR [--load CKPT --data PREFIX --eval-data PREFIX]
        [--ranks 16 8] [--steps N] [--lr LR] [--batch N] [--eval-interval N] [--seed 0]
        [--nproc-per-node N] [--jobs J] [--quick] [--force] [-- TRAIN FLAGS ...]

Four cells, each a `megasimpo train` child with `--lora-rank R --lora-alpha 2R`: SimPO
(its default beta and gamma) and DPO with `--ref live` (under LoRA the same model with its adapters
off), on the same pairs, steps, learning rate and seed. Then the cells are compared by
`megasimpo.compare_runs` (the rule is in its docstring; `tools/review_run.py RUN_A RUN_B ...` runs
the same comparison) and DIR/ablation.md, ablation.json and ablation.png are written. The markdown
starts with the exact command and the set-up; the reading of the numbers is left to whoever looks
at them.

Without --load/--data/--eval-data the script builds its own inputs under DIR: the "injected" task
of examples/ranking_accuracy.py (digit rules; chosen = the correct answer, rejected = one injected
error; the chosen response has the longer commentary in 70% of pairs), a tiny Llama from a random
init, and an SFT stage on the chosen responses; the LoRA cells then start from the SFT model (also
the DPO reference). The training set is small so that the cells see each pair several times: the
train/held-out margin gap only measures over-fitting once pairs repeat. --quick shrinks everything
(no SFT, a few steps) to check the pipeline in a test, not the outcome.

On a GPU node, `--nproc-per-node N` launches each cell with `torch.distributed.run` on N GPUs
(--jobs then defaults to 1: one cell at a time), and flags after `--` go to every cell's
`megasimpo train` unchanged (e.g. `-- --tp 8 --seq-length 2048 --save-interval 200`). Flags
that define a cell (loss, LoRA rank, data, steps, ...) are the script's own and are refused
there. Across nodes, train the four cells as four jobs with the same flags and compare them with
`tools/review_run.py RUN_A RUN_B RUN_C RUN_D`: the same comparison and rule.
"""

import argparse
import dataclasses
import os
import shlex
import shutil
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # runnable from a checkout without installing
sys.path.insert(0, os.path.join(REPO, "examples"))
import ranking_accuracy as ra  # noqa: E402  (the sibling study: task, model, child processes)

LOSSES = ("simpo", "dpo")
# train flags each cell's command sets itself: not accepted after "--"
OWN_TRAIN_FLAGS = ("--load", "--data", "--eval-data", "--out", "--loss", "--lora-rank", "--lora-alpha",
                   "--steps", "--epochs", "--lr", "--global-batch-size", "--eval-interval", "--seed",
                   "--precision", "--ref", "--ref-logps", "--config", "--micro-batch-size")


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes and schedules of one ablation (the data sizes only when the script builds the data)."""

    num_train: int = 512  # injected pairs; steps * batch / num_train = epochs over them
    num_eval: int = 512  # held-out pairs (prompts never in training)
    sft_steps: int = 600  # SFT of the random init on the chosen responses (0: none)
    sft_lr: float = 3e-3
    steps: int = 240  # preference steps per cell: 15 epochs of 512 pairs at batch 32
    lr: float = 2e-3
    batch: int = 32
    eval_interval: int = 40


QUICK = Scale(num_train=64, num_eval=32, sft_steps=0, steps=3, batch=16, eval_interval=0)


# ----- inputs -----------------------------------------------------------------------------------

def check_inputs(p: argparse.ArgumentParser, args) -> None:
    """Bad flags or missing files end here with a line naming the flag (argparse's exit 2)."""
    given = [f for f in ("load", "data", "eval_data") if getattr(args, f)]
    if given and len(given) < 3:
        missing = [f"--{f.replace('_', '-')}" for f in ("load", "data", "eval_data") if f not in given]
        p.error(f"--load, --data and --eval-data go together (missing {', '.join(missing)}); "
                "give none of them to let the script build a tiny base and data")
    if args.load and not os.path.isfile(os.path.join(args.load, "megasimpo.json")):
        p.error(f"--load {args.load}: not a megasimpo checkpoint (no megasimpo.json; "
                "convert an HF model with tools/convert_hf.py import)")
    for flag, prefix in (("--data", args.data), ("--eval-data", args.eval_data)):
        for ext in (".bin", ".idx"):
            if prefix and not os.path.isfile(prefix + ext):
                p.error(f"{flag} {prefix}: no {prefix}{ext} (a prefix written by "
                        "tools/preprocess_data.py)")
    if len(args.ranks) < 1 or len(set(args.ranks)) != len(args.ranks) or min(args.ranks) < 1:
        p.error(f"--ranks {' '.join(map(str, args.ranks))}: give distinct LoRA ranks >= 1")
    for flag in ("steps", "batch", "jobs"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            p.error(f"--{flag} {v} must be >= 1")
    if args.lr is not None and args.lr <= 0:
        p.error(f"--lr {args.lr} must be positive")
    if args.nproc_per_node < 1:
        p.error(f"--nproc-per-node {args.nproc_per_node} must be >= 1")
    for flag in args.train_flags:
        name = flag.split("=", 1)[0]
        if name in OWN_TRAIN_FLAGS:
            hint = {"--micro-batch-size": "use --micro-batch-size before --",
                    "--precision": "use --precision before --"}.get(name, "the script sets it per cell")
            p.error(f"{flag} after --: {hint} (after -- go train flags the cells share, e.g. --tp)")
    runs = os.path.join(args.out, "runs")
    if os.path.exists(runs) and not args.force:
        p.error(f"--out {args.out}: {runs} exists (an earlier ablation); pass --force to redo it")
    out = os.path.realpath(args.out)
    for flag, path in (("--load", args.load), ("--data", args.data), ("--eval-data", args.eval_data)):
        if path and os.path.realpath(path).startswith(out + os.sep):
            p.error(f"{flag} {path} is inside --out {args.out}, which this script rewrites; "
                    "put the ablation elsewhere")


def build_inputs(out: str, scale: Scale, seed: int, jobs) -> tuple:
    """The injected-pairs task, a random init and its SFT under OUT; (load, data, eval_data)."""
    from megasimpo.data.indexed import write_pairs

    rng, held_out = np.random.default_rng(seed), set()
    eval_pairs = ra.injected_pairs(ra.task_prompts(scale.num_eval, rng, held_out, unique=True), rng)
    train_pairs = ra.injected_pairs(ra.task_prompts(scale.num_train, rng, held_out), rng)
    data, eval_data = os.path.join(out, "data", "train"), os.path.join(out, "data", "eval")
    write_pairs(data, train_pairs, ra.VOCAB)
    write_pairs(eval_data, eval_pairs, ra.VOCAB)
    init = os.path.join(out, "base", "init")
    jobs({"init": [sys.executable, "-c",
                   "import sys; from megasimpo.config import ModelConfig; "
                   "from megasimpo.demo import write_random_model; "
                   f"write_random_model(sys.argv[1], ModelConfig(**{ra.model_config().to_dict()!r}),"
                   f" {seed})", init]})
    if not scale.sft_steps:
        return init, data, eval_data
    sft = os.path.join(out, "base", "sft")
    jobs({"sft": ra.megasimpo("train", "--load", init, "--data", data, "--out", sft, "--loss", "sft",
                              "--steps", scale.sft_steps, "--lr", scale.sft_lr,
                              "--global-batch-size", scale.batch, "--micro-batch-size", scale.batch,
                              "--seed", seed, "--precision", "fp32")})
    return os.path.join(sft, "final_model"), data, eval_data


def cell_argv(load, data, eval_data, run_dir, loss, rank, scale, args) -> list:
    """``megasimpo train`` of one cell: LoRA rank R, alpha 2R; one process, or
    ``torch.distributed.run`` of ``--nproc-per-node`` ranks; the shared train flags last."""
    extra = ["--ref", "live"] if loss == "dpo" else []
    if args.micro_batch_size:
        extra += ["--micro-batch-size", args.micro_batch_size]
    elif not args.load:  # the tiny built model: one micro-batch per step
        extra += ["--micro-batch-size", scale.batch]
    argv = ra.megasimpo("train", "--load", load, "--data", data, "--eval-data", eval_data,
                        "--out", run_dir, "--loss", loss, "--lora-rank", rank,
                        "--lora-alpha", 2 * rank, "--steps", scale.steps, "--lr", scale.lr,
                        "--global-batch-size", scale.batch, "--eval-interval", scale.eval_interval,
                        "--seed", args.seed, "--precision", args.precision, *extra,
                        *args.train_flags)
    if args.nproc_per_node > 1:  # python -m megasimpo ... -> python -m torch.distributed.run ...
        argv[1:1] = ["-m", "torch.distributed.run", "--standalone",
                     f"--nproc-per-node={args.nproc_per_node}"]
    return argv


def preamble(argv: list, args, scale: Scale, built: bool, wall_s: float) -> str:
    """What the markdown says about how the cells were made."""
    from megasimpo.config import LossConfig

    simpo = LossConfig(name="simpo")
    cmd = "python examples/ablation_2x2.py " + " ".join(shlex.quote(a) for a in argv)
    lines = ["Command:", "", "```", cmd, "```", ""]
    if built:
        m = ra.model_config()
        lines.append(
            f"Inputs built by the script (seed {args.seed}): the injected-pairs task of "
            f"`examples/ranking_accuracy.py`, {scale.num_train} training and {scale.num_eval} "
            f"held-out pairs (held-out prompts never in training), a {m.num_layers}-layer Llama "
            f"(hidden {m.hidden_size}, vocabulary {m.vocab_size}) from a random init"
            + (f", then {scale.sft_steps} SFT steps (lr {scale.sft_lr:g}) on the chosen responses; "
               "the cells start from the SFT model." if scale.sft_steps else
               "; the cells start from the random init (no SFT)."))
    else:
        lines.append(f"Inputs: `--load {args.load}`, `--data {args.data}`, "
                     f"`--eval-data {args.eval_data}`.")
    epochs = scale.steps * scale.batch / scale.num_train if built else None
    lines += ["", f"Cells: {', '.join(LOSSES)} x LoRA ranks {', '.join(map(str, args.ranks))} "
              f"(alpha = 2r), {scale.steps} steps of {scale.batch} pairs"
              + (f" ({epochs:.1f} epochs)" if epochs else "")
              + f", lr {scale.lr:g} (cosine), seed {args.seed}, precision {args.precision}; each "
              f"loss at its default beta (SimPO {simpo.beta} with gamma/beta "
              f"{simpo.gamma_beta_ratio}, DPO {LossConfig(name='dpo').beta}); DPO with "
              f"`--ref live`. Wall time {wall_s:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="ablation_2x2", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, metavar="DIR", help="ablation directory")
    p.add_argument("--load", metavar="CKPT", help="base checkpoint (default: build a tiny one)")
    p.add_argument("--data", metavar="PREFIX", help="training pairs (with --load)")
    p.add_argument("--eval-data", metavar="PREFIX", help="held-out pairs (with --load)")
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 8], metavar="R",
                   help="LoRA ranks (alpha = 2r); default 16 8")
    p.add_argument("--steps", type=int, help="preference steps per cell")
    p.add_argument("--lr", type=float, help="peak learning rate of every cell")
    p.add_argument("--batch", type=int, help="pairs per step (--global-batch-size)")
    p.add_argument("--eval-interval", type=int, help="steps between held-out evaluations")
    p.add_argument("--micro-batch-size", type=int, help="default: the planner's (built data: --batch)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                   help="ranks per cell (torch.distributed.run); default 1, one process")
    p.add_argument("--jobs", type=int, default=None,
                   help="cells trained at a time; default 2, or 1 with --nproc-per-node > 1")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, no SFT, 3 steps: checks the pipeline, not the outcome")
    p.add_argument("--force", action="store_true", help="redo an ablation already in --out")
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.train_flags = argv[split + 1:]
    check_inputs(p, args)
    if args.jobs is None:
        args.jobs = 2 if args.nproc_per_node == 1 else 1
    for flag in ("load", "data", "eval_data"):  # the cells run from the repository root
        if getattr(args, flag):
            setattr(args, flag, os.path.abspath(getattr(args, flag)))
    scale = QUICK if args.quick else Scale()
    scale = dataclasses.replace(scale, **{k: getattr(args, k) for k in
                                          ("steps", "lr", "batch", "eval_interval")
                                          if getattr(args, k) is not None})

    from megasimpo.known_warnings import quiet_known_warnings
    from megasimpo.compare_render import write_comparison

    quiet_known_warnings()
    out, t0 = os.path.abspath(args.out), time.perf_counter()
    for sub in ("runs", "logs") + (() if args.load else ("base", "data")):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)

    def jobs(named):
        ra.run_jobs(named, os.path.join(out, "logs"), args.jobs)

    try:
        load, data, eval_data = ((args.load, args.data, args.eval_data) if args.load
                                 else build_inputs(out, scale, args.seed, jobs))
        runs = {f"{loss}_r{rank}": os.path.join(out, "runs", f"{loss}_r{rank}")
                for loss in LOSSES for rank in args.ranks}
        jobs({name: cell_argv(load, data, eval_data, run, name.split("_")[0],
                              int(name.split("_r")[1]), scale, args)
              for name, run in runs.items()})
        result, md = write_comparison(
            list(runs.values()), out, name="ablation", title="Ablation: SimPO vs DPO x LoRA rank",
            preamble=preamble(argv, args, scale, not args.load, time.perf_counter() - t0))
    except (RuntimeError, ValueError, OSError) as e:
        print(f"ablation_2x2: error: {e}", file=sys.stderr)
        return 1
    print(md, end="")
    print(f"ablation_2x2: wrote {', '.join(result['files'].values())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
