"""Conversations -> token ids with labels on assistant tokens only.

A conversation is a list of ``{"role", "content"}`` messages (docs/datasets.md). It is rendered
with the model's *training* chat template, which wraps every assistant turn in
``{% generation %}...{% endgeneration %}``; the tokenizer then returns a mask of exactly the
tokens produced by assistant turns (their text and end-of-turn token). Every other token gets
label ``-100`` and does not count in the loss.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


def as_messages(raw: Any, where: str) -> list[dict[str, str]]:
    """Validate one conversation (``where`` names it in errors) and return it as plain dicts."""
    if hasattr(raw, "tolist"):
        raw = raw.tolist()
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}}, got {type(raw).__name__}")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}, message {i}: expected a mapping with 'role' and 'content', got {message!r}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"{where}, message {i}: unknown role {role!r} (expected one of {ROLES})")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"{where}, message {i}: empty or non-text content {content!r}")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the conversation must end with an assistant turn, ends with {messages[-1]['role']!r}")
    return messages


def tokenize_conversation(tokenizer, messages: list[dict[str, str]], template: str | None,
                          max_len: int | None = None) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (assistant tokens only; others ``-100``), cut to ``max_len`` tokens."""
    out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if not any(mask):
        raise ValueError("the training chat template marks no assistant tokens: it needs {% generation %} markers")
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids, mask, strict=True)]
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    return {"input_ids": ids, "labels": labels}


def tokenize_conversations(tokenizer, conversations: Iterable[tuple[str, Any]], template: str | None,
                           max_len: int | None = None):
    """A ``datasets.Dataset`` of tokenized conversations (``(id, messages)`` pairs).

    A conversation whose assistant tokens all fall beyond ``max_len`` carries no loss; it is
    reported in the log by id and left out of the training set (and counted).
    """
    from datasets import Dataset

    rows, dropped = [], []
    for conv_id, raw in conversations:
        row = tokenize_conversation(tokenizer, as_messages(raw, f"conversation {conv_id}"), template, max_len)
        if all(label == IGNORE_INDEX for label in row["labels"]):
            dropped.append(str(conv_id))
            continue
        rows.append(row)
    if dropped:
        logger.warning("%d conversation(s) have no assistant token within max_seq_len=%s and are not used: %s",
                       len(dropped), max_len, ", ".join(dropped[:20]))
    if not rows:
        raise ValueError(f"no conversation has an assistant token within max_seq_len={max_len}")
    return Dataset.from_list(rows)


def first_user_turn(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """The prompt up to (and including) the first user turn, and the assistant's reply to it."""
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and i > 0:
            return messages[:i], message["content"]
    raise ValueError("conversation has no user turn followed by an assistant turn")


def labelled_end(labels: Sequence[int]) -> int:
    """Tokens a conversation needs so that its last labelled token (the last assistant turn's end-of-turn) is
    inside the window: the index after that token (0 without labels)."""
    return next((i + 1 for i in range(len(labels) - 1, -1, -1) if labels[i] != IGNORE_INDEX), 0)


def choose_max_seq_len(ends: Sequence[int], coverage: float = 0.9, multiple_of: int = 32,
                       cap: int = 512) -> dict[str, Any]:
    """The shortest multiple of ``multiple_of`` (at most ``cap``) whose window holds the whole assistant turn(s)
    of at least ``coverage`` of the conversations (``ends`` from :func:`labelled_end`).

    Returns ``{"max_seq_len", "coverage", "share_fitting", "n_conversations", "longest"}``; when even ``cap``
    covers less than ``coverage``, ``cap`` is chosen and ``share_fitting`` says how much it holds."""
    if not 0 < coverage <= 1:
        raise ValueError(f"max_seq_len_choice.coverage must be in (0, 1], got {coverage!r}")
    if int(multiple_of) < 1 or int(cap) < int(multiple_of):
        raise ValueError(f"max_seq_len_choice needs 1 <= multiple_of <= max, got multiple_of={multiple_of!r}, max={cap!r}")
    ends = [int(e) for e in ends]
    if not ends:
        raise ValueError("choose_max_seq_len: no conversations to measure")
    step, cap = int(multiple_of), int(cap)
    length = cap
    for candidate in range(step, cap + 1, step):
        if sum(e <= candidate for e in ends) >= coverage * len(ends):
            length = candidate
            break
    return {"max_seq_len": length, "coverage": float(coverage),
            "share_fitting": sum(e <= length for e in ends) / len(ends),
            "n_conversations": len(ends), "longest": max(ends)}


def resolve_max_seq_len(value: Any, tokenizer, conversations: Iterable[tuple[str, Any]], template: str | None,
                        choice: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``max_seq_len`` as configured: an int (or null: no cut) is kept; ``auto`` is chosen from the training
    conversations by :func:`choose_max_seq_len` with the ``choice`` settings (coverage, multiple_of, max).
    Either way the result says which share of the conversations fits whole."""
    ends = [labelled_end(tokenize_conversation(tokenizer, as_messages(raw, f"conversation {cid}"), template)["labels"])
            for cid, raw in conversations]
    if value == "auto":
        choice = dict(choice or {})
        return choose_max_seq_len(ends, float(choice.get("coverage", 0.9)), int(choice.get("multiple_of", 32)),
                                  int(choice.get("max", 512)))
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"llm_finetuning.max_seq_len must be a positive integer, null or 'auto', got {value!r}")
    fitting = sum(value is None or e <= value for e in ends)
    return {"max_seq_len": value, "coverage": None, "share_fitting": fitting / max(len(ends), 1),
            "n_conversations": len(ends), "longest": max(ends, default=0)}
