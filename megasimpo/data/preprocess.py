"""The preprocessing pipeline: read preference records, tokenize them in parallel, clean, split,
write ``PREFIX.bin/.idx`` (+ ``PREFIX_eval.*`` with ``split_eval``) and ``PREFIX.summary.json``.

Inputs: JSON Lines (``.jsonl``, or a ``.json`` file whose first character is ``{``), a JSON array
(``.json``), Parquet (``.parquet``, via ``datasets``) or a directory saved with
``datasets.save_to_disk``. JSON is parsed here rather than by ``datasets`` so that every error names
its line and so a key a record lacks stays absent (``datasets`` unifies the schema across rows).

Records are encoded in input order by ``workers`` processes (chunks handed out with a bounded number in
flight, results consumed in submission order), so the output does not depend on the worker count.
Skips are counted by reason: ``invalid`` (only with ``skip_invalid``; otherwise the first invalid
record raises ``InvalidRecord``), ``empty`` (a blank response), ``identical`` (same response ids),
``too_long`` (a response leaves no room for one prompt token within ``max_length``) and ``unscorable``
(empty prompt and a 1-token response: no response token has a predecessor to be scored from).
Which records go through the chat template is the ``TemplateRule`` of ``chat_template``/
``chat_template_file``/``turn_separator`` (``data/chat_template.py``; by default TRL's rule); the
summary records the rule applied (``chat_template``) and the tokenizer's identity
(``tokenizer_identity``, also in the ``.idx`` trailer; absent when every record was
pre-tokenized: the tokenizer then made no ids). ``--out`` is checked to be writable before anything
is tokenized. Nothing is published unless the whole run succeeds. Existing outputs (``PREFIX.*``,
``PREFIX_eval.*``) are refused unless ``force``; with it they are replaced only once the new ones
are complete, and a ``PREFIX_eval.*`` the new run does not write is removed after that, so it
cannot pass for its split.
"""

import contextlib
import itertools
import json
import multiprocessing
import os
import tempfile
from collections import deque
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import numpy as np
from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path

from megasimpo.atomic import file_mode
from megasimpo.data.chat_template import TemplateRule
from megasimpo.data.formats import (
    InvalidRecord, TokenPair, check_token_range, has_empty_response, parse_json_line, parse_record)
from megasimpo.data.indexed import PairWriter
from megasimpo.data.inputs import Item, open_input
from megasimpo.data.tokenize import PairEncoder, load_encoder, truncate_prompt

SKIP_REASONS = ("invalid", "empty", "identical", "too_long", "unscorable")
NUM_EXAMPLES = 5  # locations kept per skip reason in the summary
_APPLIED_TO = {"all": "every text record", "conversational": "conversational records",
               "none": "no record"}
BIAS_THRESHOLD = 0.05  # |mean difference| / mean length below which lengths count as "about the same"


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """One preprocessing run (the flags of ``tools/preprocess_data.py``)."""

    inputs: Tuple[str, ...]  # JSONL / JSON / Parquet files or saved ``datasets`` directories
    tokenizer: str  # HF tokenizer directory or SentencePiece .model file
    out: str  # output prefix: PREFIX.bin, PREFIX.idx, PREFIX.summary.json
    max_length: Optional[int] = None  # max prompt+response tokens for each of chosen/rejected
    workers: int = 1  # encoding processes (1: in this process)
    split_eval: float = 0.0  # share of pairs moved to PREFIX_eval (seeded random choice)
    skip_invalid: bool = False  # count invalid records as skips instead of failing
    seed: int = 1234  # seeds the eval split
    chunk_size: int = 64  # records per task handed to a worker
    force: bool = False  # replace existing outputs (and remove a stale PREFIX_eval.*)
    chat_template: str = "auto"  # auto | always | never (data/chat_template.py)
    chat_template_file: Optional[str] = None  # a Jinja template used instead of the tokenizer's
    turn_separator: Optional[str] = None  # with never: joins a conversation's turn contents

    def __post_init__(self):
        _ = self.rule  # validates the chat-template flags
        if not self.inputs:
            raise ValueError("no --input given")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be >= 2 (1 prompt + 1 response token)")
        if self.workers < 1 or self.chunk_size < 1:
            raise ValueError(f"workers={self.workers} and chunk_size={self.chunk_size} must be >= 1")
        if not 0.0 <= self.split_eval < 1.0:
            raise ValueError(f"split_eval={self.split_eval} must be in [0, 1)")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")

    @property
    def rule(self) -> TemplateRule:
        """The chat-template rule of these flags."""
        return TemplateRule(mode=self.chat_template, template_file=self.chat_template_file,
                            turn_separator=self.turn_separator)

    @property
    def eval_prefix(self) -> str:
        """Prefix of the held-out split."""
        return f"{self.out}_eval"


def output_paths(prefix: str) -> List[str]:
    """The files one output prefix consists of."""
    return [get_bin_path(prefix), get_idx_path(prefix), f"{prefix}.summary.json"]


def _check_not_overwriting(config: PreprocessConfig) -> None:
    """ValueError naming the existing outputs of a run without ``force``."""
    existing = [p for prefix in (config.out, config.eval_prefix) for p in output_paths(prefix)
                if os.path.lexists(p)]
    if existing and not config.force:
        raise ValueError(f"--out {config.out}: {', '.join(existing)} already exist(s); pass "
                         "--force to replace them (a PREFIX_eval.* this run does not write is "
                         "removed), or choose another --out")


def check_writable(prefix: str) -> None:
    """ValueError when nothing can be created where ``prefix``'s files go: a real probe (a
    directory made and removed in the nearest existing ancestor, which is what the writer will
    need), so a read-only mount or a path through a regular file is caught too, before anything
    is tokenized."""
    target = os.path.dirname(os.path.abspath(prefix))
    existing = target
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{os.path.basename(prefix)}.", suffix=".probe",
                                  dir=existing))
    except OSError as err:
        raise ValueError(f"cannot write {target}: {err.strerror}; choose a writable --out") from None


# ---------------------------------------------------------------- encoding (worker processes)

def encode_item(encoder: PairEncoder, max_length: Optional[int], item: Item) -> tuple:
    """One record -> ``("pair", prompt, chosen, rejected, truncated, from_text)`` (int32 arrays;
    ``from_text``: the tokenizer made the ids) or ``("skip", reason, InvalidRecord | location)``."""
    where, payload, is_line = item
    if isinstance(payload, InvalidRecord):  # the line could not even be decoded
        return ("skip", "invalid", payload)
    try:
        obj = parse_json_line(payload, where) if is_line else payload
        record = parse_record(obj, where)
        if isinstance(record, TokenPair):
            check_token_range(record, encoder.vocab_size, where)
        encoder.check(obj, record, where)
    except InvalidRecord as err:
        return ("skip", "invalid", err)
    if has_empty_response(record):
        return ("skip", "empty", where)
    prompt, chosen, rejected = encoder.encode(record)
    if not chosen or not rejected:
        return ("skip", "empty", where)
    if chosen == rejected:
        return ("skip", "identical", where)
    kept = truncate_prompt(prompt, chosen, rejected, max_length)
    if kept is None:
        return ("skip", "too_long", where)
    if not kept and min(len(chosen), len(rejected)) == 1:
        return ("skip", "unscorable", where)
    return ("pair", np.asarray(kept, np.int32), np.asarray(chosen, np.int32),
            np.asarray(rejected, np.int32), len(kept) < len(prompt),
            not isinstance(record, TokenPair))


_WORKER = None  # (encoder, max_length) or the exception loading the tokenizer raised


def _init_worker(tokenizer: str, rule: TemplateRule, max_length: Optional[int]) -> None:
    global _WORKER
    try:
        _WORKER = (load_encoder(tokenizer, rule), max_length)
    except Exception as err:  # raised from the first task: a failing initializer respawns forever
        _WORKER = err


def _encode_chunk(items: List[Item]) -> List[tuple]:
    if isinstance(_WORKER, Exception):
        raise _WORKER
    encoder, max_length = _WORKER
    return [encode_item(encoder, max_length, item) for item in items]


def _chunks(items: Iterator[Item], size: int) -> Iterator[List[Item]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


@contextlib.contextmanager
def _outcomes(config: PreprocessConfig, encoder: PairEncoder, items: Iterator[Item]):
    """Context yielding the iterator of ``encode_item`` outcomes, in input order."""
    if config.workers == 1:
        yield (encode_item(encoder, config.max_length, item) for item in items)
        return
    pool = multiprocessing.get_context().Pool(
        config.workers, _init_worker, (config.tokenizer, config.rule, config.max_length))

    def ordered():
        # apply_async with a bounded queue rather than imap: imap's feeder thread would read the
        # whole input into memory ahead of the workers.
        pending = deque()
        for chunk in _chunks(items, config.chunk_size):
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= 4 * config.workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()

    try:
        yield ordered()
    except Exception:
        # A bad record: let the few chunks in flight finish. Pool.terminate() with tasks in flight
        # was seen to hang for good joining its handler threads (CPython 3.11, 1 run in 3).
        pool.close()
        pool.join()
        raise
    except BaseException:  # Ctrl-C: the workers got it too
        pool.terminate()
        raise
    else:
        pool.close()
        pool.join()


# ---------------------------------------------------------------- cleaning and statistics

class _Tally:
    """Counts of records read, pairs truncated and skips by reason, with example locations."""

    def __init__(self):
        self.pairs_in = 0
        self.truncated = 0
        self.from_text = 0  # kept pairs whose ids the tokenizer made (not pre-tokenized)
        self.skipped = {reason: 0 for reason in SKIP_REASONS}
        self.examples = {reason: [] for reason in SKIP_REASONS}

    def kept(self, outcomes, skip_invalid: bool, progress) -> Iterator[tuple]:
        """(prompt, chosen, rejected) of the pairs that survive cleaning, in input order."""
        for outcome in outcomes:
            self.pairs_in += 1
            progress.update()
            if outcome[0] == "pair":
                self.truncated += int(outcome[4])
                self.from_text += int(outcome[5])
                yield outcome[1:4]
                continue
            reason, detail = outcome[1], outcome[2]
            if reason == "invalid" and not skip_invalid:
                raise detail
            self.skipped[reason] += 1
            if len(self.examples[reason]) < NUM_EXAMPLES:
                self.examples[reason].append(str(detail))


def percentiles(values: np.ndarray) -> dict:
    """p50/p90/p99 (nearest rank: always an observed length), max and mean of token counts."""
    out = {f"p{q}": int(np.percentile(values, q, method="inverted_cdf")) for q in (50, 90, 99)}
    out.update(max=int(values.max()), mean=round(float(values.mean()), 2))
    return out


def length_bias(chosen: np.ndarray, rejected: np.ndarray) -> dict:
    """Mean chosen - rejected response length, the shares of pairs where chosen is longer/shorter
    and a verdict. "systematically longer" needs the mean difference to be at least BIAS_THRESHOLD
    of the mean response length and chosen to be longer more often than shorter (and vice versa)."""
    diff = float(chosen.mean() - rejected.mean())
    relative = diff / max(float(np.concatenate([chosen, rejected]).mean()), 1e-9)
    longer, shorter = float(np.mean(chosen > rejected)), float(np.mean(chosen < rejected))
    if relative >= BIAS_THRESHOLD and longer > shorter:
        verdict = "chosen responses are systematically longer"
    elif relative <= -BIAS_THRESHOLD and shorter > longer:
        verdict = "chosen responses are systematically shorter"
    else:
        verdict = "chosen responses are about the same length"
    return {"mean_chosen_minus_rejected": round(diff, 3), "chosen_longer_share": round(longer, 4),
            "chosen_shorter_share": round(shorter, 4), "verdict": verdict}


def build_summary(lengths: np.ndarray, tally: _Tally, config: PreprocessConfig, prefix: str,
                  split: str, num_per_split: dict, encoder: PairEncoder) -> dict:
    """The JSON summary of one output prefix; ``lengths`` int [n, 3] (prompt, chosen, rejected)."""
    return {
        "prefix": prefix, "split": split, "inputs": list(config.inputs),
        "tokenizer": config.tokenizer,
        "tokenizer_identity": encoder.identity() if tally.from_text else None,
        "chat_template": encoder.template_record(),
        "max_length": config.max_length, "seed": config.seed,
        "split_eval": config.split_eval, "pairs_in": tally.pairs_in, "pairs_out": len(lengths),
        "pairs_per_split": num_per_split, "pairs_truncated": tally.truncated,
        "skipped": dict(tally.skipped),
        "skip_examples": {k: v for k, v in tally.examples.items() if v},
        "lengths": {name: percentiles(lengths[:, col])
                    for col, name in enumerate(("prompt", "chosen", "rejected"))},
        "length_bias": length_bias(lengths[:, 1], lengths[:, 2]),
    }


def summary_lines(summary: dict) -> List[str]:
    """The key lines of a summary, for stdout."""
    skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items())
    lens = "; ".join(f"{name} {s['p50']}/{s['p90']}/{s['p99']}/{s['max']}"
                     for name, s in summary["lengths"].items())
    bias, tag = summary["length_bias"], f"[{summary['split']}]"
    rule = summary["chat_template"]
    source = {None: "no template", "tokenizer": "the tokenizer's template"}.get(
        rule["source"], f"template {rule['source']}")
    lines = [f"{tag} {summary['pairs_out']} pairs -> {summary['prefix']}.bin/.idx",
             f"{tag} chat template: {rule['mode']} ({source}), applied to "
             f"{_APPLIED_TO[rule['applied_to']]}",
             f"{tag} token lengths p50/p90/p99/max: {lens}",
             f"{tag} length bias: {bias['verdict']} (mean chosen - rejected = "
             f"{bias['mean_chosen_minus_rejected']:+.1f} tokens; chosen longer in "
             f"{bias['chosen_longer_share']:.1%} of pairs)"]
    if summary["split"] != "eval":  # input-level counts: printed once
        lines.insert(1, f"{tag} records in: {summary['pairs_in']}; skipped: {skipped}; "
                        f"prompts truncated: {summary['pairs_truncated']}")
        lines += [f"{tag} invalid: {ex}" for ex in summary["skip_examples"].get("invalid", [])]
    return lines


# ---------------------------------------------------------------- writing

def _remove_outputs(prefixes: List[str]) -> None:
    for prefix in prefixes:
        for path in output_paths(prefix)[::-1]:  # .bin last: a lone .bin is never read
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _eval_mask(num_pairs: int, share: float, seed: int) -> np.ndarray:
    """bool [num_pairs]: a seeded random choice of round(share * n) (at least 1) eval pairs."""
    num_eval = max(1, int(np.floor(share * num_pairs + 0.5)))
    if num_pairs - num_eval < 1:
        raise ValueError(f"split_eval={share} leaves no training pairs out of {num_pairs}")
    mask = np.zeros(num_pairs, dtype=bool)
    mask[np.random.default_rng(seed).permutation(num_pairs)[:num_eval]] = True
    return mask


def _write(config: PreprocessConfig, encoder: PairEncoder, pairs: Iterator[tuple],
           tally: _Tally) -> List[dict]:
    """Write the split(s) and summaries; on any failure nothing is left at the prefixes."""
    splits = ["train", "eval"] if config.split_eval > 0 else ["all"]
    prefixes = [config.out, config.eval_prefix][:len(splits)]
    tmp_summaries, publishing, mode = [], False, file_mode()
    try:
        with contextlib.ExitStack() as stack:
            writers = [stack.enter_context(PairWriter(p, encoder.vocab_size)) for p in prefixes]
            if config.split_eval > 0:
                pairs = list(pairs)  # the split needs the number of kept pairs first
                targets = _eval_mask(len(pairs), config.split_eval, config.seed).astype(int)
            else:
                targets = itertools.repeat(0)
            lengths = [[] for _ in splits]
            for pair, target in zip(pairs, targets):
                writers[target].add(*pair)
                lengths[target].append([len(ids) for ids in pair])
            if not lengths[0]:
                raise ValueError(f"no pairs left to write: {tally.pairs_in} records read, "
                                 f"skipped {tally.skipped}")
            counts = {split: len(lens) for split, lens in zip(splits, lengths)}
            summaries = [build_summary(np.asarray(lens, np.int64), tally, config, prefix, split,
                                       counts, encoder)
                         for split, prefix, lens in zip(splits, prefixes, lengths)]
            for summary, writer in zip(summaries, writers):
                # PairDataset checks the summary's fingerprint against the .idx it sits beside.
                summary.update(fingerprint=writer.seal(summary["tokenizer_identity"]),
                               max_token_id=writer.max_token_id)
                fd, tmp = tempfile.mkstemp(suffix=".summary.json.tmp", dir=os.path.dirname(
                    os.path.abspath(summary["prefix"])))
                tmp_summaries.append((tmp, f"{summary['prefix']}.summary.json"))
                with os.fdopen(fd, "w") as f:
                    json.dump(summary, f, indent=2)
                    f.write("\n")
                os.chmod(tmp, mode)
            publishing = True  # leaving the block renames the .bin/.idx into place
        for tmp, final in tmp_summaries:
            os.replace(tmp, final)
        if config.split_eval == 0:  # with --force: an older split must not outlive its train set
            _remove_outputs([config.eval_prefix])
    except BaseException:
        for tmp, _ in tmp_summaries:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        if publishing:
            _remove_outputs(prefixes)
        raise
    return summaries


def run(config: PreprocessConfig, progress: bool = True) -> List[dict]:
    """Run the pipeline; returns the summaries written (the main/train prefix first).
    ValueError (``InvalidRecord`` for a bad record) on bad input or existing outputs without
    ``force``, with nothing written."""
    from tqdm import tqdm

    _check_not_overwriting(config)
    check_writable(config.out)
    encoder = load_encoder(config.tokenizer, config.rule)
    opened = [open_input(path) for path in config.inputs]  # fail on a missing input up front
    totals = [total for total, _ in opened]
    items = itertools.chain.from_iterable(it for _, it in opened)
    tally = _Tally()
    with tqdm(total=None if None in totals else sum(totals), unit="rec", disable=not progress,
              desc="preprocess", mininterval=1.0) as bar, \
            _outcomes(config, encoder, items) as outcomes:
        return _write(config, encoder, tally.kept(outcomes, config.skip_invalid, bar), tally)
