"""LoRA checkpoints: the adapters (and, to resume, their optimizer state) without the frozen base.

A checkpoint of a LoRA model holds only the adapter tensors (``*_lora.lora_a`` / ``lora_b``,
sharded as ``lora.LoraAdapter.sharded_state_dict`` says, so they reshard to any layout). Its
``megasimpo.json`` carries ``"lora"`` (the LoraConfig) and ``"base"``: the base checkpoint's real
path, its path relative to the LoRA checkpoint (``"relative"``, from ``located``: every save and
``import --adapter``, whose base is inside as ``base``), and a fingerprint of its files. Loading one
(``checkpoint.load_model``) loads that base, refusing it when its fingerprint changed, adds the
adapters and loads them. The relative path is tried first, so a LoRA checkpoint and its base
moved together still find each other; a ``"path"`` that is relative (written by hand) is read
from the LoRA checkpoint's directory too.

The fingerprint is a blake2b over the base directory's file names and contents, each file by
``data.fingerprint.update_with_file`` (whole up to 4 MiB, else 256 sampled blocks), so checking a
140 GB base reads a few MiB.
"""

import hashlib
import os
from typing import Optional

import torch

from megasimpo.config import LoraConfig
from megasimpo.data.fingerprint import update_with_file
from megasimpo.lora import SUFFIX, adapters

META_KEY, BASE_KEY = "lora", "base"


def is_adapter_key(key: str) -> bool:
    """Whether a model state key names an adapter tensor."""
    return SUFFIX + "." in key


def base_fingerprint(path: str) -> str:
    """Hex digest of every file under checkpoint directory ``path`` (names and contents)."""
    h = hashlib.blake2b(digest_size=16)
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode() + b"\0")
            update_with_file(h, full)
    return h.hexdigest()


def base_record(path: str) -> dict:
    """What a LoRA checkpoint records of its base: real path and fingerprint."""
    return {"path": os.path.realpath(path), "fingerprint": base_fingerprint(path)}


def located(record: dict, ckpt: str) -> dict:
    """``record`` as LoRA checkpoint ``ckpt`` stores it: with ``"relative"``, the base's path
    relative to ``ckpt`` (tried first on loading), so the two moved together still find each
    other. A hand-written relative ``"path"`` is kept as it is."""
    if not os.path.isabs(record.get("path", "")):
        return record
    return dict(record, relative=os.path.relpath(record["path"], os.path.realpath(ckpt)))


def _candidates(record: dict, source: str) -> list:
    """Where LoRA checkpoint ``source``'s base may be, in order: its relative path (a relative
    ``path``, else ``relative``) joined to ``source``, then the absolute ``path``."""
    path, rel = record.get("path"), record.get("relative")
    if path and not os.path.isabs(path):
        path, rel = None, path
    found = [os.path.normpath(os.path.join(source, rel))] if rel else []
    return found + ([path] if path and path not in found else [])


def find_base(record: dict, source: str) -> Optional[str]:
    """The first of the base's recorded places that is a directory (not fingerprinted), or None."""
    return next((p for p in _candidates(record, source) if os.path.isdir(p)), None)


def check_base(record: dict, source: str) -> str:
    """The base path of a LoRA checkpoint ``source``: the first recorded place holding the base
    with the recorded fingerprint; ValueError when it is gone or changed."""
    places = _candidates(record, source)
    found = [p for p in places if os.path.isdir(p)]
    if not found:
        where = " or ".join(places) or "(none recorded)"
        raise ValueError(f"{source} is a LoRA checkpoint of the base model {where}, which is not "
                         "there: put the base back there, or set \"path\" under \"base\" in "
                         f"{os.path.join(source, 'megasimpo.json')} to where it is now (a relative "
                         f"path is read from {source})")
    for path in found:
        if base_fingerprint(path) == record.get("fingerprint"):
            return path
    raise ValueError(f"{source} is a LoRA checkpoint of the base model {found[0]}, whose files "
                     "changed since (fingerprint mismatch): the adapters would be applied "
                     "to other weights; restore that base")


def rebased(record: dict, source: str) -> dict:
    """``record`` of LoRA checkpoint ``source`` with the real path of where its base is now and no
    relative path (which was relative to ``source``): what checkpoints written elsewhere from it
    record (ValueError as :func:`check_base`)."""
    return {"path": os.path.realpath(check_base(record, source)),
            "fingerprint": record["fingerprint"]}


def config_of(chunks: list) -> Optional[LoraConfig]:
    """The LoraConfig the chunks' adapters were built with, or None without adapters."""
    found = adapters(chunks)
    return found[0].config if found else None


def config_record(cfg: LoraConfig) -> dict:
    """The ``"lora"`` entry of ``megasimpo.json``: what rebuilds the adapters (``LoraConfig(**it)``)."""
    return {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout,
            "targets": list(cfg.targets), "rslora": cfg.rslora}


def meta_for(chunks: list, base: Optional[dict], path: str) -> dict:
    """The ``megasimpo.json`` entries of a checkpoint of ``chunks`` saved at ``path``: {} without
    adapters; else the LoRA options and the base record, ``located`` at ``path``."""
    cfg = config_of(chunks)
    if cfg is None:
        return {}
    if base is None:
        raise ValueError("a LoRA checkpoint needs its base record (lora_checkpoint.base_record)")
    return {META_KEY: config_record(cfg), BASE_KEY: located(base, path)}


def _flags(cfg: dict) -> str:
    return (f"--lora-rank {cfg['rank']} --lora-alpha {cfg['alpha']:g} --lora-targets "
            + " ".join(cfg["targets"]))


def check_resume(meta: dict, have: Optional[LoraConfig], path: str, final: str) -> None:
    """ValueError when training checkpoint ``path`` (``meta``: its megasimpo.json) cannot resume
    a model with LoRA config ``have`` (None: no LoRA) because the two differ in LoRA: what the
    checkpoint holds (full weights, or adapters of other options) is not what the model loads.
    ``final``: the run's final_model, named as the start of a new run when it exists."""
    saved = meta.get(META_KEY)
    if (saved is None) == (have is None):
        if saved is None or (saved["rank"], tuple(saved["targets"])) == \
                (have.rank, tuple(have.targets)):
            return
    start = final if os.path.isdir(final) else path
    if saved is None:
        raise ValueError(
            f"LoRA on a run saved without LoRA: {path} holds the full model's weights and "
            "optimizer state, no LoRA adapters, so a LoRA run cannot resume it (not even with "
            f"--resume-anyway): start a new run from its {'final_model' if start == final else 'weights'} "
            f"(--load {start} --out NEW_DIR with your --lora-* options), or resume this run "
            "without the --lora-* options")
    if have is None:
        raise ValueError(
            f"LoRA off on a run saved with LoRA: {path} holds only LoRA adapters "
            f"({_flags(saved)}) and their optimizer state: resume it with {_flags(saved)}, or "
            f"start a new full fine-tuning run from its model merged (tools/convert_hf.py export "
            f"--load {start}, then import that)")
    raise ValueError(
        f"{path} holds LoRA adapters of {_flags(saved)}, this run has --lora-rank {have.rank} "
        f"--lora-targets {' '.join(have.targets)}: other adapter shapes cannot resume them; "
        f"resume with {_flags(saved)}, or start a new run (another --out)")


def adapter_states(states: dict) -> dict:
    """``{"model{i}": {key: sharded}}`` restricted to the adapter tensors."""
    return {name: {k: v for k, v in state.items() if is_adapter_key(k)}
            for name, state in states.items()}


def restore(module, state: dict, source: str) -> None:
    """Loads adapter-only ``state`` into ``module``; every key it lacks must be a base tensor."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if is_adapter_key(k)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{source}: its adapters do not match this model's (missing "
                         f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}): was it "
                         "trained with other --lora-targets?")


def with_lora(chunks: list, cfg, model, base: Optional[dict], *,
              random_init: bool = False) -> Optional[dict]:
    """Gives a LoRA run's freshly loaded ``chunks`` their adapters; returns the base record the
    run's checkpoints will reference (None for a random-init benchmark model).

    ``cfg``: the TrainConfig; ``base``: what ``checkpoint.load_model`` returned, the base record
    when ``--load`` is itself a LoRA checkpoint (its adapters are then on the chunks already and
    training goes on with them, under the same rank, alpha and targets)."""
    from megasimpo import lora

    if base is not None:
        have = config_of(chunks)
        same = f"--lora-rank {have.rank} --lora-alpha {have.alpha:g} --lora-targets " \
               + " ".join(have.targets) + (" --lora-rslora" if have.rslora else "")
        if not cfg.lora.enabled:
            raise ValueError(f"--load {cfg.load} is a LoRA checkpoint: pass {same} to go on "
                             "training its adapters, or export it merged (tools/convert_hf.py "
                             "export) and import that to fine-tune the whole model")
        if (have.rank, have.alpha, tuple(have.targets), have.rslora) != \
                (cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.targets), cfg.lora.rslora):
            raise ValueError(f"--load {cfg.load} holds adapters of {same}; this run asks for "
                             f"--lora-rank {cfg.lora.rank} --lora-alpha {cfg.lora.alpha:g} "
                             f"--lora-targets {' '.join(cfg.lora.targets)}"
                             + (" --lora-rslora" if cfg.lora.rslora else ""))
        for adapter in lora.adapters(chunks):  # dropout is a training choice: this run's
            adapter.config = cfg.lora
            adapter.dropout = (torch.nn.Dropout(cfg.lora.dropout) if cfg.lora.dropout
                               else torch.nn.Identity())
        return rebased(base, cfg.load)
    lora.check_fits(cfg.lora, model)
    lora.apply(chunks, cfg.lora, seed=cfg.seed)
    return None if random_init else base_record(cfg.load)
