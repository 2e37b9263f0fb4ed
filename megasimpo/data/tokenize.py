"""Records -> (prompt ids, chosen ids, rejected ids): chat templates, prompt/response split, truncation.

The response ids are exactly what the loss covers; the prompt ids are everything the model reads
before them. Two encoders:

- ``ChatTemplateEncoder`` (an HF tokenizer with a chat template): prompt = the template of the
  context turns with the generation prompt, full = the template of context + the final assistant turn,
  response = ``full[len(prompt):]``. The template must render the prompt as a prefix of the full
  conversation; one that does not (e.g. it rewrites earlier turns once an answer follows) is refused
  with an error naming the tokenizer rather than silently misplacing the loss mask. A text record is
  one user turn and one assistant turn.
- ``PlainEncoder`` (a SentencePiece ``.model`` or an HF tokenizer without a chat template): prompt =
  [BOS] + ids(prompt text), response = ids(response text) + [EOS] (BOS/EOS where the tokenizer has
  them). A conversation's context is joined as plain text, turn contents separated by a blank line.

Pre-tokenized records are returned verbatim by both.
"""

import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from megasimpo.data.formats import ASSISTANT, ChatPair, Record, TextPair, TokenPair

Ids = List[int]
PLAIN_TURN_SEPARATOR = "\n\n"


class PairEncoder:
    """Turns a record into (prompt_ids, chosen_ids, rejected_ids). ``name`` identifies the tokenizer
    in messages; ``vocab_size`` bounds every id (``len(tokenizer)``, added tokens included)."""

    def __init__(self, name: str, vocab_size: int):
        self.name = name
        self.vocab_size = vocab_size

    def encode(self, record: Record) -> Tuple[Ids, Ids, Ids]:
        """Ids of one record; pre-tokenized records are returned unchanged."""
        if isinstance(record, TokenPair):
            return list(record.prompt_ids), list(record.chosen_ids), list(record.rejected_ids)
        return self._encode_text(record)

    def _encode_text(self, record: Record) -> Tuple[Ids, Ids, Ids]:
        raise NotImplementedError


class ChatTemplateEncoder(PairEncoder):
    """HF tokenizer with a chat template; see the module docstring."""

    def __init__(self, tokenizer, name: str):
        super().__init__(name, len(tokenizer))
        self.tokenizer = tokenizer

    def _render(self, turns, generation_prompt: bool) -> Ids:
        messages = [{"role": role, "content": content} for role, content in turns]
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False)
        return list(ids)

    def _response(self, context, prompt_ids: Ids, content: str) -> Ids:
        full = self._render(tuple(context) + ((ASSISTANT, content),), generation_prompt=False)
        if full[:len(prompt_ids)] != prompt_ids:
            raise ValueError(
                f"the chat template of tokenizer {self.name!r} does not render the prompt "
                "(add_generation_prompt=True) as a prefix of the full conversation, so the "
                "response tokens cannot be separated from the prompt; fix the template or "
                "pre-tokenize the data (prompt_ids/chosen_ids/rejected_ids)")
        return full[len(prompt_ids):]

    def _encode_text(self, record: Record) -> Tuple[Ids, Ids, Ids]:
        context = ((("user", record.prompt),) if isinstance(record, TextPair) else record.context)
        prompt = self._render(context, generation_prompt=True)
        return (prompt, self._response(context, prompt, record.chosen),
                self._response(context, prompt, record.rejected))


class PlainEncoder(PairEncoder):
    """Template-less tokenizer: [BOS] + prompt, response + [EOS]; see the module docstring."""

    def __init__(self, name: str, vocab_size: int, encode_text: Callable[[str], Sequence[int]],
                 bos_id: Optional[int], eos_id: Optional[int]):
        super().__init__(name, vocab_size)
        self._encode_plain = encode_text
        self.bos = [] if bos_id is None else [int(bos_id)]
        self.eos = [] if eos_id is None else [int(eos_id)]

    def _encode_text(self, record: Record) -> Tuple[Ids, Ids, Ids]:
        if isinstance(record, ChatPair):
            prompt_text = PLAIN_TURN_SEPARATOR.join(content for _, content in record.context)
        else:
            prompt_text = record.prompt
        prompt = self.bos + list(self._encode_plain(prompt_text))
        return (prompt, list(self._encode_plain(record.chosen)) + self.eos,
                list(self._encode_plain(record.rejected)) + self.eos)


def _sentencepiece_encoder(path: str) -> PlainEncoder:
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as err:
        raise ValueError(f"tokenizer {path!r} is not a readable SentencePiece model: {err}") from None
    bos, eos = sp.bos_id(), sp.eos_id()  # -1 when the model has none
    return PlainEncoder(path, sp.get_piece_size(), lambda text: sp.encode(text),
                        bos if bos >= 0 else None, eos if eos >= 0 else None)


def _hf_encoder(path: str) -> PairEncoder:
    from transformers import AutoTokenizer

    try:
        # trust_remote_code=False: a tokenizer directory's own Python code is refused, never run
        # (None would ask on stdin, and "y" would run it).
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"tokenizer {path!r} could not be loaded: {err}") from None
    if getattr(tok, "chat_template", None):
        return ChatTemplateEncoder(tok, path)
    return PlainEncoder(path, len(tok), lambda text: tok.encode(text, add_special_tokens=False),
                        tok.bos_token_id, tok.eos_token_id)


def load_encoder(path: str) -> PairEncoder:
    """``path`` is an HF tokenizer directory (its chat template is used when it has one) or a
    SentencePiece ``.model`` file; ValueError naming ``path`` otherwise."""
    if os.path.isdir(path):
        return _hf_encoder(path)
    if os.path.isfile(path):
        return _sentencepiece_encoder(path)
    raise ValueError(f"tokenizer {path!r} not found: expected an HF tokenizer directory or a "
                     "SentencePiece .model file")


def kept_prompt_length(prompt_length, longest_response, max_length):
    """The prompt-truncation rule (the one home: preprocessing, collation and the start-up count
    all call it), elementwise over ints or numpy arrays: how many of a prompt's LAST tokens stay
    so that prompt + the longer of its two responses has at most ``max_length`` tokens; -1 where
    the pair cannot fit.

    Lengths are tokens of the full sequence (prompt + response); ``data.loader``'s
    ``seq_length`` counts model inputs, one fewer. Responses are never cut (the loss is over
    them); the prompt loses tokens from the left (its end, next to the response, is what the
    response depends on most), one cut for both responses since they share it, sized for the
    longer. A non-empty prompt must keep at least one token (the predecessor that scores the
    first response token); an empty prompt stays empty and needs the response alone to fit.
    """
    kept = np.minimum(prompt_length, max_length - longest_response)
    return np.where(kept < np.minimum(prompt_length, 1), -1, kept)


def truncate_prompt(prompt_ids: Ids, chosen_ids: Ids, rejected_ids: Ids,
                    max_length: Optional[int]) -> Optional[Ids]:
    """The prompt cut by :func:`kept_prompt_length` so that prompt + each response has at most
    ``max_length`` tokens. Returns None when the pair cannot fit (it must be dropped);
    ``prompt_ids`` unchanged when it fits or ``max_length`` is None.
    """
    if max_length is None:
        return prompt_ids
    p = len(prompt_ids)
    keep = int(kept_prompt_length(p, max(len(chosen_ids), len(rejected_ids)), max_length))
    if keep < 0:
        return None
    return prompt_ids if keep == p else prompt_ids[p - keep:]
