"""Normalise and validate parsed conversations.

A conversation is valid when, after normalisation and after dropping system messages (unless
``keep_system``): an optional system message comes first, then user and assistant turns
alternate, starting with the user and ending with the assistant, and no content is empty.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import replace

from .records import ChatRecord


def conversation_id(messages: Sequence[dict[str, str]]) -> str:
    """A stable id from the (normalised) content: the same conversation always gets the same id."""
    payload = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]


def structure_error(messages: Sequence[dict[str, str]]) -> tuple[str, str] | None:
    """``(reason, detail)`` when the message sequence breaks a rule, ``None`` when it is valid."""
    for i, m in enumerate(messages):
        if not m["content"]:
            return "empty_content", f"message {i} ({m['role']}) is empty"
    body = list(messages)
    if body and body[0]["role"] == "system":
        body = body[1:]
    for i, m in enumerate(body):
        if m["role"] == "system":
            return "misplaced_system", f"system message at position {i + len(messages) - len(body)}"
    if not body:
        return "empty_conversation", "no user or assistant message"
    if body[0]["role"] != "user":
        return "does_not_start_with_user", f"first turn is {body[0]['role']}"
    for i in range(1, len(body)):
        if body[i]["role"] == body[i - 1]["role"]:
            return "not_alternating", f"turns {i - 1} and {i} are both {body[i]['role']}"
    if body[-1]["role"] != "assistant":
        return "does_not_end_with_assistant", f"last turn is {body[-1]['role']}"
    return None


def normalize_and_validate(record: ChatRecord, normalize: Callable[[str], str], keep_system: bool) -> ChatRecord:
    """The record with normalised messages and its ``conversation_id``, or rejected with the rule it breaks.

    Already-rejected records pass through unchanged. Dropped system messages are counted in
    ``notes["system_messages_dropped"]``.
    """
    if not record.accepted:
        return record
    messages = [{"role": m["role"], "content": normalize(m["content"])} for m in record.messages]
    notes = dict(record.notes)
    if not keep_system:
        dropped = sum(m["role"] == "system" for m in messages)
        if dropped:
            notes["system_messages_dropped"] = dropped
            messages = [m for m in messages if m["role"] != "system"]
    error = structure_error(messages)
    if error:
        return replace(record, messages=tuple(messages), reason=error[0], detail=error[1], notes=notes)
    return replace(record, messages=tuple(messages), conversation_id=conversation_id(messages), notes=notes)
