"""Tables and counts that leave the chat-data steps: accepted conversations, rejected records, the report."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from .formats import short_repr
from .records import ChatRecord, reason_counts

CHAT_COLUMNS = ["conversation_id", "source", "messages", "n_tokens"]
REJECTED_COLUMNS = ["source", "line", "reason", "detail", "record"]


class RejectedShareError(ValueError):
    """Too large a share of the input was rejected to trust the data."""


def conversations_frame(records: Sequence[ChatRecord]) -> pd.DataFrame:
    """``chat_train`` / ``chat_test`` rows: conversation_id, source, messages (list of {role, content}), n_tokens."""
    rows = [{"conversation_id": r.conversation_id, "source": r.source,
             "messages": [dict(m) for m in r.messages], "n_tokens": int(r.n_tokens)} for r in records]
    frame = pd.DataFrame(rows, columns=CHAT_COLUMNS)
    return frame.astype({"conversation_id": "str", "source": "str", "n_tokens": "int64"})


def record_as_text(record: Any) -> str:
    """A rejected record as text that always writes as UTF-8: a line as read, any other value (a list item,
    a table row, a corpus chain) as JSON; unpaired surrogates are escaped (``\\ud800``)."""
    if not isinstance(record, str):
        try:
            record = json.dumps(record, ensure_ascii=False, default=str)
        except (TypeError, ValueError, RecursionError):  # circular, too deep, an integer too long to print
            try:
                record = short_repr(record)
            except (ValueError, RecursionError):
                record = f"<{type(record).__name__} that cannot be shown as text>"
    return record.encode("utf-8", "backslashreplace").decode("utf-8")


def rejected_frame(records: Sequence[ChatRecord]) -> pd.DataFrame:
    """One row per rejected record: source, line, reason, detail and the record as text (:func:`record_as_text`)."""
    rows = [{"source": r.source, "line": r.line, "reason": r.reason, "detail": record_as_text(r.detail),
             "record": record_as_text(r.record)} for r in records if not r.accepted]
    return pd.DataFrame(rows, columns=REJECTED_COLUMNS)


def rejection_summary(records: Sequence[ChatRecord]) -> dict[str, Any]:
    """Counts over all records: input, accepted, rejected (total and by reason), per source, notes."""
    notes: dict[str, int] = {}
    for r in records:
        for key, value in r.notes.items():
            notes[key] = notes.get(key, 0) + value
    by_source: dict[str, dict[str, int]] = {}
    for r in records:
        counts = by_source.setdefault(r.source, {"input": 0, "accepted": 0, "rejected": 0})
        counts["input"] += 1
        counts["accepted" if r.accepted else "rejected"] += 1
    rejected = reason_counts(records)
    n_rejected = sum(rejected.values())
    return {
        "input": len(records),
        "accepted": len(records) - n_rejected,
        "rejected": n_rejected,
        "rejected_share": round(n_rejected / len(records), 6) if records else 0.0,
        "rejected_by_reason": rejected,
        "duplicates": rejected.get("duplicate", 0),
        "filtered_by_length": rejected.get("too_long", 0),
        "by_source": by_source,
        **notes,
    }


def check_rejected_share(summary: Mapping[str, Any], max_share: float) -> None:
    """Raise :class:`RejectedShareError` when more than ``max_share`` of the input was rejected."""
    if summary["input"] == 0:
        raise RejectedShareError("No chat records were read from the sources (chat_data.sources)")
    share = summary["rejected"] / summary["input"]
    if share > max_share:
        reasons = ", ".join(f"{k}: {v}" for k, v in summary["rejected_by_reason"].items())
        raise RejectedShareError(
            f"{summary['rejected']} of {summary['input']} chat records ({share:.1%}) were rejected, more than "
            f"chat_data.max_rejected_share = {max_share:.1%} ({reasons}); every rejected record is in the "
            "chat_rejected dataset (02_intermediate/rejected_chat.jsonl under the environment's chat_data_root)")


def metrics_from_report(report: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The report's counts as metrics for kedro-mlflow's MlflowMetricsHistoryDataset (``{name: {value, step}}``)."""
    flat: dict[str, float] = {}
    for key in ("input", "accepted", "rejected", "rejected_share", "duplicates", "filtered_by_length",
                "sampled", "train", "test"):
        flat[key] = float(report[key])
    for reason, count in report["rejected_by_reason"].items():
        flat[f"rejected.{reason}"] = float(count)
    for split in ("train", "test"):
        for stat in ("mean", "p95", "max"):
            flat[f"tokens_{split}.{stat}"] = float(report["token_stats"][split][stat])
    return {name: {"value": value, "step": 0} for name, value in flat.items()}
