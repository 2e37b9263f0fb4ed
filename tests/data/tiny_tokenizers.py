"""Tiny tokenizers built on the fly for the preprocessing tests (no downloads).

Not named ``tokenizers.py``: pytest puts ``tests/data`` first on ``sys.path`` (the directory has no
``__init__.py``), and a module of that name would then shadow the real ``tokenizers`` package that
``transformers`` imports.

``build_hf_tokenizer`` makes a word-level ``PreTrainedTokenizerFast`` (whitespace split, so a word's id
does not depend on its neighbours and tests can build expected ids by hand with ``word_ids``) with a
Llama-3-like or ChatML-like chat template, or none. ``build_spm`` trains a ~100-piece SentencePiece
model on a small text file.
"""

import os

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
    "<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Renders the generation prompt differently from the start of an assistant turn: the prompt is then
# not a prefix of the full conversation, which the encoder must refuse.
BROKEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>bot\n{% endif %}")

SPECIALS = ["[UNK]", "<s>", "</s>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]
WORDS = sorted(set("""
system user assistant bot you are a helpful model what is the capital of france paris it
berlin germany tell me joke why did chicken cross road to get other side no idea thanks
sure here another one again please say hello hi there yes two plus equals four five how
many legs does cat have cats dogs birds fly swim and or not good bad answer question long
short very much more less one three six seven eight nine ten
""".split()))
SPM_TEXT = "\n".join([
    "the capital of france is paris and the capital of germany is berlin",
    "why did the chicken cross the road to get to the other side",
    "two plus two equals four and three plus three equals six",
    "a cat has four legs and a bird has two legs",
    "please tell me a joke about cats and dogs",
    "hello there how are you today i am fine thanks",
    "seven birds fly over the river while nine fish swim under the bridge",
    "my favourite numbers are zero one eight and ten but never eleven",
    "quick brown foxes jump over lazy dogs in the morning sunshine",
    "write a short story about a wizard who lives in a tower by the sea",
    "explain why the sky looks blue during the day and red at night",
] * 20)


def build_hf_tokenizer(out_dir: str, template: str = "llama3") -> str:
    """Save a word-level HF tokenizer to ``out_dir``; ``template``: "llama3", "chatml", "broken",
    None (no chat template: plain BOS <s> / EOS </s>). Returns ``out_dir``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = {
        "llama3": dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
        "chatml": dict(eos_token="<|im_end|>"),
        "broken": dict(eos_token="<|im_end|>"),
        None: dict(bos_token="<s>", eos_token="</s>"),
    }[template]
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]",
                                  additional_special_tokens=SPECIALS[3:], **specials)
    if template is not None:
        tok.chat_template = {"llama3": LLAMA3_TEMPLATE, "chatml": CHATML_TEMPLATE,
                             "broken": BROKEN_TEMPLATE}[template]
    tok.save_pretrained(out_dir)
    return out_dir


def word_ids(tokenizer_dir_or_tok, text: str):
    """Hand-built ids of whitespace-separated words/specials (independent of the code under test)."""
    from transformers import AutoTokenizer

    tok = (AutoTokenizer.from_pretrained(tokenizer_dir_or_tok)
           if isinstance(tokenizer_dir_or_tok, str) else tokenizer_dir_or_tok)
    ids = tok.convert_tokens_to_ids(text.split())
    assert tok.unk_token_id not in ids, f"test text {text!r} has words outside the tiny vocabulary"
    return ids


def build_spm(out_dir: str, bos: bool = True, vocab_size: int = 100) -> str:
    """Train a tiny SentencePiece model (unk 0, BOS 1 unless ``bos`` is False, EOS 2); returns the
    ``.model`` path."""
    import sentencepiece

    os.makedirs(out_dir, exist_ok=True)
    text = os.path.join(out_dir, "corpus.txt")
    with open(text, "w") as f:
        f.write(SPM_TEXT)
    prefix = os.path.join(out_dir, "spm_bos" if bos else "spm_nobos")
    sentencepiece.SentencePieceTrainer.train(
        input=text, model_prefix=prefix, vocab_size=vocab_size, model_type="unigram",
        unk_id=0, bos_id=1 if bos else -1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        minloglevel=2, num_threads=1)
    return prefix + ".model"


QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_qwen2_tokenizer(out_dir: str, template: bool = True, extra_text: str = "") -> str:
    """A Qwen2-style tokenizer saved to ``out_dir``: byte-level BPE (trained here on SPM_TEXT +
    ``extra_text``, so another ``extra_text`` gives another vocabulary), ``<|endoftext|>`` /
    ``<|im_start|>`` / ``<|im_end|>`` special tokens, EOS ``<|im_end|>``, no BOS, and the ChatML
    template (or none). Returns ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=QWEN2_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator((SPM_TEXT + extra_text).split("\n"), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>",
                                  additional_special_tokens=QWEN2_SPECIALS[1:])
    if template:
        tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(out_dir)
    return out_dir
