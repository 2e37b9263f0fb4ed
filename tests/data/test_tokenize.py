"""Encoders against independent references: the tokenizer's own ``apply_chat_template``, ids built by
hand from the tiny word-level vocabulary, and ``sentencepiece`` called directly. Plain-string
records are templated here with ``--chat-template always``; the default rule (TRL's) is tested in
test_chat_template.py."""

import pytest
import sentencepiece
from transformers import AutoTokenizer

from megasimpo.data.formats import ChatPair, TextPair, TokenPair
from megasimpo.data.chat_template import TemplateRule
from megasimpo.data.tokenize import HFEncoder, load_encoder, truncate_prompt
from tiny_tokenizers import build_hf_tokenizer, build_spm, word_ids

pytestmark = pytest.mark.fast  # in `make test-fast`
ALWAYS = TemplateRule(mode="always")


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {t: build_hf_tokenizer(str(root / str(t)), t) for t in ("llama3", "chatml", None,
                                                                  "broken")}


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    return build_spm(str(root), bos=True), build_spm(str(root), bos=False)


def _msgs(turns):
    return [{"role": r, "content": c} for r, c in turns]


def _template(tok, turns, generation_prompt=False):
    return list(tok.apply_chat_template(_msgs(turns), add_generation_prompt=generation_prompt,
                                        tokenize=True, return_dict=False))


MULTI_TURN = ChatPair((("system", "you are a helpful model"), ("user", "tell me a joke"),
                       ("assistant", "why did the chicken cross the road"),
                       ("user", "no idea")),
                      "to get to the other side", "thanks")


@pytest.mark.parametrize("template", ["llama3", "chatml"])
@pytest.mark.parametrize("record", [TextPair("what is the capital of france", "paris",
                                             "berlin it is"), MULTI_TURN])
def test_prompt_plus_response_equals_template_of_full_conversation(tok_dirs, template, record):
    tok = AutoTokenizer.from_pretrained(tok_dirs[template])
    enc = load_encoder(tok_dirs[template], ALWAYS)
    assert isinstance(enc, HFEncoder) and enc.vocab_size == len(tok)
    prompt, chosen, rejected = enc.encode(record)
    context = (("user", record.prompt),) if isinstance(record, TextPair) else record.context
    assert prompt == _template(tok, context, generation_prompt=True)
    assert prompt + chosen == _template(tok, context + (("assistant", record.chosen),))
    assert prompt + rejected == _template(tok, context + (("assistant", record.rejected),))


def test_llama3_ids_by_hand_multi_turn_masking(tok_dirs):
    enc = load_encoder(tok_dirs["llama3"])
    prompt, chosen, rejected = enc.encode(MULTI_TURN)
    hdr = "<|start_header_id|> {} <|end_header_id|> {} <|eot_id|>"
    expected_prompt = ("<|begin_of_text|> "
                       + hdr.format("system", "you are a helpful model") + " "
                       + hdr.format("user", "tell me a joke") + " "
                       + hdr.format("assistant", "why did the chicken cross the road") + " "
                       + hdr.format("user", "no idea")
                       + " <|start_header_id|> assistant <|end_header_id|>")
    assert prompt == word_ids(tok_dirs["llama3"], expected_prompt)
    # Only the final assistant turn is response; the earlier assistant turn sits in the prompt.
    assert chosen == word_ids(tok_dirs["llama3"], "to get to the other side <|eot_id|>")
    assert rejected == word_ids(tok_dirs["llama3"], "thanks <|eot_id|>")


def test_chatml_ids_by_hand(tok_dirs):
    prompt, chosen, rejected = load_encoder(tok_dirs["chatml"], ALWAYS).encode(
        TextPair("how many legs does a cat have", "four", "two legs"))
    assert prompt == word_ids(tok_dirs["chatml"],
                              "<|im_start|> user how many legs does a cat have <|im_end|> "
                              "<|im_start|> assistant")
    assert chosen == word_ids(tok_dirs["chatml"], "four <|im_end|>")
    assert rejected == word_ids(tok_dirs["chatml"], "two legs <|im_end|>")


def test_template_that_breaks_the_prefix_is_refused(tok_dirs):
    enc = load_encoder(tok_dirs["broken"], ALWAYS)
    with pytest.raises(ValueError, match="does not render the prompt") as info:
        enc.encode(TextPair("hi", "hello", "no"))
    assert tok_dirs["broken"] in str(info.value)


def test_template_less_hf_tokenizer_text_as_trl_and_conversations_refused(tok_dirs):
    """Plain strings: TRL's rule (this tokenizer's post-processor adds no BOS; EOS text after each
    response). A conversation without a template is refused unless its turns are joined."""
    enc = load_encoder(tok_dirs[None])
    assert isinstance(enc, HFEncoder) and enc.template is None
    prompt, chosen, rejected = enc.encode(TextPair("what is the capital of france", " paris",
                                                   " berlin"))
    d = tok_dirs[None]
    assert prompt == word_ids(d, "what is the capital of france")
    assert chosen == word_ids(d, "paris </s>") and rejected == word_ids(d, "berlin </s>")
    chat = ChatPair((("user", "hi"), ("assistant", "hello"), ("user", "two plus two")),
                    "four", "five")
    with pytest.raises(ValueError, match="no chat template.*--chat-template-file.*"
                                         "--chat-template never --turn-separator"):
        enc.encode(chat)
    joined = load_encoder(d, TemplateRule(mode="never", turn_separator=" "))
    prompt, chosen, _ = joined.encode(chat)
    assert prompt == word_ids(d, "hi hello two plus two")
    assert chosen == word_ids(d, "four </s>")


@pytest.mark.parametrize("with_bos", [True, False])
def test_sentencepiece_bos_eos_placement(spm_models, with_bos):
    path = spm_models[0 if with_bos else 1]
    sp = sentencepiece.SentencePieceProcessor(model_file=path)
    enc = load_encoder(path)
    assert enc.vocab_size == sp.get_piece_size()
    text = TextPair("what is the capital of france", "paris", "berlin is the capital")
    prompt, chosen, rejected = enc.encode(text)
    bos = [1] if with_bos else []
    assert sp.bos_id() == (1 if with_bos else -1) and sp.eos_id() == 2
    assert prompt == bos + sp.encode(text.prompt)
    assert chosen == sp.encode("paris") + [2] and rejected == sp.encode(text.rejected) + [2]
    if with_bos:  # BOS opens the prompt and appears nowhere else
        assert prompt[0] == 1 and 1 not in prompt[1:] + chosen + rejected


@pytest.mark.parametrize("which", ["llama3", None])
def test_pre_tokenized_is_verbatim(tok_dirs, spm_models, which):
    rec = TokenPair((7, 8, 9), (10, 11), (12,))
    for path in (tok_dirs[which], spm_models[0]):
        assert load_encoder(path).encode(rec) == ([7, 8, 9], [10, 11], [12])


def test_load_encoder_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_encoder(str(tmp_path / "nope"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model"):
        load_encoder(str(junk))


@pytest.mark.parametrize("prompt_len, chosen_len, rejected_len, max_length, expected", [
    (5, 3, 2, None, [0, 1, 2, 3, 4]),  # no limit
    (5, 3, 2, 8, [0, 1, 2, 3, 4]),  # fits exactly
    (5, 3, 2, 6, [2, 3, 4]),  # cut from the left, budget from the longer response
    (5, 2, 4, 5, [4]),  # exactly one prompt token left
    (5, 2, 5, 5, None),  # the longer response leaves no room for a prompt token
    (5, 7, 1, 6, None),  # the response alone is too long
    (0, 3, 3, 3, []),  # an empty prompt that fits is unchanged
])
def test_truncate_prompt(prompt_len, chosen_len, rejected_len, max_length, expected):
    got = truncate_prompt(list(range(prompt_len)), [9] * chosen_len, [8] * rejected_len,
                          max_length)
    assert got == expected
