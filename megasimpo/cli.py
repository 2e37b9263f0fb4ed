"""Command line: parse -> build -> run -> close. See DESIGN.md section 3 for the contract."""

import argparse
import sys

import yaml

from megasimpo import plan_cmd
from megasimpo.config import ATTENTION_BACKENDS, LOSSES, LossConfig, TrainConfig

LOSS_FIELDS = {"beta", "gamma_beta_ratio", "label_smoothing", "loss_type", "sft_weight",
               "cpo_alpha", "rdpo_alpha"}


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="preference training (SimPO by default)",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("--load", help="model checkpoint directory")
    p.add_argument("--data", nargs="+", help="training dataset prefix(es)")
    p.add_argument("--out", help="run directory")
    p.add_argument("--loss", choices=LOSSES)
    p.add_argument("--ref", choices=("live", "precomputed"))
    p.add_argument("--ref-logps", nargs="+",
                   help="`megasimpo score` JSONL per --data then --eval-data prefix (--ref precomputed)")
    for name in ("tp", "pp", "vpp", "cp", "micro-batch-size", "global-batch-size", "seq-length",
                 "steps", "epochs", "eval-interval", "save-interval", "exit-interval",
                 "log-interval", "seed", "keep-checkpoints", "max-skipped-steps", "logprob-chunk"):
        p.add_argument(f"--{name}", type=int)
    for name in ("lr", "min-lr", "warmup-ratio", "weight-decay", "clip-grad", "beta",
                 "gamma-beta-ratio", "sft-weight", "label-smoothing", "cpo-alpha", "rdpo-alpha"):
        p.add_argument(f"--{name}", type=float)
    p.add_argument("--gamma", type=float, help="absolute SimPO margin (= beta * gamma-beta-ratio)")
    p.add_argument("--loss-type", choices=("sigmoid", "hinge"))
    p.add_argument("--precision", choices=("bf16", "fp8", "fp32"))
    p.add_argument("--attention-backend", choices=ATTENTION_BACKENDS,
                   help="core attention: te, sdpa (PyTorch), unfused (Megatron's); default auto")
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction)
    p.add_argument("--recompute", action=argparse.BooleanOptionalAction)
    p.add_argument("--pack", action=argparse.BooleanOptionalAction,
                   help="pack each micro-batch's sequences into one row (default: with TE)")
    p.add_argument("--overlap-grad-reduce", action=argparse.BooleanOptionalAction,
                   help="reduce gradient buckets during backward (default: on with CUDA)")
    p.add_argument("--overlap-param-gather", action=argparse.BooleanOptionalAction,
                   help="all-gather updated parameters during the next forward "
                        "(default: as --overlap-grad-reduce)")
    p.add_argument("--gpu-mem-gb", type=float, help="memory per device for the plan")
    p.add_argument("--eval-data", nargs="+")
    p.add_argument("--force", action="store_true",
                   help="train into a finished run directory again (replaces its final_model)")
    p.add_argument("--resume-anyway", action="store_true",
                   help="resume --out's checkpoint even though it was written under another "
                        "configuration (the differences are printed)")
    p.add_argument("--config", help="YAML file of the same options (flags override it)")


def _yaml_value(path: str, key: str, value):
    """``value`` of option ``key`` from YAML file ``path``, checked against the field's type.
    PyYAML reads ``1e-3`` (no dot) as a string: a float field takes such a string as the number
    it spells; anything else of the wrong type is an error naming the file and the option."""
    import typing

    hints = {**typing.get_type_hints(LossConfig), **typing.get_type_hints(TrainConfig),
             "loss": str, "gamma": float}
    if key not in hints:
        return value  # unknown options are reported together below
    kind = hints[key]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is typing.Union:
        if value is None:
            return value
        kind = args[0]
    wrong = None
    if kind is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                wrong = "a number"
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            wrong = "a number"
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            wrong = "an integer"
    elif kind is bool:
        if not isinstance(value, bool):
            wrong = "true or false"
    elif kind is str:
        if not isinstance(value, str):
            wrong = "a string"
    elif kind is tuple:
        if not (isinstance(value, str) or (isinstance(value, list)
                                           and all(isinstance(v, str) for v in value))):
            wrong = "a path or a list of paths"
    if wrong:
        raise ValueError(f"{path}: {key}: expected {wrong}, got {value!r} "
                         f"({type(value).__name__})")
    return value


def train_config(args: dict) -> TrainConfig:
    """TrainConfig from parsed flags over an optional YAML file (flags win)."""
    opts = {}
    if "config" in args:
        with open(args["config"]) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args['config']}: expected a mapping of option: value")
        for key, value in loaded.items():
            key = str(key).replace("-", "_")
            opts[key] = _yaml_value(args["config"], key, value)
    opts.update({k: v for k, v in args.items() if k not in ("config", "command")})
    loss_opts = {k: opts.pop(k) for k in list(opts) if k in LOSS_FIELDS}
    name = opts.pop("loss", "simpo")
    gamma = opts.pop("gamma", None)  # absolute SimPO margin, given instead of the ratio
    if gamma is not None:
        beta = loss_opts.get("beta") or LossConfig(name=name).beta
        loss_opts["gamma_beta_ratio"] = gamma / beta
    for key in ("data", "eval_data", "ref_logps"):
        if key in opts:
            opts[key] = tuple([opts[key]] if isinstance(opts[key], str) else opts[key])
    missing = [k for k in ("load", "data", "out") if k not in opts]
    if missing:
        raise ValueError("train needs " + ", ".join("--" + k for k in missing))
    known = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(opts) - known)
    if unknown:
        raise ValueError(f"unknown option(s): {', '.join(unknown)}")
    return TrainConfig(loss=LossConfig(name=name, **loss_opts), **opts)


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
    sc.add_argument("--precision", choices=("bf16", "fp8", "fp32"))
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
                      precision=args.precision)
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
