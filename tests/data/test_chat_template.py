"""The chat-template rule (``--chat-template auto|always|never``) against TRL 1.16's own
``DPOTrainer._prepare_dataset`` on a tiny Qwen2-style tokenizer (byte-level BPE, ChatML): the
default tokenizes plain strings as TRL does (a pre-formatted prompt is not templated twice) and
templates conversations; text carrying the template's markers is refused where the template
would add them again; a tokenizer without a template refuses conversations unless their turns
are joined (``never`` + ``--turn-separator``, checked against TRL on the joined strings)."""

import json
import types

import pytest

from megasimpo.data.chat_template import TemplateRule
from megasimpo.data.formats import InvalidRecord
from megasimpo.data.preprocess import summary_lines
from test_preprocess import preprocess, read_pairs, write_jsonl
from tiny_tokenizers import LLAMA3_TEMPLATE, build_qwen2_tokenizer

PREFORMATTED = {"prompt": "<|im_start|>user\nwhat is two plus two?<|im_end|>\n"
                          "<|im_start|>assistant\n",
                "chosen": "four<|im_end|>\n", "rejected": "five, I think<|im_end|>\n"}
PLAIN = {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Berlin."}
CHAT = {"prompt": [{"role": "system", "content": "be brief"},
                   {"role": "user", "content": "tell me a joke"},
                   {"role": "assistant", "content": "why did the chicken cross the road"},
                   {"role": "user", "content": "no idea"}],
        "chosen": [{"role": "assistant", "content": "to get to the other side"}],
        "rejected": [{"role": "assistant", "content": "thanks"}]}


@pytest.fixture(scope="module")
def qwen2(shared_build):
    return shared_build(("tokenizer", "qwen2"), build_qwen2_tokenizer)


@pytest.fixture(scope="module")
def qwen2_bare(shared_build):
    return shared_build(("tokenizer", "qwen2-no-template"),
                        lambda path: build_qwen2_tokenizer(path, template=False))


def trl_ids(tokenizer_dir, records, chat_template=None):
    """[(prompt, chosen, rejected)] as TRL 1.16's DPOTrainer tokenizes ``records`` (its own
    ``_prepare_dataset``, called with the only attribute it reads)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.trainer.dpo_trainer import DPOTrainer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if chat_template is not None:
        tok.chat_template = chat_template
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_end")
    out = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok),
                                      Dataset.from_list(records), tok, args, "train")
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in out]


def run(tmp_path, tokenizer, records, name, **kw):
    summaries, prefix = preprocess(tmp_path, [write_jsonl(tmp_path / f"{name}.jsonl", records)],
                                   tokenizer, name=f"{name}/ds", **kw)
    return summaries[0], read_pairs(prefix)


def test_auto_is_trls_rule_and_does_not_template_twice(tmp_path, qwen2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen2)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    # TRL decides per dataset (its first record), so each kind is compared in its own dataset.
    for name, records in (("plain", [PREFORMATTED, PLAIN]), ("chat", [CHAT])):
        summary, pairs = run(tmp_path, qwen2, records, name, chat_template="auto")
        assert pairs == trl_ids(qwen2, records), name
        assert summary["chat_template"] == {"mode": "auto", "source": "tokenizer",
                                            "applied_to": "conversational"}
    # The pre-formatted prompt keeps its own two <|im_start|> (user, assistant), not four.
    summary, pairs = run(tmp_path, qwen2, [PREFORMATTED], "pre", chat_template="auto")
    assert pairs[0][0].count(start) == 2 and start not in pairs[0][1] + pairs[0][2]
    assert tok.decode(pairs[0][0] + pairs[0][1]) == (PREFORMATTED["prompt"] + "four<|im_end|>\n"
                                                      "<|im_end|>")  # TRL's EOS after "\n"
    assert "[all] chat template: auto (the tokenizer's template), applied to conversational " \
           "records" in summary_lines(summary)


def test_always_and_conversations_refuse_text_carrying_the_markers(tmp_path, qwen2):
    path = write_jsonl(tmp_path / "pre.jsonl", [PLAIN, PREFORMATTED])
    with pytest.raises(InvalidRecord) as info:
        preprocess(tmp_path, [path], qwen2, chat_template="always")
    assert str(info.value).startswith(f"{path}: line 2: field 'prompt': already contains the "
                                      "chat template's marker '<|im_start|>'")
    assert "--chat-template never" in str(info.value)
    chat = json.loads(json.dumps(CHAT))
    chat["chosen"][0]["content"] = "to get to the other side<|im_end|>"
    path = write_jsonl(tmp_path / "chat.jsonl", [chat])
    with pytest.raises(InvalidRecord, match=r"line 1: field 'chosen\[0\].content': already "
                                            "contains the chat template's marker '<|im_end|>'"):
        preprocess(tmp_path, [path], qwen2, chat_template="auto")
    # always on unformatted strings: one user turn, one assistant turn of the template.
    summary, pairs = run(tmp_path, qwen2, [PLAIN], "always", chat_template="always")
    conv = {"prompt": [{"role": "user", "content": PLAIN["prompt"]}],
            "chosen": [{"role": "assistant", "content": PLAIN["chosen"]}],
            "rejected": [{"role": "assistant", "content": PLAIN["rejected"]}]}
    assert pairs == trl_ids(qwen2, [conv]) and summary["chat_template"]["applied_to"] == "all"


def test_template_file_replaces_the_tokenizers(tmp_path, qwen2):
    template = tmp_path / "other.jinja"
    template.write_text(LLAMA3_TEMPLATE.replace("<|start_header_id|>", "<|im_start|>")
                        .replace("<|end_header_id|>", "\n").replace("<|eot_id|>", "<|im_end|>"))
    summary, pairs = run(tmp_path, qwen2, [CHAT], "file", chat_template="auto",
                         chat_template_file=str(template))
    assert pairs == trl_ids(qwen2, [CHAT], chat_template=template.read_text())
    assert pairs != trl_ids(qwen2, [CHAT])
    assert summary["chat_template"] == {"mode": "auto", "source": str(template),
                                        "applied_to": "conversational"}


@pytest.mark.parametrize("turns", [1, 4])
def test_no_template_refuses_conversations_unless_joined(tmp_path, qwen2_bare, turns):
    record = dict(CHAT, prompt=CHAT["prompt"][-turns:])
    path = write_jsonl(tmp_path / "chat.jsonl", [record])
    with pytest.raises(ValueError) as info:
        preprocess(tmp_path, [path], qwen2_bare, chat_template="auto")
    assert str(info.value) == (
        f"{path}: line 1: a conversational record, but tokenizer {qwen2_bare!r} has no chat "
        "template to render its turns with; pass --chat-template-file FILE (a Jinja chat "
        "template), or --chat-template never --turn-separator TEXT to join the turns' contents "
        "without roles")
    with pytest.raises(ValueError, match="pass --turn-separator TEXT"):
        preprocess(tmp_path, [path], qwen2_bare, chat_template="never")
    # never + separator: each context turn's content followed by it, then the response, which
    # is TRL's rule on those joined strings.
    summary, pairs = run(tmp_path, qwen2_bare, [record], f"joined{turns}", chat_template="never",
                         turn_separator="\n\n")
    joined = {"prompt": "".join(m["content"] + "\n\n" for m in record["prompt"]),
              "chosen": record["chosen"][0]["content"],
              "rejected": record["rejected"][0]["content"]}
    assert pairs == trl_ids(qwen2_bare, [joined])
    assert summary["chat_template"] == {"mode": "never", "source": None, "applied_to": "none"}


@pytest.mark.parametrize("kw, message", [
    (dict(mode="never", template_file="t.jinja"), "--chat-template-file is used only"),
    (dict(mode="auto", turn_separator="\n"), "--turn-separator joins turns only with"),
    (dict(mode="sometimes"), "expected one of auto, always, never"),
])
def test_rule_flags_that_mean_nothing_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        TemplateRule(**kw)
