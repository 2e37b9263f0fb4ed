"""The identity of a tokenizer (what turns text into ids), recorded in every dataset and checked
against the checkpoint's ``tokenizer/`` before step 1 (``tokenizer_check.py``).

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
from typing import Tuple

VERSION = "tokid1"
_BACKEND_SECTIONS = ("model", "normalizer", "pre_tokenizer", "added_tokens")
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


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


def split_identity(identity: str) -> Tuple[str, str]:
    """(version, kind) of an identity string."""
    version, kind, _ = (identity.split(":") + ["", ""])[:3]
    return version, kind
