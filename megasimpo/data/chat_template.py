"""Which records go through a chat template, and how plain strings are tokenized without one.

The rule (``--chat-template``) follows TRL 1.16's ``DPOTrainer._prepare_dataset`` by default:

- ``auto`` (default): conversational records (messages) are rendered with the chat template;
  plain-string records (``prompt/chosen/rejected`` strings) are tokenized as TRL tokenizes them
  (:func:`trl_plain_ids`), so a prompt that is already formatted is not formatted again;
- ``always``: every text record goes through the template (a string prompt is one user turn and
  each string response one assistant turn);
- ``never``: nothing does. Plain strings are tokenized as under ``auto``; a conversation needs
  ``--turn-separator TEXT`` and becomes one plain-string record: prompt = each context turn's
  content followed by TEXT (roles dropped), response = the last assistant turn's content
  (:func:`join_turns`).

``--chat-template-file FILE`` replaces the tokenizer's template (e.g. SimPO's Gemma-2 recipe);
it means something only where a template is applied (``auto`` with conversational records,
``always``). Text that goes through the template must not already carry the template's own
markers (the special tokens the template renders, e.g. ``<|im_start|>``): the template would add
them a second time, so such a record is refused (:func:`find_marker`).
"""

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

MODES = ("auto", "always", "never")
# Probe conversation rendered to learn which special tokens a template writes (markers).
_PROBE = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]


@dataclass(frozen=True)
class TemplateRule:
    """The chat-template flags of one preprocessing run (picklable: sent to the workers)."""

    mode: str = "auto"  # auto | always | never (module docstring)
    template_file: Optional[str] = None  # a Jinja chat template used instead of the tokenizer's
    turn_separator: Optional[str] = None  # with never: joins a conversation's turn contents

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"--chat-template {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.mode == "never" and self.template_file is not None:
            raise ValueError("--chat-template-file is used only where a template is applied; "
                             "drop it or drop --chat-template never")
        if self.turn_separator is not None and self.mode != "never":
            raise ValueError("--turn-separator joins turns only with --chat-template never "
                             f"(got --chat-template {self.mode}); drop it, or pass "
                             "--chat-template never to join conversations without a template")

    def templated(self, conversational: bool) -> bool:
        """Whether a record (conversational or plain strings) goes through the template."""
        return self.mode == "always" or (self.mode == "auto" and conversational)

    def applied_to(self, has_template: bool) -> str:
        """"all" | "conversational" | "none": the records the template is applied to."""
        if self.mode == "never" or not has_template:
            return "none"
        return "all" if self.mode == "always" else "conversational"


def read_template_file(path: str) -> str:
    """The Jinja text of ``--chat-template-file``; ValueError naming the file when unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--chat-template-file {path}: cannot be read ({err})") from None
    if not text.strip():
        raise ValueError(f"--chat-template-file {path}: empty template")
    return text


def template_markers(tok, template: str) -> Tuple[str, ...]:
    """The tokenizer's special/added tokens that ``template`` writes around a conversation (e.g.
    ``<|im_start|>``, ``<|im_end|>``), longest first."""
    rendered = "".join(
        tok.apply_chat_template(_PROBE[:n], chat_template=template, tokenize=False,
                                add_generation_prompt=n == 1) for n in (1, 2))
    tokens = {t.content for t in tok.added_tokens_decoder.values()} | set(tok.all_special_tokens)
    return tuple(sorted((t for t in tokens if t and t in rendered), key=lambda t: (-len(t), t)))


def _texts(obj: dict) -> List[Tuple[str, str]]:
    """(field path, text) of every string the template would render in a raw record."""
    out = []
    for key in ("prompt", "chosen", "rejected"):
        value = obj.get(key)
        if isinstance(value, str):
            out.append((key, value))
        elif isinstance(value, (list, tuple)):
            out += [(f"{key}[{i}].content", m["content"]) for i, m in enumerate(value)
                    if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return out


def find_marker(obj: Any, markers: Sequence[str]) -> Optional[Tuple[str, str]]:
    """(field, marker) of the first text of raw record ``obj`` that already contains one of the
    template's ``markers``, or None."""
    if not markers or not isinstance(obj, dict):
        return None
    for field, text in _texts(obj):
        hit = next((m for m in markers if m in text), None)
        if hit is not None:
            return field, hit
    return None


def join_turns(context: Sequence[Tuple[str, str]], separator: str) -> str:
    """The ``never`` rule's prompt text of a conversation: each context turn's content followed
    by ``separator`` (roles dropped); the response content follows it unchanged."""
    return "".join(content + separator for _, content in context)


def trl_plain_ids(tok, prompt: str, chosen: str, rejected: str):
    """(prompt, chosen, rejected) ids of a plain-string record as TRL 1.16's DPOTrainer makes them
    (``trl/trainer/dpo_trainer.py``, ``_prepare_dataset``: ``add_eos`` then ``tokenize_fn``):

    1. the tokenizer's EOS text is appended to each response that does not already end with it;
    2. ``tok(prompt)``, ``tok(prompt + chosen)`` and ``tok(prompt + rejected)`` are tokenized with
       the tokenizer's own special tokens (``add_special_tokens=True``: a BOS where its
       post-processor adds one), the texts concatenated before tokenizing;
    3. the prompt is the longest leading run both full sequences share with the tokenized prompt
       (``os.path.commonprefix`` of the three id lists): a merge across the prompt/response
       boundary moves the split left, never into the prompt; each response is the rest of its
       full sequence.
    """
    eos = tok.eos_token
    if eos:
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
    prompt_ids = list(tok(text=prompt)["input_ids"])
    full_c = list(tok(text=prompt + chosen)["input_ids"])
    full_r = list(tok(text=prompt + rejected)["input_ids"])
    n = len(os.path.commonprefix([prompt_ids, full_c, full_r]))
    return prompt_ids[:n], full_c[n:], full_r[n:]
