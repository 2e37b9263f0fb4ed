"""The identity of a tokenizer (what turns text into ids), recorded in every dataset and checked
against the checkpoint's ``tokenizer/`` before step 1 (train, evaluation and score data).

An identity is ``"VERSION:KIND:HEX"`` (blake2b, 16 bytes):

- ``tokid1:hf:`` an HF tokenizer: over the canonical JSON (sorted keys, no spaces) of its fast
  backend's ``model`` (vocabulary, merges and their options), ``normalizer``, ``pre_tokenizer``
  and ``added_tokens`` (special and added tokens with their flags), plus the names of its
  BOS/EOS/UNK/PAD tokens (preprocessing appends EOS). Not the chat template (a user may override
  it; the summary records it separately), not the decoder, padding or truncation settings.
  A tokenizer without a fast backend: over its vocabulary (token -> id) and special tokens.
- ``tokid1:spm:`` a SentencePiece ``.model``: over the model file's bytes (pieces, scores and
  normaliser are all in it).

The version prefix lets a later rule coexist: identities of different versions or kinds are
not compared (a note says so) rather than called a mismatch. Where it is stored: the ``.idx``
trailer's ``"tokenizer"`` key (``fingerprint.py``; absent in older datasets, stamped Megatron
files and all-pre-tokenized data) and the summary's ``tokenizer_identity``.
"""

import hashlib
import json
import os
from typing import List, Optional, Tuple

VERSION = "tokid1"
_BACKEND_SECTIONS = ("model", "normalizer", "pre_tokenizer", "added_tokens")
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_FIX = "re-run tools/preprocess_data.py with --tokenizer {tok}"


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def hf_identity(tok) -> str:
    """Identity of a loaded HF tokenizer (module docstring)."""
    specials = {name: getattr(tok, name, None) for name in _SPECIAL_NAMES}
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        full = json.loads(backend.to_str())
        body = {key: full.get(key) for key in _BACKEND_SECTIONS}
    else:
        body = {"vocab": tok.get_vocab()}
    return f"{VERSION}:hf:{_digest(_canonical({'backend': body, 'special': specials}))}"


def spm_identity(path: str) -> str:
    """Identity of a SentencePiece model file (module docstring)."""
    with open(path, "rb") as f:
        return f"{VERSION}:spm:{_digest(f.read())}"


def _split(identity: str) -> Tuple[str, str]:
    """(version, kind) of an identity string."""
    version, kind, _ = (identity.split(":") + ["", ""])[:3]
    return version, kind


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
    from megasimpo.data.tokenize import load_hf_tokenizer

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
            version, kind = _split(ds.tokenizer_identity)
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
