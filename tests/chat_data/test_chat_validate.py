"""Validation of normalised conversations and the content-based conversation id."""

import pytest

from llm_caption.chat_data.normalize import PersianNormalizer
from llm_caption.chat_data.records import ChatRecord
from llm_caption.chat_data.validate import conversation_id, normalize_and_validate, structure_error


def _msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


@pytest.mark.parametrize("messages, reason", [
    (_msgs(("user", "a"), ("assistant", "b")), None),
    (_msgs(("system", "s"), ("user", "a"), ("assistant", "b")), None),
    (_msgs(("user", "a"), ("assistant", "")), "empty_content"),
    (_msgs(("user", "a"), ("system", "s"), ("assistant", "b")), "misplaced_system"),
    (_msgs(("system", "s")), "empty_conversation"),
    (_msgs(("assistant", "b"), ("user", "a"), ("assistant", "c")), "does_not_start_with_user"),
    (_msgs(("user", "a"), ("user", "a2"), ("assistant", "b")), "not_alternating"),
    (_msgs(("user", "a"), ("assistant", "b"), ("user", "c")), "does_not_end_with_assistant"),
])
def test_structure_rules(messages, reason):
    error = structure_error(messages)
    assert (error[0] if error else None) == reason


def test_normalised_whitespace_only_content_is_empty():
    record = ChatRecord("f.jsonl", 3, "raw", messages=tuple(_msgs(("user", "سلام"), ("assistant", " \u200c\t "))))
    out = normalize_and_validate(record, PersianNormalizer(), keep_system=False)
    assert out.reason == "empty_content" and out.line == 3


def test_system_dropped_and_counted_unless_kept():
    msgs = tuple(_msgs(("system", "تو دستیار هستی"), ("user", "سلام"), ("assistant", "درود")))
    dropped = normalize_and_validate(ChatRecord("f", 1, None, messages=msgs), PersianNormalizer(), keep_system=False)
    assert dropped.accepted and [m["role"] for m in dropped.messages] == ["user", "assistant"]
    assert dropped.notes == {"system_messages_dropped": 1}
    kept = normalize_and_validate(ChatRecord("f", 1, None, messages=msgs), PersianNormalizer(), keep_system=True)
    assert kept.accepted and kept.messages[0]["role"] == "system"


def test_conversation_id_is_stable_and_content_based():
    a = _msgs(("user", "سلام"), ("assistant", "درود"))
    assert conversation_id(a) == conversation_id([dict(m) for m in a])
    assert conversation_id(a) != conversation_id(_msgs(("user", "سلام"), ("assistant", "درود!")))
    # Arabic and Persian spellings normalise to the same conversation.
    n = PersianNormalizer()
    r1 = normalize_and_validate(ChatRecord("f", 1, None, messages=tuple(_msgs(("user", "علي"), ("assistant", "ك")))), n, False)
    r2 = normalize_and_validate(ChatRecord("f", 2, None, messages=tuple(_msgs(("user", "علی"), ("assistant", "ک")))), n, False)
    assert r1.conversation_id == r2.conversation_id
