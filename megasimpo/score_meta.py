"""The sidecar of a score file: which model and which data the reference log-probs come from.

``megasimpo score --out FILE`` writes ``FILE.meta.json`` beside the JSONL (whose
one-object-per-pair contract is unchanged)::

    {"format": "megasimpo-score-meta-v1", "megasimpo_version": "0.1.0",
     "scores": {"pairs": N, "blake2b": <hash of FILE's bytes>},
     "model": {"load": <--load, absolute>, "weights": <identity>, "adapter": <identity or null>},
     "data": {"prefix": <--data, absolute>, "fingerprint": <.idx trailer>, "num_pairs": N},
     "seq_length": S, "prompt_truncated": T, "precision": "fp32", "layout": {"tp", "pp", "dp"}}

``train --ref precomputed`` refuses a file whose sidecar names other data (the ``.idx``
fingerprint, checked when the file is read) or another model (checked once the run's model is
loaded, before step 1). A file without a sidecar (scored before it existed, or written by another
tool) passes with a one-line note.

The model's identity is computed from the loaded weights, so every checkpoint has one (imports,
old checkpoints, LoRA checkpoints) and nothing is recorded at save: a sum over every element of
every stored tensor of a 64-bit mix of (tensor name, the element's global position, its value
rounded to bf16). The global position makes it independent of the TP/PP/DP layout the model was
loaded at (each rank adds its own shards, main replicas only, and one all-reduce adds the ranks);
the bf16 rounding makes it independent of the precision it was loaded at (fp32 weights loaded in
bf16 are rounded the same way). LoRA adapters get an identity of their own, apart from the base.
"""

import hashlib
import json
import os
from typing import Optional

import torch

FORMAT = "megasimpo-score-meta-v1"
SUFFIX = ".meta.json"
_ELEMENTS_PER_PIECE = 1 << 22  # bounds the int64 temporaries of one tensor's hash
_M1, _M2 = 0xFF51AFD7ED558CCD - (1 << 64), 0xC4CEB9FE1A85EC53 - (1 << 64)  # murmur3 fmix64


def meta_path(scores_path: str) -> str:
    """Where the sidecar of score file ``scores_path`` is."""
    return scores_path + SUFFIX


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _fmix(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 64-bit finalizer (a bijection), in wrapping int64 arithmetic."""
    x = (x ^ _shr(x, 33)) * _M1
    x = (x ^ _shr(x, 33)) * _M2
    return x ^ _shr(x, 33)


def _key_code(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little",
                          signed=True)


def _global_index(sh, rows: slice) -> torch.Tensor:
    """int64 flat indices, in the global tensor, of rows ``rows`` (dim 0) of shard ``sh``."""
    shape, offset, full = sh.local_shape, sh.global_offset, sh.global_shape
    strides = [1] * len(full)
    for d in range(len(full) - 2, -1, -1):
        strides[d] = strides[d + 1] * full[d + 1]
    prepended = len(full) - len(shape)  # axes of the global tensor the shard has one slot of
    start = sum(offset[d] * strides[d] for d in range(prepended))  # (the layer of a layer's tensor)
    index = torch.full((), start, dtype=torch.int64, device=sh.data.device)
    for d in range(len(shape)):
        positions = torch.arange(shape[d], dtype=torch.int64, device=sh.data.device)
        if d == 0:
            positions = positions[rows]
        view = [1] * len(shape)
        view[d] = -1
        g = prepended + d
        index = index + ((positions + offset[g]) * strides[g]).view(view)
    return index


def _tensor_sum(sh) -> int:
    """This shard's contribution: sum of fmix(((global index << 16) | bf16 bits) ^ key)."""
    if sh.flattened_range is not None:
        raise ValueError(f"{sh.key}: a flattened shard (optimizer state) has no weight identity")
    if not sh.local_shape:
        raise ValueError(f"{sh.key}: a scalar has no place in a weight identity")
    data = sh.data.detach().to(torch.bfloat16).reshape(sh.local_shape)
    step = max(1, _ELEMENTS_PER_PIECE // max(1, data[0].numel()))
    code, total = _key_code(sh.key), torch.zeros((), dtype=torch.int64, device=data.device)
    for start in range(0, data.shape[0], step):
        rows = slice(start, start + step)
        bits = data[rows].view(torch.int16).to(torch.int64) & 0xFFFF
        total += _fmix(((_global_index(sh, rows) << 16) | bits) ^ code).sum()
    return int(total)


def weights_identity(chunks: list) -> dict:
    """``{"weights": hex, "adapter": hex or None}`` of the model in ``chunks`` (wrapped or not),
    the same at every layout and precision (module docstring). Collective: every rank calls it."""
    from megatron.core.dist_checkpointing.mapping import (ShardedTensor, apply_factories,
                                                          is_main_replica)

    from megasimpo.lora_checkpoint import is_adapter_key
    from megasimpo.model import unwrap
    from megasimpo.parallel.groups import all_reduce_host

    sums = [0, 0]  # base weights, adapters
    found_adapter = 0
    with torch.no_grad():
        for chunk in chunks:
            state = unwrap(chunk).sharded_state_dict()
            apply_factories(state)  # the gated fc1 as its two stored halves
            for value in state.values():
                for sh in value if isinstance(value, list) else [value]:
                    if not isinstance(sh, ShardedTensor):
                        continue  # extra state objects are not weights
                    adapter = is_adapter_key(sh.key)
                    found_adapter |= adapter
                    if is_main_replica(sh.replica_id):
                        sums[adapter] = (sums[adapter] + _tensor_sum(sh)) % (1 << 64)
    signed = [s - (1 << 64) if s >= 1 << 63 else s for s in sums]
    total = all_reduce_host(torch.tensor(signed + [found_adapter], dtype=torch.int64))
    hexes = [f"{int(s) % (1 << 64):016x}" for s in total[:2].tolist()]
    return {"weights": "w1-" + hexes[0], "adapter": "w1-" + hexes[1] if int(total[2]) else None}


def file_hash(path: str) -> str:
    """Hex blake2b of a file's bytes (binds a sidecar to its score file)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def version() -> str:
    """The installed megasimpo's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("megasimpo")
    except PackageNotFoundError:
        return "unknown"


def build(*, load: str, identity: dict, prefix: str, dataset, **facts) -> dict:
    """The sidecar of a score of ``dataset`` (``ConcatPairs`` of one ``prefix``) by the model at
    ``load``, without the ``scores`` entry (``score.write_scores`` adds it)."""
    return {"format": FORMAT, "megasimpo_version": version(),
            "model": {"load": os.path.abspath(load), **identity},
            "data": {"prefix": os.path.abspath(prefix),
                     "fingerprint": dataset.parts[0].fingerprint, "num_pairs": len(dataset)},
            **facts}


def _rescore(path: str, prefix: str, load: Optional[str] = None) -> str:
    return (f"re-run `megasimpo score --load {load or 'REFERENCE_CKPT'} --data {prefix} --out "
            f"{path} --force`")


def read(path: str, prefix: str) -> Optional[dict]:
    """The sidecar of score file ``path`` (for ``--data`` ``prefix``), checked to belong to it;
    None when there is none. ValueError naming the file and field otherwise."""
    meta_file = meta_path(path)
    if not os.path.lexists(meta_file):
        return None
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_file}: not readable JSON ({e}); {_rescore(path, prefix)}") \
            from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_file}: field 'format' is {got!r}, not {FORMAT!r}; "
                         f"{_rescore(path, prefix)}")
    recorded = (meta.get("scores") or {}).get("blake2b")
    if recorded != file_hash(path):
        raise ValueError(f"{meta_file}: field 'scores.blake2b' does not match {path} (the file "
                         "changed after scoring, or a score was interrupted between the two "
                         f"renames); {_rescore(path, prefix, (meta.get('model') or {}).get('load'))}")
    return meta


def check_data(meta: Optional[dict], path: str, dataset) -> None:
    """ValueError when sidecar ``meta`` of ``path`` names other data than ``dataset`` (a
    ``ConcatPairs`` of one prefix); a one-line note (rank 0) when there is no sidecar."""
    prefix = dataset.prefixes[0]
    if meta is None:
        _note(f"{path} has no {os.path.basename(meta_path(path))} (scored before megasimpo "
              "recorded it, or by another tool): which model and data it was scored with cannot "
              "be checked, only its pair count and token counts")
        return
    data = meta.get("data") or {}
    have = dataset.parts[0].fingerprint
    if data.get("fingerprint") != have:
        raise ValueError(
            f"{meta_path(path)}: field 'data.fingerprint' is {data.get('fingerprint')}, but "
            f"--data {prefix} has {have}: the file was scored on other data "
            f"({data.get('prefix')}); {_rescore(path, prefix, (meta.get('model') or {}).get('load'))}")


def check_model(metas: list, identity: dict, reference: str) -> None:
    """ValueError when a sidecar (``(path, prefix, meta)``; ``meta`` None is skipped) names
    another model than the run's reference: ``identity`` (``weights_identity`` of the base
    weights; the reference has no adapters, as a live reference of a LoRA run has them off) of
    the checkpoint ``reference``."""
    for path, prefix, meta in metas:
        if meta is None:
            continue
        model = meta.get("model") or {}
        fix = _rescore(path, prefix, reference)
        if model.get("adapter") is not None:
            raise ValueError(
                f"{meta_path(path)}: field 'model.adapter' is set: the file was scored by a LoRA "
                f"checkpoint ({model.get('load')}) with its adapters on, but the reference of "
                f"this run is the base model {reference} without adapters; {fix}")
        if model.get("weights") != identity["weights"]:
            raise ValueError(
                f"{meta_path(path)}: field 'model.weights' is {model.get('weights')} "
                f"({model.get('load')}), but this run's reference {reference} has "
                f"{identity['weights']}: the file was scored by another model; {fix}")


def _note(text: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"megasimpo: note: {text}", flush=True)
