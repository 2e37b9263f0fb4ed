"""The tokenizer's identity in every dataset and its check against the checkpoint's
``tokenizer/`` (train and score refuse data of another tokenizer whose ids fit the vocabulary);
``preprocess_data.py --out`` in a directory that cannot be written."""

import errno
import json
import os
import shutil

import pytest

from fixtures import load_script, writable_copy
from megasimpo.data.indexed import PairDataset, write_pairs
from megasimpo.data.tokenize import load_hf_tokenizer
from megasimpo.data.tokenizer_check import check_against_checkpoint, check_datasets
from megasimpo.data.tokenizer_identity import hf_identity, spm_identity
from multirank import run_main
from test_preprocess import preprocess, write_jsonl
from tiny_tokenizers import CHATML_TEMPLATE, build_qwen2_tokenizer

WORDS = "hi hello no yes four five cats dogs paris berlin what is the capital".split()
PAIRS = [{"prompt": "what is the capital", "chosen": " paris", "rejected": " berlin"},
         {"prompt": "hi", "chosen": " hello", "rejected": " no"}]


def small_tokenizer(out_dir, words, template=None):
    """A word-level HF tokenizer of < 64 ids (it fits the tiny test model's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "</s>"] + words)},
                                      unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="</s>")
    if template:
        tok.chat_template = template
    tok.save_pretrained(out_dir)
    return str(out_dir)


def fake_checkpoint(root, tokenizer_dir=None):
    """A directory standing for a checkpoint: only its tokenizer/ matters to the check."""
    os.makedirs(root)
    if tokenizer_dir:
        shutil.copytree(tokenizer_dir, os.path.join(root, "tokenizer"))
    return str(root)


def test_identity_is_what_turns_text_into_ids_not_the_template(tmp_path, shared_build):
    qwen2 = shared_build(("tokenizer", "qwen2"), build_qwen2_tokenizer)
    bare = shared_build(("tokenizer", "qwen2-no-template"),
                        lambda path: build_qwen2_tokenizer(path, template=False))
    ident = hf_identity(load_hf_tokenizer(qwen2))
    assert ident.startswith("tokid1:hf:") and ident == hf_identity(load_hf_tokenizer(qwen2))
    assert hf_identity(load_hf_tokenizer(bare)) == ident  # the chat template is not part of it
    a = small_tokenizer(tmp_path / "a", WORDS)
    assert hf_identity(load_hf_tokenizer(a)) != ident
    swapped = small_tokenizer(tmp_path / "swapped", WORDS[1:2] + WORDS[:1] + WORDS[2:])
    assert hf_identity(load_hf_tokenizer(swapped)) != hf_identity(load_hf_tokenizer(a))
    spm = tmp_path / "x.model"
    spm.write_bytes(b"model bytes")
    assert spm_identity(str(spm)).startswith("tokid1:spm:")


def test_datasets_record_the_identity_and_are_checked(tmp_path, capsys):
    tok_a = small_tokenizer(tmp_path / "tok_a", WORDS)
    tok_a_chat = small_tokenizer(tmp_path / "tok_a_chat", WORDS, template=CHATML_TEMPLATE)
    tok_b = small_tokenizer(tmp_path / "tok_b", WORDS[::-1])
    (summary,), data = preprocess(tmp_path, [write_jsonl(tmp_path / "in.jsonl", PAIRS)], tok_a,
                                  name="a/ds", chat_template="auto")
    ident = hf_identity(load_hf_tokenizer(tok_a))
    assert PairDataset(data).tokenizer_identity == ident == summary["tokenizer_identity"]
    ids = [{"prompt_ids": [2, 3], "chosen_ids": [4], "rejected_ids": [5]}]
    (summary,), pretok = preprocess(tmp_path, [write_jsonl(tmp_path / "ids.jsonl", ids)], tok_a,
                                    name="ids/ds", chat_template="auto")
    assert PairDataset(pretok).tokenizer_identity is None and summary["tokenizer_identity"] is None
    old = str(tmp_path / "old" / "ds")  # written as before identities (and as stamp.py does)
    write_pairs(old, [([1, 2], [3], [4])], 64)

    same = fake_checkpoint(tmp_path / "ckpt_same", tok_a_chat)  # another template: still same
    assert check_datasets([PairDataset(data)], same) == []
    other = fake_checkpoint(tmp_path / "ckpt_other", tok_b)
    with pytest.raises(ValueError) as info:
        check_against_checkpoint([data, pretok], other, prog="megasimpo train")
    assert str(info.value).startswith(
        f"{data} was tokenized with another tokenizer than checkpoint {other}'s (identity {ident} "
        f"in {data}.idx, ")
    assert str(info.value).endswith(
        f"re-run tools/preprocess_data.py with --tokenizer {other}/tokenizer")
    none = fake_checkpoint(tmp_path / "ckpt_none")
    capsys.readouterr()
    check_against_checkpoint([data, pretok, old], none, prog="megasimpo score")
    out = capsys.readouterr().out.splitlines()
    assert out == [f"megasimpo score: note: tokenizer not checked against checkpoint {none}: "
                   f"{pretok}, {old} record(s) no tokenizer identity (pre-tokenized records, a "
                   "stamped Megatron file or a dataset written before identities); checkpoint "
                   f"{none} has no tokenizer/ directory"]
    check_against_checkpoint([data], none, prog="p", quiet=True)  # other ranks: silent
    assert capsys.readouterr().out == ""


def test_train_and_score_refuse_data_of_another_tokenizer(tmp_path, shared_inputs):
    ckpt, _, _ = shared_inputs()
    ckpt = writable_copy(ckpt, str(tmp_path / "ckpt"))
    shutil.copytree(small_tokenizer(tmp_path / "tok_b", WORDS[::-1]), os.path.join(ckpt, "tokenizer"))
    _, data = preprocess(tmp_path, [write_jsonl(tmp_path / "in.jsonl", PAIRS)],
                         small_tokenizer(tmp_path / "tok_a", WORDS), name="a/ds",
                         chat_template="auto")
    expected = f"{data} was tokenized with another tokenizer than checkpoint {ckpt}'s"
    train = run_main("megasimpo", ["train", "--load", ckpt, "--data", data, "--out",
                                   tmp_path / "run"])
    score = run_main("megasimpo", ["score", "--load", ckpt, "--data", data, "--out",
                                   tmp_path / "scores.jsonl"])
    for done in (train, score):
        assert done.returncode == 2 and expected in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert not os.path.exists(tmp_path / "scores.jsonl")


def test_out_that_cannot_be_written_is_one_line_before_tokenizing(tmp_path, capsys, monkeypatch):
    cli = load_script("tools/preprocess_data.py")
    path = write_jsonl(tmp_path / "in.jsonl", PAIRS)
    missing_tok = str(tmp_path / "no-tokenizer")  # loading it would fail: it must not be reached
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = ["--input", path, "--tokenizer", missing_tok, "--no-progress", "--out"]
    assert cli.main(argv + [str(blocker / "sub" / "ds")]) == 2  # a path through a regular file
    assert capsys.readouterr().err == (f"preprocess_data: error: cannot write {blocker}/sub: Not "
                                       "a directory; choose a writable --out\n")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    probe = read_only / "probe"
    try:
        probe.mkdir()
        probe.rmdir()
        # Root ignores permission bits: the OS refusal a user gets is raised where it would be.
        real_mkdir = os.mkdir

        def refusing(target, *args, **kw):
            if os.path.dirname(os.fspath(target)) == str(read_only):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), target)
            return real_mkdir(target, *args, **kw)

        monkeypatch.setattr(os, "mkdir", refusing)
    except PermissionError:
        pass  # not root: the directory's mode refuses by itself
    assert cli.main(argv + [str(read_only / "ds")]) == 2
    assert capsys.readouterr().err == (f"preprocess_data: error: cannot write {read_only}: "
                                       "Permission denied; choose a writable --out\n")
    assert os.listdir(read_only) == []
    read_only.chmod(0o755)
    assert json.dumps(os.listdir(tmp_path))  # nothing else was written next to it
