"""The unit that flows through the chat-data steps: one input record and what became of it.

Every record read from a source becomes exactly one :class:`ChatRecord`, kept to the end:
either accepted (``reason is None``) or rejected with a reason from :data:`REASONS`. This is
what makes ``accepted + rejected == input`` checkable (:func:`check_accounting`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: Every reason a record can be rejected for, with what it means.
REASONS: dict[str, str] = {
    "invalid_utf8": "the line is not valid UTF-8",
    "empty_record": "the line is blank",
    "malformed_json": "the line (or file) is not valid JSON (or holds a number too long to convert)",
    "too_deeply_nested": "the line (or file) nests arrays/objects deeper than the JSON parser can follow",
    "not_a_list": "a .json file whose top level is not a list of records (the whole file is one rejected record)",
    "not_an_object": "the record is valid JSON but not an object",
    "missing_messages": "the record has neither `messages` (OpenAI) nor `conversations` (ShareGPT)",
    "bad_messages": "the messages are not a list of {role, content} objects with text content",
    "invalid_unicode": "a message holds an unpaired surrogate (e.g. the JSON escape \\ud800), which is no character",
    "unknown_role": "a message has a role other than system/user/assistant (human/gpt in ShareGPT)",
    "empty_content": "a message's content is empty (after normalisation)",
    "empty_conversation": "no user/assistant message is left",
    "misplaced_system": "a system message that is not the first message",
    "does_not_start_with_user": "the first non-system message is not from the user",
    "not_alternating": "two consecutive messages have the same role",
    "does_not_end_with_assistant": "the last message is not from the assistant",
    "duplicate": "the same conversation (after normalisation) appeared earlier",
    "too_long": "longer than max_seq_len tokens under the model's chat template",
}


@dataclass(frozen=True)
class ChatRecord:
    """One input record (a line, a list item, a table row or a corpus conversation).

    ``source`` names the file or corpus, ``line`` is the 1-based line number in a text file,
    or the 1-based record number otherwise. ``record`` holds what was read (raw text of a
    line, or the object). ``messages`` is the parsed conversation, once there is one.
    """

    source: str
    line: int
    record: Any
    messages: tuple[dict[str, str], ...] | None = None
    reason: str | None = None
    detail: str = ""
    conversation_id: str | None = None
    n_tokens: int | None = None
    notes: dict[str, int] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        """True while no step has rejected the record."""
        return self.reason is None

    @property
    def location(self) -> str:
        """``source:line``, the way error messages name a record."""
        return f"{self.source}:{self.line}"


def reason_counts(records: Sequence[ChatRecord]) -> dict[str, int]:
    """Number of rejected records per reason (reasons with none are left out), sorted by reason."""
    return dict(sorted(Counter(r.reason for r in records if r.reason is not None).items()))


def first_rejection_per_reason(records: Sequence[ChatRecord]) -> dict[str, ChatRecord]:
    """The first rejected record of each reason, to name one example in the log."""
    first: dict[str, ChatRecord] = {}
    for r in records:
        if r.reason is not None:
            first.setdefault(r.reason, r)
    return dict(sorted(first.items()))


def check_accounting(inputs: Sequence[ChatRecord], outputs: Sequence[ChatRecord]) -> None:
    """Raise unless ``outputs`` holds every input record exactly once (accepted + rejected = input)."""
    keys_in = [(r.source, r.line) for r in inputs]
    keys_out = [(r.source, r.line) for r in outputs]
    accepted = sum(r.accepted for r in outputs)
    rejected = len(outputs) - accepted
    if sorted(keys_in) != sorted(keys_out) or accepted + rejected != len(inputs):
        missing = sorted(set(keys_in) - set(keys_out))[:5]
        extra = sorted(set(keys_out) - set(keys_in))[:5]
        raise AssertionError(
            f"Chat records lost or invented: input {len(inputs)}, accepted {accepted} + rejected "
            f"{rejected} = {accepted + rejected}; missing e.g. {missing}, unexpected e.g. {extra}")
