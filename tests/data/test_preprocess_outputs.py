"""Preprocessing outputs: refusing to overwrite, --force, the summary's fingerprint, file modes and
input lines that are not UTF-8."""

import importlib.util
import json
import os
import stat

import pytest

from megasimpo.data.formats import InvalidRecord
from megasimpo.data.indexed import PairDataset
from test_preprocess import REPO, preprocess, read_pairs, write_jsonl
from tiny_tokenizers import build_hf_tokenizer

pytestmark = pytest.mark.fast  # in `make test-fast`

GOOD = [{"prompt": "hi", "chosen": "hello", "rejected": "no"},
        {"prompt": "hi", "chosen": "four", "rejected": "five"},
        {"prompt": "hi", "chosen": "yes", "rejected": "no"},
        {"prompt": "hi", "chosen": "cats", "rejected": "dogs"}]
FILES = ["ds.bin", "ds.idx", "ds.summary.json"]
EVAL_FILES = ["ds_eval.bin", "ds_eval.idx", "ds_eval.summary.json"]


@pytest.fixture(scope="module")
def llama3(shared_build):
    return shared_build(("tokenizer", "llama3"), lambda path: build_hf_tokenizer(path, "llama3"))


def _snapshot(directory):
    return {name: open(directory / name, "rb").read() for name in sorted(os.listdir(directory))}


def test_existing_outputs_are_refused_and_force_replaces_them(tmp_path, llama3):
    path = write_jsonl(tmp_path / "in.jsonl", GOOD)
    summaries, prefix = preprocess(tmp_path, [path], llama3, split_eval=0.25)
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == FILES + EVAL_FILES
    for summary, p in zip(summaries, (prefix, prefix + "_eval")):
        ds = PairDataset(p)  # the summary beside it carries the same fingerprint
        assert summary["fingerprint"] == ds.fingerprint == json.load(
            open(p + ".summary.json"))["fingerprint"]
        assert summary["max_token_id"] == ds.max_token_id >= 0
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"ds\.bin, .*ds\.idx, .*ds_eval\.summary\.json "
                                         r"already exist.*--force"):
        preprocess(tmp_path, [path], llama3)
    assert _snapshot(out) == before

    bad = write_jsonl(tmp_path / "bad.jsonl", GOOD + [{"prompt": "hi", "chosen": 1}])
    with pytest.raises(InvalidRecord):  # a failed --force run keeps the old outputs
        preprocess(tmp_path, [bad], llama3, force=True)
    assert _snapshot(out) == before

    (summary,), _ = preprocess(tmp_path, [path], llama3, force=True)  # no split this time
    assert sorted(os.listdir(out)) == FILES  # the stale eval split is gone
    assert summary["pairs_out"] == len(read_pairs(prefix)) == 4

    for name in FILES:  # only a stale PREFIX_eval.* is enough to refuse
        os.rename(out / name, out / name.replace("ds", "ds_eval"))
    with pytest.raises(ValueError, match=r"ds_eval\.bin.*already exist"):
        preprocess(tmp_path, [path], llama3)


def test_cli_force_flag(tmp_path, llama3, capsys):
    spec = importlib.util.spec_from_file_location(
        "preprocess_data_cli", os.path.join(REPO, "tools", "preprocess_data.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = ["--input", write_jsonl(tmp_path / "in.jsonl", GOOD), "--tokenizer", llama3,
            "--out", str(tmp_path / "out" / "ds"), "--no-progress", "--chat-template", "always"]
    assert cli.main(args) == 0
    assert cli.main(args) == 2
    assert "already exist" in capsys.readouterr().err
    assert cli.main(args + ["--force"]) == 0


def test_outputs_follow_the_umask(tmp_path, llama3):
    path = write_jsonl(tmp_path / "in.jsonl", GOOD)
    old = os.umask(0o022)
    try:
        preprocess(tmp_path, [path], llama3, split_eval=0.25)
    finally:
        os.umask(old)
    for name in FILES + EVAL_FILES:
        assert stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode) == 0o644, name


def _with_bad_bytes(path):
    lines = [json.dumps(GOOD[0]).encode(),
             b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}',  # Latin-1, not UTF-8
             json.dumps(GOOD[1]).encode(),
             b'{"prompt": "hi", "chosen": "a" "rejected": "b"}']  # malformed JSON
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_non_utf8_line_names_file_line_and_byte(tmp_path, llama3):
    path = _with_bad_bytes(tmp_path / "in.jsonl")
    with pytest.raises(InvalidRecord) as info:
        preprocess(tmp_path, [path], llama3)
    assert str(info.value) == f"{path}: line 2: not valid UTF-8 (byte 0xe9 at column 16)"
    assert os.listdir(tmp_path / "out") == []
    array = tmp_path / "in.json"
    array.write_bytes(b'[\n{"prompt": "\xff", "chosen": "a", "rejected": "b"}\n]')
    with pytest.raises(ValueError, match=rf"^{array}: line 2: not valid UTF-8 \(byte 0xff at "
                                         r"column 13\)$"):
        preprocess(tmp_path, [array], llama3)


@pytest.mark.parametrize("workers", [1, 2])
def test_skip_invalid_skips_non_utf8_lines(tmp_path, llama3, workers):
    path = _with_bad_bytes(tmp_path / "in.jsonl")
    (summary,), prefix = preprocess(tmp_path, [path], llama3, skip_invalid=True,
                                    workers=workers, chunk_size=1)
    assert summary["skipped"]["invalid"] == 2
    assert summary["pairs_out"] == len(read_pairs(prefix)) == 2
    examples = summary["skip_examples"]["invalid"]
    assert examples[0] == f"{path}: line 2: not valid UTF-8 (byte 0xe9 at column 16)"
    assert examples[1].startswith(f"{path}: line 4: malformed JSON")  # line count kept
