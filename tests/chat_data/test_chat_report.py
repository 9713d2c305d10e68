"""Counts, the rejected table, the rejected-share failure and the histogram."""

import json

import pytest
from matplotlib.figure import Figure

from llm_caption.chat_data.records import ChatRecord
from llm_caption.chat_data.report import (RejectedShareError, check_rejected_share, conversations_frame,
                                          rejected_frame, rejection_summary)
from llm_caption.chat_data.stats import length_histogram, length_summary

MSGS = ({"role": "user", "content": "سلام"}, {"role": "assistant", "content": "درود"})


def _records():
    return [
        ChatRecord("a.jsonl", 1, "{...}", messages=MSGS, conversation_id="c1", n_tokens=40),
        ChatRecord("a.jsonl", 2, "{bad", reason="malformed_json", detail="column 5"),
        ChatRecord("a.jsonl", 3, "{...}", messages=MSGS, conversation_id="c1", reason="duplicate"),
        ChatRecord("b.yml", 1, ["x"], messages=MSGS, conversation_id="c2", n_tokens=30,
                   notes={"trailing_user_turns_dropped": 1}),
    ]


def test_summary_counts():
    summary = rejection_summary(_records())
    assert summary["input"] == 4 and summary["accepted"] == 2 and summary["rejected"] == 2
    assert summary["rejected_by_reason"] == {"duplicate": 1, "malformed_json": 1}
    assert summary["duplicates"] == 1 and summary["trailing_user_turns_dropped"] == 1
    assert summary["by_source"]["a.jsonl"] == {"input": 3, "accepted": 1, "rejected": 2}


def test_rejected_frame_keeps_source_line_reason_record():
    frame = rejected_frame(_records())
    assert frame[["source", "line", "reason"]].values.tolist() == [["a.jsonl", 2, "malformed_json"],
                                                                    ["a.jsonl", 3, "duplicate"]]
    assert frame["record"].iloc[0] == "{bad"


def test_conversations_frame_schema():
    frame = conversations_frame([r for r in _records() if r.accepted])
    assert list(frame.columns) == ["conversation_id", "source", "messages", "n_tokens"]
    assert frame["n_tokens"].dtype == "int64" and frame["messages"].iloc[0] == list(MSGS)


def test_rejected_share_failure_message():
    summary = rejection_summary(_records())  # 50% rejected
    check_rejected_share(summary, 0.5)
    with pytest.raises(RejectedShareError) as err:
        check_rejected_share(summary, 0.2)
    message = str(err.value)
    assert "2 of 4" in message and "50.0%" in message and "max_rejected_share" in message
    assert "malformed_json: 1" in message


def test_length_summary_and_histogram():
    assert length_summary([10, 20, 30, 1000])["max"] == 1000
    assert length_summary([])["count"] == 0
    fig = length_histogram([10, 20, 30, 1000], max_seq_len=256, bins=10)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.lines[0].get_xdata()[0] == 256  # the cut-off line
    assert "3 of 4 fit" in ax.get_legend().get_texts()[0].get_text()


def test_first_rejection_per_reason_names_one_example_each():
    from llm_caption.chat_data.records import first_rejection_per_reason

    first = first_rejection_per_reason(_records())
    assert {k: v.location for k, v in first.items()} == {"duplicate": "a.jsonl:3", "malformed_json": "a.jsonl:2"}


def test_rejected_frame_writes_any_record_as_utf8_json_lines(tmp_path):
    """What a reader can hold (surrogates, deep nesting, huge numbers, parquet bytes) still writes and reads back."""
    deep: list = []
    inner = deep
    for _ in range(5000):
        inner.append([])
        inner = inner[0]
    records = [
        ChatRecord("a.json", 1, {"messages": [{"role": "user", "content": "a\ud800b"}]}, reason="invalid_unicode",
                   detail="`messages[0].content` holds the unpaired surrogate U+D800"),
        ChatRecord("a.json", 2, deep, reason="not_an_object", detail="expected a JSON object, got list"),
        ChatRecord("a.parquet", 3, {"n": 10 ** 40, "blob": b"\xff"}, reason="missing_messages", detail="x"),
        ChatRecord("b.jsonl", 4, "raw \udcff line", reason="malformed_json", detail="column 1: \udcff"),
    ]
    frame = rejected_frame(records)
    path = tmp_path / "rejected.jsonl"
    frame.to_json(path, orient="records", lines=True, force_ascii=False)
    back = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in back] == [1, 2, 3, 4]
    assert back[0]["record"] == '{"messages": [{"role": "user", "content": "a\\ud800b"}]}'
    assert back[1]["record"].startswith("[[[")  # too deep for JSON: a shortened repr
    assert json.loads(back[2]["record"]) == {"n": 10 ** 40, "blob": "b'\\xff'"}
    assert back[3]["record"] == "raw \\udcff line" and back[3]["detail"] == "column 1: \\udcff"
