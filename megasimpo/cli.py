"""Command line: parse -> build -> run -> close (the train flags: megasimpo/train_flags.py)."""

import argparse
import sys

from megasimpo import plan_cmd
from megasimpo.config import PRECISIONS
from megasimpo.train_flags import add_train_flags, train_config

__all__ = ["main", "train_config", "quiet_known_warnings"]


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="preference training (SimPO by default)")
    add_train_flags(p)


def quiet_known_warnings() -> None:
    """Mutes the fallback notices Megatron-Core prints once per rank when TE/apex are absent
    and the deprecation notices of the torch APIs it uses; our own warnings stay visible."""
    import warnings

    for text in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                 "CUDA_DEVICE_MAX_CONNECTIONS", "full scope is deprecated",
                 "The .grad attribute of a Tensor that is not a leaf"):
        warnings.filterwarnings("ignore", message=f".*{text}")
    for module in ("torch.distributed", "megatron.core.dist_checkpointing", "megasimpo.parallel.cpu"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)


def main(argv=None) -> None:
    """Entry point of ``megasimpo`` / ``python -m megasimpo``."""
    quiet_known_warnings()
    parser = argparse.ArgumentParser(prog="megasimpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    sc = sub.add_parser("score", help="per-pair summed response log-probs (DPO reference)")
    sc.add_argument("--load", required=True)
    sc.add_argument("--data", required=True)
    sc.add_argument("--out", required=True)
    sc.add_argument("--tp", type=int, default=1)
    sc.add_argument("--pp", type=int, default=1)
    sc.add_argument("--micro-batch-size", type=int, default=4)
    sc.add_argument("--seq-length", type=int)
    sc.add_argument("--precision", choices=PRECISIONS)
    sc.add_argument("--force", action="store_true",
                    help="replace --out (and its .meta.json) if it exists")
    plan_cmd.add_parser(sub)
    demo = sub.add_parser("demo", help="tiny model + bundled data, SimPO at TP=2 on CPU")
    demo.add_argument("--out", default="demo_run")
    demo.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    try:
        if args.command == "plan":
            sys.exit(plan_cmd.run(args))
        if args.command == "train":
            from megasimpo.trainer import train

            train(train_config(vars(args)))
        elif args.command == "score":
            from megasimpo.parallel.groups import destroy
            from megasimpo.score import score

            try:
                score(args.load, args.data, args.out, tp=args.tp, pp=args.pp,
                      micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
                      precision=args.precision, force=args.force)
            finally:
                destroy()
        elif args.command == "demo":
            from megasimpo.demo import run_demo

            run_demo(args.out, steps=args.steps)
    except ValueError as e:
        print(f"megasimpo {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
