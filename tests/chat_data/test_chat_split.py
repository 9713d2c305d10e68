"""De-duplication, seeded sampling and the train/test split."""

import logging

from llm_caption.chat_data.records import ChatRecord
from llm_caption.chat_data.split import deduplicate, sample, train_test_split
from llm_caption.chat_data.validate import conversation_id


def _record(line: int, text: str) -> ChatRecord:
    msgs = ({"role": "user", "content": text}, {"role": "assistant", "content": "پاسخ"})
    return ChatRecord("chat.jsonl", line, text, messages=msgs, conversation_id=conversation_id(msgs))


def test_duplicates_are_rejected_and_point_to_the_first():
    records = [_record(1, "الف"), _record(2, "ب"), _record(3, "الف"), _record(4, "الف")]
    out = deduplicate(records)
    assert [r.reason for r in out] == [None, None, "duplicate", "duplicate"]
    assert out[2].detail == "duplicate of chat.jsonl:1"
    assert len(out) == len(records)


def test_sample_is_seeded_and_bounded(caplog):
    records = [_record(i, f"پرسش {i}") for i in range(1, 51)]
    a, b = sample(records, 10, seed=7), sample(records, 10, seed=7)
    assert [r.line for r in a] == [r.line for r in b] and len(a) == 10
    assert [r.line for r in a] != [r.line for r in sample(records, 10, seed=8)]
    assert [r.line for r in a] == sorted(r.line for r in a)
    with caplog.at_level(logging.WARNING):
        assert len(sample(records, 500, seed=7)) == 50
    assert "only 50" in caplog.text


def test_split_is_disjoint_complete_and_seeded():
    records = [_record(i, f"پرسش {i}") for i in range(1, 101)]
    train, test = train_test_split(records, 0.1, seed=42)
    assert len(train) == 90 and len(test) == 10
    assert {r.line for r in train}.isdisjoint({r.line for r in test})
    assert {r.line for r in train} | {r.line for r in test} == set(range(1, 101))
    train2, test2 = train_test_split(records, 0.1, seed=42)
    assert [r.line for r in test] == [r.line for r in test2]
    assert [r.line for r in test] != [r.line for r in train_test_split(records, 0.1, seed=1)[1]]
    assert len(train_test_split(records[:3], 0.1, seed=0)[1]) == 1  # a test set even when tiny
