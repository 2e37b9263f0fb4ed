"""Records -> (prompt ids, chosen ids, rejected ids): chat templates, response split, truncation.

The response ids are exactly what the loss covers; the prompt ids are everything the model reads
before them. Which records go through a chat template is ``TemplateRule``'s (``chat_template.py``,
``--chat-template auto|always|never``; by default TRL 1.16's: conversations yes, plain strings no).

- ``HFEncoder`` (an HF tokenizer directory). A templated record: prompt = the template of the
  context turns with the generation prompt, full = the template of context + the final assistant
  turn, response = ``full[len(prompt):]`` (a plain-string record is one user turn and one assistant
  turn). The template must render the prompt as a prefix of the full conversation; one that does
  not is refused with an error naming the tokenizer rather than silently misplacing the loss mask.
  A plain-string record that is not templated is tokenized as TRL tokenizes it
  (``chat_template.trl_plain_ids``: the tokenizer's own special tokens, EOS text after each
  response).
- ``PlainEncoder`` (a SentencePiece ``.model``): prompt = [BOS] + ids(prompt text), response =
  ids(response text) + [EOS] (BOS/EOS where the model has them). It has no template.

A conversation is refused where no template renders it (none in the tokenizer and no
``--chat-template-file``), unless ``--chat-template never --turn-separator TEXT`` joins its turns
(``chat_template.join_turns``). Pre-tokenized records are returned verbatim by both encoders.
"""

import os
from functools import cached_property
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from megasimpo.data.chat_template import (
    TemplateRule, find_marker, join_turns, read_template_file, template_markers, trl_plain_ids)
from megasimpo.data.formats import ASSISTANT, ChatPair, InvalidRecord, Record, TokenPair
from megasimpo.data.tokenizer_identity import hf_identity, spm_identity

Ids = List[int]


class PairEncoder:
    """Turns a record into (prompt_ids, chosen_ids, rejected_ids). ``name`` identifies the tokenizer
    in messages; ``vocab_size`` bounds every id (``len(tokenizer)``, added tokens included)."""

    template: Optional[str] = None  # the chat template applied, if any
    template_source: Optional[str] = None  # "tokenizer" or the --chat-template-file path

    def __init__(self, name: str, vocab_size: int, rule: TemplateRule):
        self.name = name
        self.vocab_size = vocab_size
        self.rule = rule

    def encode(self, record: Record) -> Tuple[Ids, Ids, Ids]:
        """Ids of one record; pre-tokenized records are returned unchanged."""
        if isinstance(record, TokenPair):
            return list(record.prompt_ids), list(record.chosen_ids), list(record.rejected_ids)
        return self._encode_text(record)

    def _encode_text(self, record: Record) -> Tuple[Ids, Ids, Ids]:
        raise NotImplementedError

    def _no_template_fixes(self) -> str:
        return ("pass --chat-template-file FILE (a Jinja chat template), or --chat-template "
                "never --turn-separator TEXT to join the turns' contents without roles")

    def check(self, obj: Any, record: Record, where: str) -> None:
        """Refuses what the encoder cannot encode faithfully, before encoding: a conversation with
        no template to render it (ValueError: a flag is needed, not a skip), a conversation under
        ``never`` without ``--turn-separator``, and text that already carries the template's
        markers where the template would add them again (``InvalidRecord`` naming the field)."""
        if isinstance(record, TokenPair):
            return
        conversational = isinstance(record, ChatPair)
        if conversational and self.rule.mode == "never" and self.rule.turn_separator is None:
            raise ValueError(f"{where}: a conversational record under --chat-template never: "
                             "pass --turn-separator TEXT to join its turns' contents")
        if not self.rule.templated(conversational):
            return
        if self.template is None:
            raise ValueError(f"{where}: a conversational record, but tokenizer {self.name!r} has "
                             f"no chat template to render its turns with; {self._no_template_fixes()}")
        hit = find_marker(obj, self.markers)
        if hit is not None:
            field, marker = hit
            raise InvalidRecord(where, field, f"already contains the chat template's marker "
                                f"{marker!r} (the text is formatted) and the template would add it "
                                "again; pass --chat-template never to tokenize it as it is")

    @cached_property
    def markers(self) -> Tuple[str, ...]:
        """The special tokens the applied template writes (none without a template)."""
        return ()

    def identity(self) -> str:
        """The tokenizer's identity (``tokenizer_identity.py``)."""
        raise NotImplementedError

    def template_record(self) -> dict:
        """What the summary records of the template rule applied (``chat_template`` key)."""
        return {"mode": self.rule.mode, "source": self.template_source,
                "applied_to": self.rule.applied_to(self.template is not None)}


class HFEncoder(PairEncoder):
    """HF tokenizer (with or without a chat template); see the module docstring."""

    def __init__(self, tokenizer, name: str, rule: TemplateRule):
        super().__init__(name, len(tokenizer), rule)
        self.tokenizer = tokenizer
        if rule.mode == "never":
            pass
        elif rule.template_file is not None:
            self.template = read_template_file(rule.template_file)
            self.template_source = rule.template_file
        elif getattr(tokenizer, "chat_template", None):
            self.template, self.template_source = tokenizer.chat_template, "tokenizer"
        if rule.mode == "always" and self.template is None:
            raise ValueError(f"--chat-template always: tokenizer {name!r} has no chat template; "
                             "pass --chat-template-file FILE, or use --chat-template auto")

    @cached_property
    def markers(self) -> Tuple[str, ...]:
        return template_markers(self.tokenizer, self.template) if self.template else ()

    def identity(self) -> str:
        return hf_identity(self.tokenizer)

    def _render(self, turns, generation_prompt: bool) -> Ids:
        messages = [{"role": role, "content": content} for role, content in turns]
        ids = self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, add_generation_prompt=generation_prompt,
            tokenize=True, return_dict=False)
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
        conversational = isinstance(record, ChatPair)
        if self.rule.templated(conversational):
            if self.template is None:
                raise ValueError(f"tokenizer {self.name!r} has no chat template to render a "
                                 f"conversation with; {self._no_template_fixes()}")
            context = record.context if conversational else (("user", record.prompt),)
            prompt = self._render(context, generation_prompt=True)
            return (prompt, self._response(context, prompt, record.chosen),
                    self._response(context, prompt, record.rejected))
        prompt = (join_turns(record.context, self._separator()) if conversational
                  else record.prompt)
        return trl_plain_ids(self.tokenizer, prompt, record.chosen, record.rejected)

    def _separator(self) -> str:
        if self.rule.turn_separator is None:
            raise ValueError("a conversational record under --chat-template never needs "
                             "--turn-separator TEXT")
        return self.rule.turn_separator


class PlainEncoder(PairEncoder):
    """Template-less SentencePiece model: [BOS] + prompt, response + [EOS]; see the module
    docstring."""

    def __init__(self, name: str, vocab_size: int, encode_text: Callable[[str], Sequence[int]],
                 bos_id: Optional[int], eos_id: Optional[int], rule: TemplateRule = TemplateRule()):
        super().__init__(name, vocab_size, rule)
        self._encode_plain = encode_text
        self.bos = [] if bos_id is None else [int(bos_id)]
        self.eos = [] if eos_id is None else [int(eos_id)]

    def _no_template_fixes(self) -> str:
        return ("pass --chat-template never --turn-separator TEXT to join the turns' contents "
                "without roles, or use the model's HF tokenizer directory with --chat-template-file")

    def identity(self) -> str:
        return spm_identity(self.name)

    def _encode_text(self, record: Record) -> Tuple[Ids, Ids, Ids]:
        if isinstance(record, ChatPair):
            if self.rule.turn_separator is None:
                raise ValueError(f"SentencePiece model {self.name!r} has no chat template to "
                                 f"render a conversation with; {self._no_template_fixes()}")
            prompt_text = join_turns(record.context, self.rule.turn_separator)
        else:
            prompt_text = record.prompt
        prompt = self.bos + list(self._encode_plain(prompt_text))
        return (prompt, list(self._encode_plain(record.chosen)) + self.eos,
                list(self._encode_plain(record.rejected)) + self.eos)


def _sentencepiece_encoder(path: str, rule: TemplateRule) -> PlainEncoder:
    import sentencepiece

    if rule.template_file is not None or rule.mode == "always":
        raise ValueError(f"tokenizer {path!r} is a SentencePiece model, which has no chat "
                         "template: --chat-template-file / --chat-template always need an HF "
                         "tokenizer directory")
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as err:
        raise ValueError(f"tokenizer {path!r} is not a readable SentencePiece model: {err}") from None
    bos, eos = sp.bos_id(), sp.eos_id()  # -1 when the model has none
    return PlainEncoder(path, sp.get_piece_size(), lambda text: sp.encode(text),
                        bos if bos >= 0 else None, eos if eos >= 0 else None, rule)


def load_hf_tokenizer(path: str):
    """The HF tokenizer of directory ``path``, loaded as preprocessing and the checkpoint check
    load it; ValueError naming ``path`` when it cannot be."""
    from transformers import AutoTokenizer

    try:
        # trust_remote_code=False: a tokenizer directory's own Python code is refused, never run
        # (None would ask on stdin, and "y" would run it).
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"tokenizer {path!r} could not be loaded: {err}") from None


def load_encoder(path: str, rule: TemplateRule = TemplateRule()) -> PairEncoder:
    """``path`` is an HF tokenizer directory or a SentencePiece ``.model`` file, encoded by
    ``rule`` (default: TRL's); ValueError naming ``path`` otherwise."""
    if os.path.isdir(path):
        return HFEncoder(load_hf_tokenizer(path), path, rule)
    if os.path.isfile(path):
        return _sentencepiece_encoder(path, rule)
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
