"""Record schemas: the three formats, both conversational layouts, and every validation error names
the file, the line/row and the field (pure Python, no tokenizer)."""

import pickle

import pytest

from megasimpo.data.formats import (
    ChatPair, InvalidRecord, TextPair, TokenPair, check_token_range, has_empty_response,
    line_location, parse_json_line, parse_record, row_location)

pytestmark = pytest.mark.fast  # in `make test-fast`

WHERE = line_location("data/prefs.jsonl", 7)


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def test_locations():
    assert WHERE == "data/prefs.jsonl: line 7"
    assert row_location("x.parquet", 0) == "x.parquet: row 0"


def test_text_record_extra_fields_ignored():
    rec = parse_record({"prompt": "q", "chosen": "a", "rejected": "b", "score": 3, "id": None},
                       WHERE)
    assert rec == TextPair("q", "a", "b")


def test_trl_conversational_completion_only():
    rec = parse_record({"prompt": [{"role": "system", "content": "be nice"}, user("q")],
                        "chosen": [bot("a")], "rejected": [bot("b")]}, WHERE)
    assert rec == ChatPair((("system", "be nice"), ("user", "q")), "a", "b")


def test_string_prompt_with_completion_messages():
    rec = parse_record({"prompt": "q", "chosen": [bot("a")], "rejected": [bot("b")]}, WHERE)
    assert rec == ChatPair((("user", "q"),), "a", "b")


def test_ultrafeedback_full_conversation():
    # UltraFeedback-binarized: chosen/rejected repeat the prompt turn; prompt is the same text.
    rec = parse_record({"prompt": "q", "prompt_id": "abc", "messages": [user("q"), bot("a")],
                        "chosen": [user("q"), bot("a")], "rejected": [user("q"), bot("b")],
                        "score_chosen": 8.0, "score_rejected": 3.0}, WHERE)
    assert rec == ChatPair((("user", "q"),), "a", "b")


def test_implicit_prompt_full_conversation():
    rec = parse_record({"chosen": [user("q"), bot("a")], "rejected": [user("q"), bot("b")]}, WHERE)
    assert rec == ChatPair((("user", "q"),), "a", "b")


def test_multi_turn_only_last_assistant_turn_is_the_response():
    conv = [user("q1"), bot("a1"), user("q2")]
    rec = parse_record({"prompt": "q1", "chosen": conv + [bot("good")],
                        "rejected": conv + [bot("bad")]}, WHERE)
    assert rec.context == (("user", "q1"), ("assistant", "a1"), ("user", "q2"))
    assert (rec.chosen, rec.rejected) == ("good", "bad")
    # TRL layout with earlier assistant turns inside the completion.
    rec = parse_record({"prompt": [user("q1")], "chosen": [bot("a1"), user("q2"), bot("good")],
                        "rejected": [bot("a1"), user("q2"), bot("bad")]}, WHERE)
    assert rec.context == (("user", "q1"), ("assistant", "a1"), ("user", "q2"))


def test_message_extra_keys_and_message_prompt_with_string_responses():
    rec = parse_record({"prompt": [dict(user("q"), name=None)], "chosen": "a", "rejected": "b"},
                       WHERE)
    assert rec == ChatPair((("user", "q"),), "a", "b")


def test_pre_tokenized_verbatim():
    rec = parse_record({"prompt_ids": [5, 0, 9], "chosen_ids": [1], "rejected_ids": [2, 3],
                        "prompt": None, "chosen": None, "rejected": None}, WHERE)
    assert rec == TokenPair((5, 0, 9), (1,), (2, 3))
    assert parse_record({"prompt_ids": [], "chosen_ids": [1, 2], "rejected_ids": [3]},
                        WHERE).prompt_ids == ()


BAD = [
    # (record, field named in the message or None, words the message contains)
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen", "got int"),
    ({"prompt": "q", "chosen": "a"}, "rejected", "missing"),
    ({"prompt": "q", "chosen": None, "rejected": "b"}, "chosen", "missing"),
    ({"chosen": "a", "rejected": "b"}, "prompt", "missing"),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, "prompt", "got int"),
    ({"prompt": "q", "chosen": "a", "rejected": [bot("b")]}, "rejected", "both must be"),
    ({"prompt": "q", "chosen": [user("q"), {"content": "a"}], "rejected": [user("q"), bot("b")]},
     "chosen[1].role", "missing"),
    ({"prompt": "q", "chosen": [bot("a")], "rejected": [{"role": "assistant"}]},
     "rejected[0].content", "missing"),
    ({"prompt": "q", "chosen": [bot("a")], "rejected": [{"role": "assistant", "content": 4}]},
     "rejected[0].content", "expected a string"),
    ({"prompt": "q", "chosen": ["a"], "rejected": [bot("b")]}, "chosen[0]", "message object"),
    ({"prompt": "q", "chosen": [], "rejected": [bot("b")]}, "chosen", "empty list"),
    ({"prompt": "q", "chosen": [user("q"), bot("a"), user("more?")],
      "rejected": [user("q"), bot("b")]}, "chosen[2].role", "last message"),
    ({"chosen": [bot("a")], "rejected": [bot("b")]}, "prompt", "only the completion"),
    ({"prompt": "q", "chosen": [user("q"), bot("a")], "rejected": [user("other"), bot("b")]},
     "rejected", "share its prompt"),
    ({"prompt_ids": [1, "2"], "chosen_ids": [3], "rejected_ids": [4]}, "prompt_ids[1]",
     "got str"),
    ({"prompt_ids": [1], "chosen_ids": [3.0], "rejected_ids": [4]}, "chosen_ids[0]", "float"),
    ({"prompt_ids": [1], "chosen_ids": [True], "rejected_ids": [4]}, "chosen_ids[0]", "bool"),
    ({"prompt_ids": [1], "chosen_ids": [3], "rejected_ids": [-4]}, "rejected_ids[0]", "negative"),
    ({"prompt_ids": [1], "chosen_ids": [3]}, "rejected_ids", "missing"),
    ({"prompt_ids": "1 2", "chosen_ids": [3], "rejected_ids": [4]}, "prompt_ids", "got str"),
    ({"question": "q", "answer": "a"}, None, "no known format"),
    (["q", "a", "b"], None, "expected a JSON object, got list"),
]


@pytest.mark.parametrize("record, field, words", BAD)
def test_bad_records_name_file_line_and_field(record, field, words):
    with pytest.raises(InvalidRecord) as info:
        parse_record(record, WHERE)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert msg.startswith("data/prefs.jsonl: line 7: ")
    assert words in msg
    assert info.value.field == field
    if field is not None:
        assert f"field '{field}'" in msg


def test_malformed_json_line():
    with pytest.raises(InvalidRecord, match=r"^data/prefs.jsonl: line 7: malformed JSON"):
        parse_json_line('{"prompt": "q", "chosen": "a" "rejected": "b"}', WHERE)
    assert parse_json_line('{"a": 1}\n', WHERE) == {"a": 1}


def test_token_range_and_empty_responses():
    check_token_range(TokenPair((0, 9), (9,), (1,)), 10, WHERE)
    with pytest.raises(InvalidRecord, match=r"line 7: field 'chosen_ids\[1\]': token id 10"):
        check_token_range(TokenPair((0,), (1, 10), (1,)), 10, WHERE)
    assert has_empty_response(TextPair("q", "  \n", "b"))
    assert has_empty_response(ChatPair((), "a", ""))
    assert has_empty_response(TokenPair((1,), (), (2,)))
    assert not has_empty_response(TextPair("", "a", "b"))  # an empty prompt is allowed


def test_invalid_record_survives_pickling():
    err = InvalidRecord(WHERE, "chosen", "got int")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, InvalidRecord) and str(back) == str(err) and back.field == "chosen"
