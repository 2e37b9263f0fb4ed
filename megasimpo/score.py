"""``megasimpo score``: per-pair summed response log-probs of a model over a dataset.

Output, one JSON object per pair in dataset order (DESIGN.md contract):
``{"index", "chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens"}``; then the
likelihood-ranking accuracy (share of pairs whose chosen response has the higher AVERAGE log-prob,
the quantity generation follows). The same files are DPO's precomputed reference log-probs.
Beside ``FILE`` goes ``FILE.meta.json``: the scoring model's identity and the data's fingerprint
(megasimpo/score_meta.py), which ``--ref precomputed`` checks.
"""

import json
import os
from typing import Optional

import numpy as np
import torch

from megasimpo import atomic, checkpoint, score_meta
from megasimpo.config import LOGPROB_CHUNK, Layout, LossConfig
from megasimpo.data.batches import ConcatPairs, full_pass_windows
from megasimpo.data.indexed import check_token_range
from megasimpo.data.loader import count_truncated, default_seq_length
from megasimpo.jsonl import read_jsonl
from megasimpo.model import Precision, build_chunks, wrap_frozen
from megasimpo.parallel import groups as pgroups
from megasimpo.step import PairStep, run_microbatches

FIELDS = ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens")


def default_scores_path(prefix: str) -> str:
    """Where ``--ref precomputed`` looks for a dataset's scored reference log-probs."""
    return prefix + ".ref_logps.jsonl"


def read_scores(path: str, dataset) -> np.ndarray:
    """Reference log-probs [n, 2] (chosen, rejected) from a score file that matches ``dataset``
    (``read_reference`` without its sidecar)."""
    return read_reference(path, dataset)[0]


def read_reference(path: str, dataset) -> tuple:
    """(reference log-probs [n, 2] (chosen, rejected), sidecar or None) of a score file that
    matches ``dataset`` (a ``ConcatPairs`` of one prefix).

    Its sidecar, when there is one, must belong to the file and name the dataset's fingerprint
    (``score_meta.check_data``; the model is checked later, ``score_meta.check_model``). Each line
    must carry its index in order and the dataset's response token counts, so a file scored for
    other data fails here, naming the file, line and field.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no scored reference log-probs; create it with `megasimpo score "
                         f"--load REFERENCE_CKPT --data PREFIX --out {path}`")
    meta = score_meta.read(path, dataset.prefixes[0])
    score_meta.check_data(meta, path, dataset)
    lengths = dataset.lengths()
    out = np.zeros((len(dataset), 2), dtype=np.float64)
    n = 0
    for lineno, rec in read_jsonl(path):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        for key in ("index",) + FIELDS:
            if not isinstance(rec.get(key), (int, float)) or isinstance(rec.get(key), bool):
                raise ValueError(f"{path}:{lineno}: field {key!r} missing or not a number")
        if rec["index"] != n or n >= len(dataset):
            raise ValueError(f"{path}:{lineno}: field 'index' is {rec['index']}, expected {n} "
                             f"(the dataset has {len(dataset)} pairs)")
        if (rec["chosen_tokens"], rec["rejected_tokens"]) != tuple(lengths[n, 1:]):
            raise ValueError(
                f"{path}:{lineno}: chosen_tokens/rejected_tokens {rec['chosen_tokens']}/"
                f"{rec['rejected_tokens']} do not match the dataset's {lengths[n, 1]}/"
                f"{lengths[n, 2]}: the file was scored on other data")
        out[n] = rec["chosen_logps"], rec["rejected_logps"]
        n += 1
    if n != len(dataset):
        raise ValueError(f"{path}: {n} scored pairs, the dataset has {len(dataset)}")
    return out, meta


def ranking_accuracy(scores: np.ndarray) -> float:
    """Share of pairs with avg chosen log-prob > avg rejected log-prob; scores [n, 4] in FIELDS order."""
    return float(np.mean(scores[:, 0] / scores[:, 2] > scores[:, 1] / scores[:, 3]))


def score(load: str, data: str, out: str, *, tp: int = 1, pp: int = 1, micro_batch_size: int = 4,
          seq_length: Optional[int] = None, precision: Optional[str] = None,
          force: bool = False, ep: int = 1, etp: Optional[int] = None,
          moe_dispatcher: str = "alltoall") -> dict:
    """Scores every pair of ``data`` with the model at ``load``; writes ``out`` and its sidecar
    atomically. An existing ``out`` is refused unless ``force``, and an unwritable one before
    anything is built."""
    from tqdm import tqdm

    rank, world = pgroups.init_distributed()
    error = None
    if rank == 0:
        try:
            for path in (out, score_meta.meta_path(out)):
                atomic.check_output(path, force)
        except ValueError as e:
            error = str(e)
    error = pgroups.from_rank0(error)
    if error:
        raise ValueError(error)
    model_cfg = checkpoint.model_config(load)
    layout = Layout.resolve(model_cfg, world, tp=tp, pp=pp, ep=ep, etp=etp,
                            moe_dispatcher=moe_dispatcher)
    prec = Precision(name=precision) if precision else Precision.default()
    groups = pgroups.initialize(layout, 0)
    dataset = ConcatPairs([data])
    from megasimpo.data.tokenizer_check import check_against_checkpoint
    check_against_checkpoint(dataset, load, prog="megasimpo score", quiet=rank != 0)
    check_token_range(dataset, model_cfg.vocab_size, load)
    multiple = 2 * (layout.tp if layout.sequence_parallel else 1)
    seq_length = seq_length or default_seq_length(dataset, multiple, model_cfg.max_position_embeddings)
    truncated = count_truncated(dataset, seq_length)
    step = PairStep(LossConfig(), groups, model_cfg.vocab_size, logprob_chunk=LOGPROB_CHUNK)
    chunks = build_chunks(model_cfg, layout, prec)
    checkpoint.load_model(chunks, load)
    identity = score_meta.weights_identity(chunks)
    model = wrap_frozen(step.prepare_model(chunks), prec)
    table = torch.zeros(len(dataset), 4, dtype=torch.float64)
    windows = full_pass_windows(dataset, groups.dp_rank, layout.dp, micro_batch_size, seq_length)
    for batches, chunks in tqdm(windows, desc="score", disable=rank != 0):
        with torch.no_grad():
            outputs = run_microbatches(model, [b.to() for b in batches], step,
                                       forward_only=True, loss_fn=step.score_func)
        if groups.reports_metrics:
            for (indices, weights), o in zip(chunks, outputs):
                real = [j for j, w in enumerate(weights) if w > 0]
                rows = torch.cat([o["logps"].double().cpu(), o["counts"].double().cpu()], 1)
                table[[indices[j] for j in real]] = rows[real]
    table = pgroups.all_reduce_host(table)  # each pair was filled in by one reporting rank
    scores = table.numpy()
    summary = {"pairs": len(dataset), "ranking_accuracy": ranking_accuracy(scores),
               "prompt_truncated": truncated, "seq_length": seq_length}
    if rank == 0:
        write_scores(out, scores, score_meta.build(
            load=load, identity=identity, prefix=data, dataset=dataset, seq_length=seq_length,
            prompt_truncated=truncated, precision=prec.name,
            layout={"tp": layout.tp, "pp": layout.pp, "dp": layout.dp}))
        print(f"megasimpo score: {len(dataset)} pairs -> {out}; likelihood-ranking accuracy "
              f"{summary['ranking_accuracy']:.4f} (avg chosen log-prob > avg rejected)"
              + (f"; {truncated} prompts cut to fit --seq-length {seq_length}" if truncated else ""),
              flush=True)
    return summary


def write_scores(path: str, scores: np.ndarray, meta: Optional[dict] = None) -> None:
    """``scores`` [n, 4] in FIELDS order as the score JSONL, in dataset order, and ``meta`` as
    its sidecar with the JSONL's hash. Each is published by one rename (``atomic.replacing``),
    the sidecar first: a death between the two leaves a sidecar whose hash does not match the
    (older or missing) JSONL, which a reader refuses, never a pair that disagrees silently."""
    import hashlib

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    h = hashlib.blake2b(digest_size=16)
    with atomic.replacing(path) as f:
        for i, (cl, rl, ct, rt) in enumerate(scores):
            line = json.dumps({"index": i, "chosen_logps": float(cl), "rejected_logps": float(rl),
                               "chosen_tokens": int(ct), "rejected_tokens": int(rt)}) + "\n"
            f.write(line)
            h.update(line.encode())
        if meta is not None:  # published before the JSONL's rename (module docstring)
            atomic.write_json(score_meta.meta_path(path), dict(
                meta, scores={"pairs": len(scores), "blake2b": h.hexdigest()}))
