"""`megasimpo train`'s flags and `--config` files, both built from the config dataclasses.

Every ``TrainConfig`` field is a flag (``--micro-batch-size`` for ``micro_batch_size``), and so is
every ``LossConfig`` field (``--loss`` for its ``name``) and every ``LoraConfig`` field
(``--lora-rank`` for its ``rank``); the help text and the allowed values are
the fields' own (``config.option``). Two flags are not fields: ``--gamma`` (SimPO's absolute
margin, converted to ``gamma_beta_ratio``) and ``--config``.

A ``--config`` file is a YAML mapping of the same options, in either spelling (``min-lr`` or
``min_lr``); the loss options may sit at the top level or under ``loss:`` (which is then a
mapping of ``LossConfig`` fields, or just the loss's name), and the LoRA options as ``lora_rank``
... or under ``lora:`` as a mapping of ``LoraConfig`` fields. ``RUN_DIR/config.yaml`` is such a file:
its ``run:`` section holds the options and the other sections (``model``, ``layout``, ``plan``,
``derived``) record what the run derived from them, so they are read back as nothing. Flags
given on the command line win over the file. A value of the wrong type is an error naming the file
and the option (PyYAML reads ``1e-3``, without a dot, as a string: a number field takes it as the
number it spells).
"""

import argparse
import dataclasses
import difflib
import typing

import yaml

from megasimpo.config import LoraConfig, LossConfig, TrainConfig, range_problem

EXTRA_FLAGS = ("gamma", "config")
# TrainConfig fields holding a dataclass, flattened into options: (class, option-name prefix,
# renamed fields). LossConfig's name is --loss; LoraConfig's rank is --lora-rank.
NESTED = {"loss": (LossConfig, "", {"name": "loss"}), "lora": (LoraConfig, "lora_", {})}
RUN_SECTIONS = ("model", "layout", "plan", "derived")  # outputs in RUN_DIR/config.yaml


def _kind(cls, f) -> type:
    """The value type of field ``f`` of ``cls``: int, float, bool, str or tuple (Optional unwrapped)."""
    hint = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _option(nested: str, field_name: str) -> str:
    """The option name of field ``field_name`` of the nested config ``nested``."""
    _, prefix, renamed = NESTED[nested]
    return renamed.get(field_name, prefix + field_name)


def _fields() -> dict:
    """option name -> (dataclass, field): TrainConfig's own fields, then the nested ones."""
    out = {f.name: (TrainConfig, f) for f in dataclasses.fields(TrainConfig) if f.name not in NESTED}
    for nested, (cls, _, _) in NESTED.items():
        for f in dataclasses.fields(cls):
            out[_option(nested, f.name)] = (cls, f)
    return out


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option; every default is left out (``argparse.SUPPRESS``) so that only the
    flags given reach ``train_config``, where they override a ``--config`` file."""
    for name, (cls, f) in _fields().items():
        kind, doc = _kind(cls, f), f.metadata.get("doc", "")
        if f.default not in (dataclasses.MISSING, None, (), False) and "default" not in doc:
            shown = " ".join(f.default) if isinstance(f.default, tuple) else f.default
            doc += f" (default {shown})"
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=doc,
                                default=argparse.SUPPRESS)
        elif kind is tuple:
            parser.add_argument(flag, nargs="+", help=doc, default=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, type=kind, choices=f.metadata.get("choices") or None,
                                help=doc, default=argparse.SUPPRESS)
    parser.add_argument("--gamma", type=float, default=argparse.SUPPRESS,
                        help="absolute SimPO margin (sets --gamma-beta-ratio = gamma / beta)")
    parser.add_argument("--config", default=argparse.SUPPRESS,
                        help="YAML file of these options, or a run's config.yaml (flags win)")


def _optional(cls, f) -> bool:
    """Whether field ``f`` of ``cls`` takes None (null in a file: the default, decided later)."""
    hint = typing.get_type_hints(cls)[f.name]
    return typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)


def ranged(cls, name: str):
    """An argparse ``type`` for another command's flag that means field ``name`` of ``cls``
    (score's --micro-batch-size): the field's type and declared range, so both commands
    refuse the same values."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    kind = _kind(cls, f)

    def parse(text: str):
        value = kind(text)
        problem = range_problem(f, value)
        if problem:
            raise argparse.ArgumentTypeError(f"{value} {problem}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


def _typed(path: str, key: str, value, kind: type):
    """``value`` checked against ``kind``; ValueError naming the file and the option."""
    wrong = None
    if value is None:
        return value
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
        raise ValueError(f"{path}: {key}: expected {wrong}, got {value!r} ({type(value).__name__})")
    return value


def read_config_file(path: str) -> dict:
    """The options of YAML file ``path`` (a plain mapping, or a run's config.yaml), typed, with
    the loss options flattened as flags name them; unknown names are left for ``train_config``."""
    try:
        with open(path) as f:
            loaded = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML ({e})") from None
    loaded = {} if loaded is None else loaded
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    if isinstance(loaded.get("run"), dict):  # RUN_DIR/config.yaml: the options are its run:
        loaded = {k: v for k, v in loaded.items() if k not in RUN_SECTIONS}
        loaded.update(loaded.pop("run"))
    options = {}
    for nested in NESTED:  # loss: {name: dpo, beta: 0.1, ...}, as config.yaml writes them
        if isinstance(loaded.get(nested), dict):
            mapping = loaded.pop(nested)
            for key, value in mapping.items():
                loaded.setdefault(_option(nested, str(key).replace("-", "_")), value)
    fields = _fields()
    for key, value in loaded.items():
        key = str(key).replace("-", "_")
        if key in fields:
            cls, f = fields[key]
            if value is None and not _optional(cls, f):
                required = f.default is f.default_factory is dataclasses.MISSING
                raise ValueError(f"{path}: {key}: null; expected {_EXPECTED[_kind(cls, f)]} "
                                 + ("(required)" if required else
                                    "(delete the line to use the default)"))
            value = _typed(path, key, value, _kind(cls, f))
            problem = range_problem(f, value)
            if problem:
                raise ValueError(f"{path}: {key}: {value!r} {problem}")
        elif key == "gamma":
            value = _typed(path, key, value, float)
        else:
            raise ValueError(f"{path}: unknown option {key!r}{_suggestion(key)}")
        options[key] = value
    return options


_EXPECTED = {float: "a number", int: "an integer", bool: "true or false", str: "a string",
             tuple: "a path or a list of paths"}


# TRL / transformers TrainingArguments names a config written for them uses, and ours.
TRL_NAMES = {"learning_rate": "lr", "num_train_epochs": "epochs", "max_steps": "steps",
             "max_length": "seq_length", "max_grad_norm": "clip_grad",
             "per_device_train_batch_size": "micro_batch_size", "output_dir": "out",
             "model_name_or_path": "load", "save_steps": "save_interval",
             "eval_steps": "eval_interval", "logging_steps": "log_interval",
             "simpo_gamma": "gamma"}


def _suggestion(key: str) -> str:
    """ " (did you mean 'lr'?)" for the option nearest to ``key`` (or TRL's name for it), or ""."""
    close = ([TRL_NAMES[key]] if key in TRL_NAMES
             else difflib.get_close_matches(key, list(_fields()) + list(EXTRA_FLAGS), n=1))
    return f" (did you mean {close[0]!r}?)" if close else ""


def train_config(args: dict) -> TrainConfig:
    """TrainConfig from parsed flags (``vars(namespace)``) over an optional ``--config`` file."""
    opts = read_config_file(args["config"]) if args.get("config") else {}
    opts.update({k: v for k, v in args.items() if k not in ("config", "command")})
    fields = _fields()
    unknown = sorted(k for k in opts if k not in fields and k != "gamma")
    if unknown:
        raise ValueError(f"unknown option(s): {', '.join(unknown)}{_suggestion(unknown[0])}")
    missing = [k for k in ("load", "data", "out") if opts.get(k) is None]
    if missing:
        raise ValueError("train needs " + ", ".join("--" + k for k in missing))
    nested = {}
    for name, (cls, _, _) in NESTED.items():
        names = {_option(name, f.name): f.name for f in dataclasses.fields(cls)}
        nested[name] = {names[k]: opts.pop(k) for k in list(opts) if k in names}
    loss = nested["loss"]
    gamma = opts.pop("gamma", None)  # absolute SimPO margin, given instead of the ratio
    if gamma is not None:
        beta = loss.get("beta") or LossConfig(name=loss.get("name", "simpo")).beta
        loss["gamma_beta_ratio"] = gamma / beta
    for key in ("data", "eval_data", "ref_logps"):
        if key in opts and opts[key] is not None:
            opts[key] = tuple([opts[key]] if isinstance(opts[key], str) else opts[key])
    return TrainConfig(loss=LossConfig(**loss), lora=LoraConfig(**nested["lora"]), **opts)
