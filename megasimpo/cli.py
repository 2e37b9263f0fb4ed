"""Command line: parse -> build -> run -> close (the train flags: megasimpo/train_flags.py)."""

import argparse
import sys

from megasimpo import plan_cmd
from megasimpo.config import MOE_DISPATCHERS, PRECISIONS, Layout, TrainConfig, check_prefix
from megasimpo.known_warnings import quiet_known_warnings
from megasimpo.train_flags import add_train_flags, ranged, train_config

__all__ = ["main", "train_config"]
DESCRIPTION = ("Preference training (SimPO, DPO, IPO, CPO, ORPO, R-DPO, AlphaPO, SFT) on "
               "Megatron-Core: train, score a reference, plan a layout, or run the demo.")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="preference training (SimPO by default)")
    add_train_flags(p)


def main(argv=None) -> None:
    """Entry point of ``megasimpo`` / ``python -m megasimpo``."""
    quiet_known_warnings()
    parser = argparse.ArgumentParser(prog="megasimpo", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    sc = sub.add_parser("score", help="per-pair summed response log-probs (DPO reference)")
    sc.add_argument("--load", required=True,
                    help="checkpoint to score with (the reference model: tools/convert_hf.py "
                         "import output or a run's final_model)")
    sc.add_argument("--data", required=True, help="dataset prefix (PREFIX.bin/.idx) to score")
    sc.add_argument("--out", required=True,
                    help="JSONL file to write, one line per pair in dataset order; train "
                         "--ref precomputed looks for PREFIX.ref_logps.jsonl unless --ref-logps "
                         "names it")
    sc.add_argument("--tp", type=ranged(Layout, "tp"), default=1,
                    help="tensor-parallel size (default 1)")
    sc.add_argument("--pp", type=ranged(Layout, "pp"), default=1,
                    help="pipeline-parallel size (default 1)")
    sc.add_argument("--ep", type=ranged(Layout, "ep"), default=1,
                    help="expert-parallel size of an MoE model (default 1)")
    sc.add_argument("--etp", type=ranged(Layout, "etp"),
                    help="expert tensor-parallel size (default: --tp)")
    sc.add_argument("--moe-dispatcher", choices=MOE_DISPATCHERS, default="alltoall",
                    help="MoE token dispatcher (default alltoall)")
    sc.add_argument("--micro-batch-size", type=ranged(TrainConfig, "micro_batch_size"), default=4,
                    help="pairs per micro-batch (default 4)")
    sc.add_argument("--seq-length", type=ranged(TrainConfig, "seq_length"),
                    help="tokens per sequence; default: the longest pair in the data (capped by "
                         "the model); give train's value so that prompts are cut alike")
    sc.add_argument("--precision", choices=PRECISIONS, help="default: bf16 on GPU, fp32 on CPU")
    sc.add_argument("--force", action="store_true",
                    help="replace --out (and its .meta.json) if it exists")
    plan_cmd.add_parser(sub)
    demo = sub.add_parser("demo", help="tiny model + bundled data, SimPO at TP=2 on CPU")
    demo.add_argument("--out", default="demo_run",
                      help="directory for the demo's model, data and run (default demo_run)")
    demo.add_argument("--steps", type=ranged(TrainConfig, "steps"), default=60,
                      help="training steps (default 60)")
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

            check_prefix("--data", args.data)
            try:
                score(args.load, args.data, args.out, tp=args.tp, pp=args.pp,
                      micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
                      precision=args.precision, force=args.force, ep=args.ep, etp=args.etp,
                      moe_dispatcher=args.moe_dispatcher)
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
