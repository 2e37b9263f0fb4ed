"""The preprocessing pipeline end to end: input kinds, formats, truncation, skips, bad input (nothing
written), determinism across worker counts, the eval split, the summary and the CLI. Expected ids are
built by hand from the tiny word-level vocabulary (tests/data/tiny_tokenizers.py)."""

import importlib.util
import json
import os

import numpy as np
import pytest
import sentencepiece
from transformers import AutoTokenizer

from megasimpo.data.formats import InvalidRecord
from megasimpo.data.indexed import PairDataset
from megasimpo.data.preprocess import PreprocessConfig, length_bias, run
from multirank import run_main
from tiny_tokenizers import build_hf_tokenizer, build_spm, word_ids

pytestmark = pytest.mark.fast  # in `make test-fast`

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def llama3(shared_build):
    return shared_build(("tokenizer", "llama3"), lambda path: build_hf_tokenizer(path, "llama3"))


@pytest.fixture(scope="module")
def tok(llama3):
    return AutoTokenizer.from_pretrained(llama3)


def expected(tok, context, chosen, rejected):
    """Hand-built Llama-3-template ids of a pair: (prompt, chosen, rejected)."""
    turns = "".join(f" <|start_header_id|> {r} <|end_header_id|> {c} <|eot_id|>" for r, c in context)
    prompt = f"<|begin_of_text|>{turns} <|start_header_id|> assistant <|end_header_id|>"
    return (word_ids(tok, prompt), word_ids(tok, chosen + " <|eot_id|>"),
            word_ids(tok, rejected + " <|eot_id|>"))


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, records):
    """``records``: dicts (dumped as JSON) or raw strings (written as they are), one per line."""
    with open(path, "w") as f:
        for rec in records:
            f.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
    return str(path)


def preprocess(tmp_path, inputs, tokenizer, name="out/ds", **kw):
    """``run`` at ``tmp_path/name``. With an HF tokenizer, plain-string records are templated
    (``always``) unless a test says otherwise: the hand-built ids here are the Llama-3 template's,
    and the default rule (TRL's) has its own tests (test_chat_template.py)."""
    if os.path.isdir(tokenizer):
        kw.setdefault("chat_template", "always")
    prefix = str(tmp_path / name)
    config = PreprocessConfig(inputs=tuple(str(i) for i in inputs), tokenizer=tokenizer,
                              out=prefix, **kw)
    return run(config, progress=False), prefix


def read_pairs(prefix):
    ds = PairDataset(prefix)
    return [tuple(a.tolist() for a in (p.prompt_ids, p.chosen_ids, p.rejected_ids)) for p in ds]


def file_bytes(prefix):
    return tuple(open(prefix + ext, "rb").read() for ext in (".bin", ".idx"))


ULTRAFEEDBACK = [  # one layout per file so that Parquet/Arrow get one schema
    {"prompt": "what is the capital of france", "prompt_id": "a",
     "chosen": [user("what is the capital of france"), bot("paris")],
     "rejected": [user("what is the capital of france"), bot("berlin it is")]},
    {"prompt": "tell me a joke", "prompt_id": "b",
     "chosen": [user("tell me a joke"), bot("why did the chicken cross the road"),
                user("why"), bot("to get to the other side")],
     "rejected": [user("tell me a joke"), bot("why did the chicken cross the road"),
                  user("why"), bot("no idea")]},
    {"prompt": "two plus two", "prompt_id": "c",
     "chosen": [user("two plus two"), bot("four")], "rejected": [user("two plus two"), bot("five")]},
]


def ultrafeedback_expected(tok):
    return [
        expected(tok, [("user", "what is the capital of france")], "paris", "berlin it is"),
        expected(tok, [("user", "tell me a joke"),
                       ("assistant", "why did the chicken cross the road"), ("user", "why")],
                 "to get to the other side", "no idea"),
        expected(tok, [("user", "two plus two")], "four", "five"),
    ]


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "saved_dataset"])
def test_input_kinds(tmp_path, llama3, tok, kind):
    import datasets

    if kind == "jsonl":
        path = write_jsonl(tmp_path / "in.jsonl", ULTRAFEEDBACK)
    elif kind == "json":
        path = tmp_path / "in.json"
        path.write_text(json.dumps(ULTRAFEEDBACK, indent=1))
    elif kind == "parquet":
        path = tmp_path / "in.parquet"
        datasets.Dataset.from_list(ULTRAFEEDBACK).to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(ULTRAFEEDBACK)}).save_to_disk(
            str(path))
    (summary,), prefix = preprocess(tmp_path, [path], llama3)
    assert read_pairs(prefix) == ultrafeedback_expected(tok)
    assert summary["pairs_in"] == summary["pairs_out"] == 3
    assert os.path.exists(prefix + ".summary.json")


def test_formats_and_multiple_inputs_in_order(tmp_path, llama3, tok):
    first = write_jsonl(tmp_path / "a.jsonl", [
        {"prompt": "what is the capital of france", "chosen": "paris", "rejected": "berlin",
         "source": "ignored"},
        "",  # a blank line is not a record
        {"prompt": [user("hi")], "chosen": [bot("hello"), user("cats or dogs"), bot("cats")],
         "rejected": [bot("hello"), user("cats or dogs"), bot("dogs")]},
    ])
    second = write_jsonl(tmp_path / "b.jsonl", [
        {"prompt_ids": [3, 40, 41], "chosen_ids": [50, 51], "rejected_ids": [52]},
    ])
    (summary,), prefix = preprocess(tmp_path, [first, second], llama3)
    assert read_pairs(prefix) == [
        expected(tok, [("user", "what is the capital of france")], "paris", "berlin"),
        expected(tok, [("user", "hi"), ("assistant", "hello"), ("user", "cats or dogs")],
                 "cats", "dogs"),
        ([3, 40, 41], [50, 51], [52]),  # pre-tokenized: verbatim, nothing added
    ]
    assert summary["pairs_in"] == 3 and summary["skipped"]["invalid"] == 0


def test_sentencepiece_pipeline(tmp_path):
    model = build_spm(str(tmp_path / "spm"))
    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "the capital of france", "chosen": "is paris", "rejected": "is berlin"}])
    _, prefix = preprocess(tmp_path, [path], model)
    assert read_pairs(prefix) == [([sp.bos_id()] + sp.encode("the capital of france"),
                                   sp.encode("is paris") + [sp.eos_id()],
                                   sp.encode("is berlin") + [sp.eos_id()])]


def test_truncation_cuts_prompt_from_left_and_drops_too_long(tmp_path, llama3, tok):
    long_prompt = "please tell me what is the capital of france"
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": long_prompt, "chosen": "paris", "rejected": "it is paris"},  # 17 + 2 / 4 tokens
        {"prompt": "hi", "chosen": "one two three four five six seven eight nine ten",
         "rejected": "no"},  # an 11-token response leaves no prompt token within 11
        {"prompt": "hi", "chosen": "hello", "rejected": "no"},  # 9 + 2 tokens: fits as is
    ])
    (summary,), prefix = preprocess(tmp_path, [path], llama3, max_length=11)
    prompt, chosen, rejected = expected(tok, [("user", long_prompt)], "paris", "it is paris")
    assert (len(prompt), len(chosen), len(rejected)) == (17, 2, 4)
    short = expected(tok, [("user", "hi")], "hello", "no")
    assert len(short[0]) == 9
    # Same cut for both responses, sized by the longer one: 11 - 4 = 7 prompt tokens kept.
    assert read_pairs(prefix) == [(prompt[-7:], chosen, rejected), short]
    assert summary["skipped"]["too_long"] == 1 and summary["pairs_truncated"] == 1
    assert summary["skip_examples"]["too_long"] == [f"{path}: line 2"]
    assert summary["lengths"]["prompt"]["max"] == 9


def test_every_skip_reason_is_counted(tmp_path, llama3, tok):
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "hi", "chosen": "hello", "rejected": "no"},  # kept
        {"prompt": "hi", "chosen": "same answer", "rejected": "same answer"},  # identical
        {"prompt": "hi", "chosen": "  ", "rejected": "no"},  # empty
        {"prompt": "hi", "chosen": [bot("")], "rejected": [bot("no")]},  # empty
        {"prompt": "hi", "chosen": "one two three four five six seven eight nine ten",
         "rejected": "no"},  # too_long
        '{"prompt": "hi", "chosen": "a" "rejected": "b"}',  # invalid: malformed JSON
        {"prompt": "hi", "chosen": 3, "rejected": "b"},  # invalid: wrong type
        {"prompt_ids": [], "chosen_ids": [5], "rejected_ids": [6, 7]},  # unscorable
        {"prompt_ids": [1], "chosen_ids": [5], "rejected_ids": [len(tok)]},  # invalid: id range
        {"prompt": "hi", "chosen": "four", "rejected": "five"},  # kept
    ])
    (summary,), prefix = preprocess(tmp_path, [path], llama3, max_length=11, skip_invalid=True)
    assert read_pairs(prefix) == [expected(tok, [("user", "hi")], "hello", "no"),
                                  expected(tok, [("user", "hi")], "four", "five")]
    assert summary["pairs_truncated"] == 0
    assert summary["skipped"] == {"invalid": 3, "empty": 2, "identical": 1, "too_long": 1,
                                  "unscorable": 1}
    assert summary["pairs_in"] == 10 and summary["pairs_out"] == 2
    invalid = summary["skip_examples"]["invalid"]
    assert [e.split(": field")[0].split(": malformed")[0] for e in invalid] == [
        f"{path}: line 6", f"{path}: line 7", f"{path}: line 9"]
    assert "field 'chosen'" in invalid[1] and "field 'rejected_ids[0]'" in invalid[2]
    on_disk = json.load(open(prefix + ".summary.json"))
    assert on_disk["skipped"] == summary["skipped"]


BAD_LINES = [
    ('{"prompt": "hi", "chosen": "hello" "rejected": "no"}', None, "malformed JSON"),
    ('{"prompt": "hi", "chosen": "hello"}', "rejected", "missing"),
    ('{"prompt": "hi", "chosen": 7, "rejected": "no"}', "chosen", "got int"),
    ('{"prompt": "hi", "chosen": [{"content": "a"}], "rejected": [{"role": "assistant", '
     '"content": "b"}]}', "chosen[0].role", "missing"),
    ('{"prompt_ids": [1, "x"], "chosen_ids": [2], "rejected_ids": [3]}', "prompt_ids[1]", "str"),
    ('{"question": "hi", "answer": "hello"}', None, "no known format"),
]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("line, field, words", BAD_LINES)
def test_bad_input_names_file_line_field_and_writes_nothing(tmp_path, llama3, line, field,
                                                            words, workers):
    good = json.dumps({"prompt": "hi", "chosen": "hello", "rejected": "no"})
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, line, good])
    with pytest.raises(InvalidRecord) as info:
        preprocess(tmp_path, [path], llama3, workers=workers, chunk_size=1)
    msg = str(info.value)
    assert msg.startswith(f"{path}: line 3: ") and words in msg
    if field:
        assert f"field '{field}'" in msg
    assert os.listdir(tmp_path / "out") == []  # no .bin/.idx, no temporaries, no summary


def test_bad_parquet_row_and_bad_json_array(tmp_path, llama3):
    import datasets

    rows = [{"prompt": "hi", "chosen": "hello", "rejected": "no"},
            {"prompt": "hi", "chosen": "hello", "rejected": None}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "in.parquet"))
    with pytest.raises(ValueError, match=r"in\.parquet: row 1: field 'rejected': missing"):
        preprocess(tmp_path, [tmp_path / "in.parquet"], llama3)
    (tmp_path / "in.json").write_text('[\n{"prompt": "hi",\n "chosen": }\n]')
    with pytest.raises(ValueError, match=r"in\.json: line 3: malformed JSON"):
        preprocess(tmp_path, [tmp_path / "in.json"], llama3)
    assert os.listdir(tmp_path / "out") == []


def test_failures_after_reading_write_nothing(tmp_path, llama3):
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "hi", "chosen": "a", "rejected": "a"}])
    with pytest.raises(ValueError, match="no pairs left"):
        preprocess(tmp_path, [same], llama3)
    broken = build_hf_tokenizer(str(tmp_path / "broken_tok"), "broken")
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "hi", "chosen": "hello",
                                                  "rejected": "no"}])
    for workers in (1, 2):
        with pytest.raises(ValueError, match="broken_tok"):
            preprocess(tmp_path, [good], broken, workers=workers)
    with pytest.raises(ValueError, match="not found"):
        preprocess(tmp_path, [good, tmp_path / "missing.jsonl"], llama3)
    assert os.listdir(tmp_path / "out") == []


def _synthetic(num):
    words = ["paris", "berlin", "four", "five", "cats", "dogs", "yes", "no", "hello", "thanks"]
    rng = np.random.default_rng(0)
    out = []
    for i in range(num):
        pick = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
        if i % 3 == 0:
            out.append({"prompt": pick(3), "chosen": pick(2 + i % 4), "rejected": pick(1 + i % 3)})
        elif i % 3 == 1:
            q = pick(2)
            out.append({"prompt": q, "chosen": [user(q), bot(pick(3))],
                        "rejected": [user(q), bot(pick(2))]})
        else:
            out.append({"prompt_ids": [3, i % 80 + 9], "chosen_ids": [i % 80 + 9, 12],
                        "rejected_ids": [13]})
    return out


def test_deterministic_and_independent_of_worker_count(tmp_path, llama3):
    path = write_jsonl(tmp_path / "in.jsonl", _synthetic(45))
    runs = {}
    for name, workers in (("w1", 1), ("w1_again", 1), ("w2", 2)):
        _, prefix = preprocess(tmp_path, [path], llama3, name=f"{name}/ds", workers=workers,
                               chunk_size=4, split_eval=0.2, seed=7)
        runs[name] = file_bytes(prefix) + file_bytes(prefix + "_eval")
    assert runs["w1"] == runs["w1_again"] == runs["w2"]
    assert len(PairDataset(str(tmp_path / "w2/ds"))) > 30


def test_split_eval_sizes_disjoint_seeded_and_ordered(tmp_path, llama3):
    records = [{"prompt_ids": [3, 9 + i], "chosen_ids": [9 + i, 10], "rejected_ids": [11]}
               for i in range(20)]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    splits = {}
    for run_number, seed in enumerate((1, 1, 2)):
        summaries, prefix = preprocess(tmp_path, [path], llama3, name=f"r{run_number}/ds",
                                       split_eval=0.25, seed=seed)
        train = [p[0][1] - 9 for p in read_pairs(prefix)]  # input index of each stored pair
        held = [p[0][1] - 9 for p in read_pairs(prefix + "_eval")]
        assert (len(train), len(held)) == (15, 5)
        assert sorted(train + held) == list(range(20))  # disjoint and complete
        assert train == sorted(train) and held == sorted(held)  # input order within a split
        assert [s["split"] for s in summaries] == ["train", "eval"]
        assert [s["pairs_out"] for s in summaries] == [15, 5]
        assert json.load(open(prefix + "_eval.summary.json"))["pairs_per_split"] == {
            "train": 15, "eval": 5}
        splits.setdefault(seed, []).append(held)
    assert splits[1][0] == splits[1][1] and splits[1][0] != splits[2][0]


def test_summary_numbers_by_hand(tmp_path, llama3):
    chosen_lengths, rejected_lengths = [4, 6, 2, 8], [2, 2, 2, 2]
    records = [{"prompt_ids": [3] * (i + 1), "chosen_ids": [20] * c, "rejected_ids": [21] * r}
               for i, (c, r) in enumerate(zip(chosen_lengths, rejected_lengths))]
    (summary,), _ = preprocess(tmp_path, [write_jsonl(tmp_path / "in.jsonl", records)], llama3)
    assert summary["pairs_in"] == summary["pairs_out"] == 4
    assert summary["lengths"]["chosen"] == {"p50": 4, "p90": 8, "p99": 8, "max": 8, "mean": 5.0}
    assert summary["lengths"]["prompt"] == {"p50": 2, "p90": 4, "p99": 4, "max": 4, "mean": 2.5}
    bias = summary["length_bias"]
    assert bias["mean_chosen_minus_rejected"] == 3.0  # 5 - 2
    assert bias["chosen_longer_share"] == 0.75  # 3 of 4 (one tie)
    assert bias["verdict"] == "chosen responses are systematically longer"
    c, r = np.array(chosen_lengths), np.array(rejected_lengths)
    assert length_bias(r, c)["verdict"] == "chosen responses are systematically shorter"
    assert length_bias(r, c)["mean_chosen_minus_rejected"] == -3.0
    same = length_bias(np.array([10, 10, 11]), np.array([10, 11, 10]))
    assert same["verdict"] == "chosen responses are about the same length"


def test_cli_end_to_end(tmp_path, llama3):
    good = write_jsonl(tmp_path / "in.jsonl", _synthetic(12))
    done = run_main("tools/preprocess_data.py", ["--input", good, "--tokenizer", llama3, "--out",
                                                 str(tmp_path / "out" / "ds"), "--workers", "2",
                                                 "--split-eval", "0.25", "--max-length", "64"],
                    timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path / "out")) == [
        "ds.bin", "ds.idx", "ds.summary.json", "ds_eval.bin", "ds_eval.idx",
        "ds_eval.summary.json"]
    assert "[train] 9 pairs" in done.stdout and "[eval] 3 pairs" in done.stdout
    assert "length bias: chosen responses are" in done.stdout



def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, llama3, capsys):
    # In-process (a second interpreter start costs seconds of imports): same main() as above.
    spec = importlib.util.spec_from_file_location(
        "preprocess_data_cli", os.path.join(REPO, "tools", "preprocess_data.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "chosen": "a", "rejected": "b"},
                                               {"prompt": "hi", "chosen": 5, "rejected": "b"}])
    out = str(tmp_path / "out" / "ds")
    assert cli.main(["--input", bad, "--tokenizer", llama3, "--out", out, "--no-progress",
                     "--chat-template", "always"]) == 2
    err = capsys.readouterr().err
    assert (f"preprocess_data: error: {bad}: line 2: field 'chosen': expected a string or a list "
            "of messages, got int") in err
    assert os.listdir(tmp_path / "out") == []
    assert cli.main(["--input", bad, "--tokenizer", llama3, "--out", out, "--no-progress",
                     "--skip-invalid", "--chat-template", "always"]) == 0
    assert "[all] records in: 2; skipped: invalid 1" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "out")) == ["ds.bin", "ds.idx", "ds.summary.json"]
