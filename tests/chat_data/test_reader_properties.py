"""Property tests of the chat file readers: no content of a file makes the read raise, and every line
(or list item) read is exactly one record, accepted or rejected with a known reason.

Each example is real bytes written to a file and read through the reader the pipeline uses, then
through the steps before tokenisation (normalise/validate, de-duplicate) and written as the
rejects file would be, so a value that only breaks a later step is caught here too.
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_caption.chat_data.normalize import PersianNormalizer
from llm_caption.chat_data.records import REASONS, ChatRecord, check_accounting
from llm_caption.chat_data.report import rejected_frame
from llm_caption.chat_data.sources import read_file
from llm_caption.chat_data.split import deduplicate
from llm_caption.chat_data.validate import normalize_and_validate

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, database=None)

GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "سلام"},
                                    {"role": "assistant", "content": "درود"}]}, ensure_ascii=False).encode("utf-8")

#: Pieces that steer random bytes towards the reader's edge cases: line endings, a BOM, bytes that are not
#: UTF-8, JSON punctuation and keys, an escaped surrogate, a long number, a whole good record.
FRAGMENTS = [b"\n", b"\r", b"\r\n", codecs.BOM_UTF8, b"\xff", b"\xc3", b"\xed\xa0\x80", b"{", b"}", b"[", b"]",
             b'"', b":", b",", b" ", b"\t", b"\x00", b'"messages"', b'"conversations"', b'"role"', b'"content"',
             b'"user"', b'"assistant"', b'"\\ud800"', b"9" * 30, b"[" * 1500, GOOD_LINE]

file_bytes = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=6)), max_size=40).map(b"".join),
)

any_text = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=12)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), any_text)
json_values = st.recursive(
    json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(any_text, inner, max_size=4)),
    max_leaves=16)
message = st.dictionaries(st.sampled_from(["role", "content", "from", "value"]),
                          st.one_of(st.sampled_from(["user", "assistant", "system", "human", "gpt", "", None]),
                                    json_values), max_size=4)
record_like = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={"messages": st.one_of(st.lists(message, max_size=5), json_values),
                                        "conversations": st.one_of(st.lists(message, max_size=5), json_values)}),
)
#: One JSON text as bytes: a record-like value (escaped to ASCII or not; an unpaired surrogate then gives
#: bytes that are not UTF-8), or arrays nested 1..5000 deep, around the parser's recursion limit.
json_line = st.one_of(
    st.tuples(record_like, st.booleans()).map(
        lambda v: json.dumps(v[0], ensure_ascii=v[1]).encode("utf-8", "surrogatepass")),
    st.integers(1, 5000).map(lambda depth: b"[" * depth + b"]" * depth),
)
line_endings = st.sampled_from([b"\n", b"\r\n", b"\r"])


def lines_of(data: bytes) -> list[bytes]:
    """The lines of ``data`` by the readers' contract: a leading BOM skipped; LF, CRLF or CR end a line."""
    body = data.removeprefix(codecs.BOM_UTF8)
    parts = re.split(rb"\r\n|\r|\n", body)
    return parts[:-1] if parts and parts[-1] == b"" else parts


def read_and_check(folder: Path, name: str, data: bytes, fmt: str = "auto") -> list[ChatRecord]:
    """Read ``data`` as the file ``name``, run the pre-tokenisation steps, write the rejects; check every record."""
    path = folder / name
    path.write_bytes(data)
    records = read_file({"type": "file", "path": str(path), "format": fmt}, "chat_data.sources[0]")
    for r in records:
        assert r.source == str(path)
        assert (r.reason is None and r.messages is not None) or r.reason in REASONS, (r.reason, r.detail)
    normalize = PersianNormalizer()
    final = deduplicate([normalize_and_validate(r, normalize, keep_system=False) for r in records])
    check_accounting(records, final)
    assert all(r.reason is None or r.reason in REASONS for r in final)
    rejected = rejected_frame(final)
    rejected.to_json(folder / "rejected.jsonl", orient="records", lines=True, force_ascii=False)
    if len(rejected):
        assert len(pd.read_json(folder / "rejected.jsonl", orient="records", lines=True)) == len(rejected)
    return records


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """One scratch folder for every example of the module (hypothesis reruns a test body many times)."""
    return tmp_path_factory.mktemp("chat_properties")


@PROPERTY_SETTINGS
@given(data=file_bytes)
def test_any_bytes_as_jsonl_never_raise_and_each_line_is_one_record(folder, data):
    records = read_and_check(folder, "chat.jsonl", data)
    assert [r.line for r in records] == list(range(1, len(lines_of(data)) + 1))
    assert sum(r.accepted for r in records) + sum(not r.accepted for r in records) == len(lines_of(data))


@PROPERTY_SETTINGS
@given(data=file_bytes)
def test_any_bytes_as_a_json_file_never_raise(folder, data):
    records = read_and_check(folder, "chat.json", data)
    text = data.removeprefix(codecs.BOM_UTF8)
    if not text.strip(b" \t\n\r"):  # JSON whitespace only; "\x1c" (str.isspace) is malformed JSON, not blank
        assert records == []
    elif len(records) == 1 and records[0].detail.startswith("the whole file is unreadable"):
        assert records[0].reason in {"invalid_utf8", "malformed_json", "too_deeply_nested", "not_a_list"}
    else:
        assert [r.line for r in records] == list(range(1, len(json.loads(text.decode("utf-8"))) + 1))


@pytest.mark.parametrize("data", [b"\x1c", "\u00a0\n".encode(), b"\x0b"])
def test_a_json_file_of_non_json_whitespace_is_one_malformed_record(folder, data):
    """Python's str.isspace() takes these for blanks; JSON does not: the file is rejected, not read as empty."""
    records = read_and_check(folder, "chat.json", data)
    assert len(records) == 1 and records[0].reason == "malformed_json"
    assert records[0].detail.startswith("the whole file is unreadable")


def test_a_jsonl_line_of_non_json_whitespace_is_malformed_and_a_json_whitespace_line_is_blank(folder):
    records = read_and_check(folder, "chat.jsonl", b" \t\n\x1c\n\xc2\xa0\n")
    assert [(r.line, r.reason) for r in records] == [(1, "empty_record"), (2, "malformed_json"), (3, "malformed_json")]


@PROPERTY_SETTINGS
@given(lines=st.lists(json_line, max_size=8), ending=line_endings, fmt=st.sampled_from(["auto", "openai", "sharegpt"]))
def test_any_json_one_value_a_line_gives_one_record_per_line(folder, lines, ending, fmt):
    records = read_and_check(folder, "chat.jsonl", b"".join(line + ending for line in lines), fmt)
    assert [r.line for r in records] == list(range(1, len(lines) + 1))


@PROPERTY_SETTINGS
@given(items=st.lists(json_line, max_size=8), fmt=st.sampled_from(["auto", "openai", "sharegpt"]))
def test_any_json_list_as_a_json_file_gives_one_record_per_item(folder, items, fmt):
    records = read_and_check(folder, "chat.json", b"[" + b",\n".join(items) + b"]", fmt)
    if len(records) == 1 and records[0].detail.startswith("the whole file is unreadable"):
        assert records[0].reason in {"invalid_utf8", "too_deeply_nested"}
    else:
        assert [r.line for r in records] == list(range(1, len(items) + 1))


@PROPERTY_SETTINGS
@given(value=json_values.filter(lambda v: not isinstance(v, list)))
def test_any_json_that_is_not_a_list_as_a_json_file_is_one_rejected_record(folder, value):
    (record,) = read_and_check(folder, "chat.json", json.dumps(value).encode("utf-8"))
    assert (record.line, record.reason) == (1, "not_a_list")
