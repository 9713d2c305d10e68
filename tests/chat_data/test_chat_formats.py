"""Record parsers: OpenAI, ShareGPT, chains, and the reasons they reject with."""

import pytest

from llm_caption.chat_data.formats import RecordError, get_parser, parse_auto, parse_chain, parse_openai, parse_sharegpt


def test_openai_record():
    record = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "سلام"},
                           {"role": "assistant", "content": "درود"}]}
    assert parse_openai(record) == record["messages"]
    assert parse_auto(record) == record["messages"]


def test_sharegpt_record_maps_roles():
    record = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "سلام"},
                                {"from": "gpt", "value": "درود"}]}
    expected = [{"role": "system", "content": "s"}, {"role": "user", "content": "سلام"},
                {"role": "assistant", "content": "درود"}]
    assert parse_sharegpt(record) == expected
    assert parse_auto(record) == expected
    assert parse_sharegpt({"conversations": [{"from": "q", "value": "x"}]}, {"q": "user"}) == [
        {"role": "user", "content": "x"}]


def test_chain_alternates_from_user():
    assert [m["role"] for m in parse_chain(["a", "b", "c"])] == ["user", "assistant", "user"]


@pytest.mark.parametrize("record, reason", [
    ({"text": "hi"}, "missing_messages"),
    ([1, 2], "not_an_object"),
    ({"messages": "hi"}, "bad_messages"),
    ({"messages": [{"role": "user"}]}, "bad_messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "bad_messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "unknown_role"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "unknown_role"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown_role"),
])
def test_bad_records_raise_with_reason(record, reason):
    with pytest.raises(RecordError) as err:
        parse_auto(record)
    assert err.value.reason == reason


def test_empty_message_list_parses_and_is_left_to_validation():
    assert parse_auto({"messages": []}) == []


def test_unknown_format_is_a_clear_error():
    with pytest.raises(ValueError, match="alpaca"):
        get_parser("alpaca")
