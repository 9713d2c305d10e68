"""Reading sources: each file format, the embedded chatterbot corpus, and every kind of bad input.

Bad inputs are real bytes written to a temp dir; each must come back as a rejected record with
its reason and line number, and no record may be lost.
"""

import codecs
import json
import logging
import re

import pandas as pd
import pytest

from llm_caption.chat_data.records import REASONS, check_accounting
from llm_caption.chat_data.sources import read_sources

GOOD = {"messages": [{"role": "user", "content": "سلام"}, {"role": "assistant", "content": "درود"}]}


def _line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"


def test_chatterbot_default_source():
    records = read_sources([{"type": "chatterbot", "language": "persian"}])
    assert len(records) == 773
    assert sum(len(r.record) for r in records) == 3264
    assert all(r.accepted and len(r.messages) % 2 == 0 for r in records)
    assert sum(r.notes.get("trailing_user_turns_dropped", 0) for r in records) == 334
    assert records[0].source == "chatterbot_corpus/data/persian/computers.yml" and records[0].line == 1
    kept = read_sources([{"type": "chatterbot", "language": "persian", "odd_chain": "keep"}])
    assert sum(len(r.messages) % 2 == 1 for r in kept) == 334


def test_jsonl_bad_inputs_each_rejected_with_reason_and_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    lines = [
        _line(GOOD),                                                             # 1 ok
        b'{"messages": [{"role": "user", "content": "\xd8\xb3\xd9\x84\xff\xfe"}]}\n',  # 2 invalid utf-8
        b'{"messages": [{"role": "user", "content": "trunc\n',                 # 3 truncated JSON
        _line({"text": "بدون پیام"}),                                            # 4 no messages key
        _line({"messages": [{"role": "bot", "content": "x"}]}),                 # 5 unknown role
        _line({"conversations": [{"from": "human", "value": "سلام"}, {"from": "gpt", "value": ""}]}),  # 6 empty
        b"\n",                                                                   # 7 blank line
        _line([1, 2, 3]),                                                        # 8 not an object
        _line({"conversations": [{"from": "human", "value": "سلام"}, {"from": "gpt", "value": "درود"}]}),  # 9 ok
    ]
    path.write_bytes(b"".join(lines))
    records = read_sources([{"type": "file", "path": str(path)}])
    got = {r.line: r.reason for r in records}
    assert got == {1: None, 2: "invalid_utf8", 3: "malformed_json", 4: "missing_messages", 5: "unknown_role",
                   6: None, 7: "empty_record", 8: "not_an_object", 9: None}  # line 6 is empty only after parsing
    assert "0xff" in records[1].detail or "\\xff" in records[1].detail
    assert records[1].record.endswith('\\xff\\xfe"}]}')  # raw bytes kept, escaped
    assert all(r.source == str(path) for r in records)


def test_json_list_and_parquet_records(tmp_path):
    json_path = tmp_path / "chat.json"
    json_path.write_text(json.dumps([GOOD, {"nope": 1}], ensure_ascii=False), encoding="utf-8")
    records = read_sources([{"type": "file", "path": str(json_path)}])
    assert [(r.line, r.reason) for r in records] == [(1, None), (2, "missing_messages")]

    parquet_path = tmp_path / "chat.parquet"
    pd.DataFrame({"messages": [GOOD["messages"], [{"role": "critic", "content": "x"}]]}).to_parquet(parquet_path)
    records = read_sources([{"type": "file", "path": str(parquet_path), "format": "openai"}])
    assert [(r.line, r.reason) for r in records] == [(1, None), (2, "unknown_role")]
    assert records[0].messages == tuple(GOOD["messages"])


def test_unparseable_json_file_is_one_rejected_record_with_its_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"messages": []},\n  {"messages": [}\n]', encoding="utf-8")
    (record,) = read_sources([{"type": "file", "path": str(path)}])
    assert record.reason == "malformed_json" and record.line == 3


def test_sources_are_pooled_and_accounted(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(_line(GOOD) + b"not json\n")
    records = read_sources([{"type": "file", "path": str(path)}, {"type": "chatterbot"}])
    assert len(records) == 2 + 773
    check_accounting(records, list(reversed(records)))
    with pytest.raises(AssertionError, match="input 775, accepted .* = 774"):
        check_accounting(records, records[1:])


def test_missing_path_names_the_path_and_the_parameter(tmp_path):
    missing = tmp_path / "nowhere" / "chat.jsonl"
    with pytest.raises(FileNotFoundError) as err:
        read_sources([{"type": "chatterbot"}, {"type": "file", "path": str(missing)}])
    assert str(missing) in str(err.value) and "chat_data.sources[1].path" in str(err.value)


def test_unknown_source_type_and_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"chat_data.sources\[0\].type='ftp'"):
        read_sources([{"type": "ftp"}])
    path = tmp_path / "chat.csv"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        read_sources([{"type": "file", "path": str(path)}])


def test_chatterbot_package_and_language_errors_name_the_parameter():
    with pytest.raises(FileNotFoundError, match=r"'no_such_corpus' \(parameter chat_data.sources\[0\].package\)"):
        read_sources([{"type": "chatterbot", "package": "no_such_corpus"}])
    with pytest.raises(FileNotFoundError, match=r"chat_data.sources\[0\].language='klingon'"):
        read_sources([{"type": "chatterbot", "language": "klingon"}])


def test_hub_source_without_hub_access_names_the_dataset_and_parameter(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"'some-org/persian-chat' split 'train\[:5\]' \(parameter chat_data.sources\[0\].dataset_id\)"):
        read_sources([{"type": "hub", "dataset_id": "some-org/persian-chat", "max_records": 5}])


# --------------------------------------------------------------------------- hostile files: nothing stops the read


def _good_line(n: int) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": f"سلام {n}"},
                                    {"role": "assistant", "content": "درود"}]}, ensure_ascii=False).encode("utf-8")


def test_a_line_nested_100000_deep_is_rejected_and_the_lines_after_it_are_read(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_bytes(b"\n".join([_good_line(1), b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000, _good_line(2)]))
    records = read_sources([{"type": "file", "path": str(path)}])
    assert [(r.line, r.reason) for r in records] == [
        (1, None), (2, "too_deeply_nested"), (3, "too_deeply_nested"), (4, None)]
    assert "recursion limit" in records[1].detail


def test_a_deeply_nested_json_file_is_one_rejected_record(tmp_path):
    path = tmp_path / "deep.json"
    path.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    (record,) = read_sources([{"type": "file", "path": str(path)}])
    assert record.reason == "too_deeply_nested" and record.detail.startswith("the whole file is unreadable")


def test_a_utf8_bom_is_skipped_in_jsonl_and_json(tmp_path):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(codecs.BOM_UTF8 + _good_line(1) + b"\n" + _good_line(2) + b"\n")
    records = read_sources([{"type": "file", "path": str(jsonl)}])
    assert [(r.line, r.reason) for r in records] == [(1, None), (2, None)]
    assert records[0].messages[0]["content"] == "سلام 1"
    whole = tmp_path / "bom.json"
    whole.write_bytes(codecs.BOM_UTF8 + b"[" + _good_line(1) + b"," + _good_line(2) + b"]")
    assert [(r.line, r.reason) for r in read_sources([{"type": "file", "path": str(whole)}])] == [(1, None), (2, None)]


@pytest.mark.parametrize("ending", [b"\r", b"\r\n", b"\n"], ids=["cr", "crlf", "lf"])
def test_every_line_ending_splits_records(tmp_path, ending):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(ending.join([_good_line(1), b"not json", _good_line(3)]) + ending)
    records = read_sources([{"type": "file", "path": str(path)}])
    assert [(r.line, r.reason) for r in records] == [(1, None), (2, "malformed_json"), (3, None)]


def test_a_json_file_that_is_not_a_list_is_one_named_rejected_record(tmp_path):
    path = tmp_path / "one.json"
    path.write_bytes(_good_line(1))  # a single object, not a list of them
    (record,) = read_sources([{"type": "file", "path": str(path)}])
    assert (record.source, record.line, record.reason) == (str(path), 1, "not_a_list")
    assert "top level is a JSON object" in record.detail and ".jsonl" in record.detail
    assert record.reason in REASONS


@pytest.mark.parametrize("name, content", [("empty.jsonl", b""), ("empty.json", b"  \n"),
                                           ("bom_only.jsonl", codecs.BOM_UTF8)])
def test_an_empty_file_is_a_warning_naming_it(tmp_path, caplog, name, content):
    empty = tmp_path / name
    empty.write_bytes(content)
    good = tmp_path / "good.jsonl"
    good.write_bytes(_good_line(1) + b"\n")
    with caplog.at_level(logging.WARNING, logger="llm_caption.chat_data.sources"):
        records = read_sources([{"type": "file", "path": str(empty)}, {"type": "file", "path": str(good)}])
    assert len(records) == 1
    assert f"Chat source {empty} (chat_data.sources[0]) is empty" in caplog.text


def test_no_record_in_any_source_is_a_named_failure(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"No chat records in any source of parameter chat_data.sources: every one is "
                                         rf"empty \({re.escape(str(empty))}\)"):
        read_sources([{"type": "file", "path": str(empty)}])


def test_an_unpaired_surrogate_escape_and_an_endless_number_are_rejected(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b"\n".join([
        b'{"messages": [{"role": "user", "content": "a\\ud800b"}, {"role": "assistant", "content": "x"}]}',
        b'{"messages": [], "n": ' + b"9" * 5000 + b"}",
        _good_line(3)]))
    records = read_sources([{"type": "file", "path": str(path)}])
    assert [(r.line, r.reason) for r in records] == [(1, "invalid_unicode"), (2, "malformed_json"), (3, None)]
    assert "U+D800" in records[0].detail and "digits" in records[1].detail
