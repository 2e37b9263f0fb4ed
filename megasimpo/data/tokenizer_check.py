"""The start-up check of train, evaluation and score data against the checkpoint: the tokenizer
identity each dataset records (``tokenizer_identity.py``) must be that of the checkpoint's
``tokenizer/``; what cannot be checked is said in one note."""

import json
import os
from typing import List, Optional

from megasimpo.data.tokenize import load_hf_tokenizer
from megasimpo.data.tokenizer_identity import VERSION, hf_identity, spm_identity, split_identity

_FIX = "re-run tools/preprocess_data.py with --tokenizer {tok}"


def checkpoint_tokenizer(ckpt: str) -> Optional[str]:
    """The tokenizer directory a checkpoint carries (``CKPT/tokenizer``; a LoRA checkpoint without
    one: its base's), or None."""
    own = os.path.join(ckpt, "tokenizer")
    if os.path.isdir(own):
        return own
    try:
        with open(os.path.join(ckpt, "megasimpo.json")) as f:
            base = json.load(f).get("base")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(base, dict):
        from megasimpo.lora_checkpoint import find_base

        found = find_base(base, ckpt)
        if found and os.path.isdir(os.path.join(found, "tokenizer")):
            return os.path.join(found, "tokenizer")
    return None


def _identity_of_dir(tok_dir: str, kind: str) -> Optional[str]:
    """Identity of kind ``kind`` of a checkpoint's tokenizer directory, or None when it holds no
    such tokenizer (an SentencePiece identity needs ``tokenizer.model``)."""
    if kind == "spm":
        model = os.path.join(tok_dir, "tokenizer.model")
        return spm_identity(model) if os.path.isfile(model) else None
    return hf_identity(load_hf_tokenizer(tok_dir))


def check_datasets(parts, ckpt: str) -> List[str]:
    """Compares the tokenizer identity of each dataset in ``parts`` (``PairDataset``s) with that
    of checkpoint ``ckpt``'s tokenizer. ValueError naming the dataset, the checkpoint and the fix
    on a mismatch; returns the notes (at most one line) on what could not be checked."""
    with_id = [ds for ds in parts if ds.tokenizer_identity]
    unchecked = [ds.prefix for ds in parts if not ds.tokenizer_identity]
    reasons = []
    if unchecked:
        reasons.append(f"{', '.join(unchecked)} record(s) no tokenizer identity (pre-tokenized "
                       "records, a stamped Megatron file or a dataset written before identities)")
    tok_dir = checkpoint_tokenizer(ckpt) if with_id else None
    if with_id and tok_dir is None:
        reasons.append(f"checkpoint {ckpt} has no tokenizer/ directory")
    elif with_id:
        cache = {}
        for ds in with_id:
            version, kind = split_identity(ds.tokenizer_identity)
            if version != VERSION:
                reasons.append(f"{ds.prefix} records a tokenizer identity of another version "
                               f"({version}) than this megasimpo's ({VERSION})")
                continue
            if kind not in cache:
                try:
                    cache[kind] = _identity_of_dir(tok_dir, kind)
                except ValueError as err:
                    cache[kind] = err
            theirs = cache[kind]
            if isinstance(theirs, ValueError) or theirs is None:
                why = f" ({theirs})" if theirs is not None else f" (no {kind} tokenizer there)"
                reasons.append(f"the tokenizer of {tok_dir} could not be read{why}")
            elif theirs != ds.tokenizer_identity:
                raise ValueError(
                    f"{ds.prefix} was tokenized with another tokenizer than checkpoint {ckpt}'s "
                    f"(identity {ds.tokenizer_identity} in {ds.prefix}.idx, {theirs} of "
                    f"{tok_dir}): {_FIX.format(tok=tok_dir)}")
    if not reasons:
        return []
    return [f"tokenizer not checked against checkpoint {ckpt}: " + "; ".join(reasons)]


def check_against_checkpoint(datasets, ckpt: str, *, prog: str, quiet: bool = False) -> None:
    """The start-up check of train, evaluation and score data (``datasets``: prefixes,
    ``PairDataset``s or ``ConcatPairs``; one or a list) against checkpoint ``ckpt``: ValueError
    on a mismatch (:func:`check_datasets`); otherwise prints the note on what could not be
    checked, as ``PROG: note: ...``, unless ``quiet`` (ranks other than 0)."""
    from megasimpo.data.indexed import dataset_parts

    for note in check_datasets(dataset_parts(datasets), ckpt):
        if not quiet:
            print(f"{prog}: note: {note}", flush=True)
