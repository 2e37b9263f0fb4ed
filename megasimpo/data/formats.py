"""Preference record schemas (docs/architecture.md, "Contracts") and their validation.

Three record formats are accepted; extra fields are ignored, and a field whose value is ``None`` counts
as missing (``datasets`` fills the fields a row lacks with ``None``):

- text: ``{"prompt": str, "chosen": str, "rejected": str}`` -> ``TextPair``;
- conversational: ``{"prompt": str|messages, "chosen": messages, "rejected": messages}`` -> ``ChatPair``.
  ``chosen``/``rejected`` either hold only the completion (TRL: they start with an assistant turn, the
  context is ``prompt`` + every turn before the last) or the whole conversation (UltraFeedback-binarized:
  they start with a user/system turn and already contain the prompt, so ``prompt`` is not needed).
  The response is the last message, which must be an assistant turn; everything before it is prompt.
  A string prompt with string responses is a text pair; a message-list prompt with string responses is
  a conversation whose responses are single assistant turns;
- pre-tokenized: ``{"prompt_ids": [int], "chosen_ids": [int], "rejected_ids": [int]}`` -> ``TokenPair``.

Every problem raises ``InvalidRecord`` (a ``ValueError``) whose message names the file, the place in it
(``line N``, 1-based, for JSON Lines; ``row N``, 0-based like ``dataset[N]``, otherwise) and the field.
"""

import json
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import numpy as np

TEXT_FIELDS = ("prompt", "chosen", "rejected")
TOKEN_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")
ASSISTANT = "assistant"

Message = Tuple[str, str]  # (role, content); only these two keys of a message are kept


class InvalidRecord(ValueError):
    """A record that cannot be used. ``where`` is "FILE: line N" / "FILE: row N"; ``field`` the
    offending field path (e.g. ``chosen[1].role``) or None when the record as a whole is bad."""

    def __init__(self, where: str, field: Optional[str], problem: str):
        self.where, self.field, self.problem = where, field, problem
        subject = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {subject}{problem}")

    def __reduce__(self):  # rebuilt from its parts when it crosses a process boundary
        return (InvalidRecord, (self.where, self.field, self.problem))


def line_location(path: str, line: int) -> str:
    """Location of the record on 1-based ``line`` of a JSON Lines file."""
    return f"{path}: line {line}"


def row_location(path: str, row: int) -> str:
    """Location of the 0-based ``row`` of a JSON array, Parquet file or saved dataset."""
    return f"{path}: row {row}"


@dataclass(frozen=True)
class TextPair:
    """Plain strings; the prompt is the text before the response."""

    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class ChatPair:
    """A conversation ``context`` (the turns before the response, shared by both responses) and the
    contents of the chosen and rejected final assistant turns."""

    context: Tuple[Message, ...]
    chosen: str
    rejected: str


@dataclass(frozen=True)
class TokenPair:
    """Pre-tokenized ids, used verbatim."""

    prompt_ids: Tuple[int, ...]
    chosen_ids: Tuple[int, ...]
    rejected_ids: Tuple[int, ...]


Record = Union[TextPair, ChatPair, TokenPair]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def parse_json_line(text: str, where: str) -> Any:
    """One JSON Lines line -> its object; malformed JSON raises ``InvalidRecord``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidRecord(where, None, f"malformed JSON: {err.msg} (column {err.colno})") from None


def _messages(value: Any, field: str, where: str) -> Tuple[Message, ...]:
    """Validate a list of ``{"role": str, "content": str}`` messages."""
    if not isinstance(value, (list, tuple)):
        raise InvalidRecord(where, field, f"expected a list of messages, got {_type_name(value)}")
    if len(value) == 0:
        raise InvalidRecord(where, field, "empty list of messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise InvalidRecord(where, f"{field}[{i}]",
                                f"expected a message object, got {_type_name(msg)}")
        for key in ("role", "content"):
            if msg.get(key) is None:
                raise InvalidRecord(where, f"{field}[{i}].{key}", "missing")
            if not isinstance(msg[key], str):
                raise InvalidRecord(where, f"{field}[{i}].{key}",
                                    f"expected a string, got {_type_name(msg[key])}")
        out.append((msg["role"], msg["content"]))
    return tuple(out)


def _split_conversation(prompt: Optional[Tuple[Message, ...]], conversation: Tuple[Message, ...],
                        field: str, where: str) -> Tuple[Tuple[Message, ...], str]:
    """(context, response content) of one side; see the module docstring for the two layouts."""
    last = len(conversation) - 1
    role = conversation[last][0]
    if role != ASSISTANT:
        raise InvalidRecord(where, f"{field}[{last}].role",
                            f"the last message must be the assistant response, got {role!r}")
    if conversation[0][0] != ASSISTANT:  # whole conversation, prompt turns included
        return conversation[:last], conversation[last][1]
    if prompt is None:
        raise InvalidRecord(where, "prompt",
                            f"missing (needed because '{field}' holds only the completion)")
    return prompt + conversation[:last], conversation[last][1]


def _token_ids(value: Any, field: str, where: str) -> Tuple[int, ...]:
    """Validate a list of non-negative integer token ids (bools and floats are rejected)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise InvalidRecord(where, field, f"expected a list of token ids, got {_type_name(value)}")
    for i, tok in enumerate(value):
        if isinstance(tok, bool) or not isinstance(tok, numbers.Integral):
            raise InvalidRecord(where, f"{field}[{i}]",
                                f"expected an integer token id, got {_type_name(tok)} {tok!r}")
        if tok < 0:
            raise InvalidRecord(where, f"{field}[{i}]", f"negative token id {tok}")
    return tuple(int(t) for t in value)


def _prompt_messages(prompt: Any, where: str) -> Optional[Tuple[Message, ...]]:
    """The prompt as messages: a string is one user turn; an empty list is no turn at all."""
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return (("user", prompt),)
    return _messages(prompt, "prompt", where) if len(prompt) else ()


def _present(obj: dict, key: str) -> bool:
    return obj.get(key) is not None


def parse_record(obj: Any, where: str) -> Record:
    """A decoded record (dict) -> ``TextPair`` | ``ChatPair`` | ``TokenPair``; ``InvalidRecord``
    naming ``where`` and the field on any problem."""
    if not isinstance(obj, dict):
        raise InvalidRecord(where, None, f"expected a JSON object, got {_type_name(obj)}")
    if any(_present(obj, key) for key in TOKEN_FIELDS):
        ids = []
        for key in TOKEN_FIELDS:
            if not _present(obj, key):
                raise InvalidRecord(where, key, "missing (pre-tokenized records need "
                                    + ", ".join(TOKEN_FIELDS) + ")")
            ids.append(_token_ids(obj[key], key, where))
        return TokenPair(*ids)
    if not any(_present(obj, key) for key in TEXT_FIELDS):
        raise InvalidRecord(where, None, "record matches no known format: expected fields "
                            f"{'/'.join(TEXT_FIELDS)} or {'/'.join(TOKEN_FIELDS)}, got "
                            f"{sorted(k for k in obj if _present(obj, k))}")
    for key in ("chosen", "rejected"):
        if not _present(obj, key):
            raise InvalidRecord(where, key, "missing")
        if not isinstance(obj[key], (str, list, tuple)):
            raise InvalidRecord(where, key, "expected a string or a list of messages, got "
                                f"{_type_name(obj[key])}")
    chosen, rejected = obj["chosen"], obj["rejected"]
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise InvalidRecord(where, "rejected", f"got {_type_name(rejected)} but 'chosen' is "
                            f"{_type_name(chosen)}; both must be strings or both message lists")
    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, (str, list, tuple)):
        raise InvalidRecord(where, "prompt", "expected a string or a list of messages, got "
                            f"{_type_name(prompt)}")
    if isinstance(chosen, str):
        if prompt is None:
            raise InvalidRecord(where, "prompt", "missing")
        if isinstance(prompt, str):
            return TextPair(prompt, chosen, rejected)
        return ChatPair(_prompt_messages(prompt, where), chosen, rejected)
    prompt_messages = _prompt_messages(prompt, where)
    context_c, response_c = _split_conversation(
        prompt_messages, _messages(chosen, "chosen", where), "chosen", where)
    context_r, response_r = _split_conversation(
        prompt_messages, _messages(rejected, "rejected", where), "rejected", where)
    if context_c != context_r:
        raise InvalidRecord(where, "rejected", "the turns before the last assistant turn differ "
                            "from those of 'chosen'; a pair must share its prompt")
    return ChatPair(context_c, response_c, response_r)


def check_token_range(record: TokenPair, vocab_size: int, where: str) -> None:
    """``InvalidRecord`` if a pre-tokenized id is outside the tokenizer's [0, vocab_size)."""
    for key in TOKEN_FIELDS:
        for i, tok in enumerate(getattr(record, key)):
            if tok >= vocab_size:
                raise InvalidRecord(where, f"{key}[{i}]",
                                    f"token id {tok} is outside the vocabulary [0, {vocab_size})")


def has_empty_response(record: Record) -> bool:
    """True when the chosen or rejected response is empty (or only whitespace)."""
    if isinstance(record, TokenPair):
        return not record.chosen_ids or not record.rejected_ids
    return not record.chosen.strip() or not record.rejected.strip()
