"""data_engineering, chat branch: Persian conversations read, normalised, validated, de-duplicated,
measured under the model's chat template, length-filtered, sampled and split.

Every input record is either in ``chat_train``/``chat_test``, accepted but not sampled, or in
``chat_rejected`` with its reason; ``chat_data_report`` holds the counts. All nodes carry the
tag ``chat`` (``kedro run --pipeline=data_engineering --tags=chat`` runs this branch alone).
The logic lives in :mod:`llm_caption.chat_data`; the nodes below only wire it.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
from kedro.pipeline import Pipeline, node

from llm_caption.chat_data.normalize import PersianNormalizer
from llm_caption.chat_data.records import ChatRecord, check_accounting, first_rejection_per_reason
from llm_caption.chat_data.report import (check_rejected_share, conversations_frame, metrics_from_report,
                                          rejected_frame, rejection_summary)
from llm_caption.chat_data.sources import read_sources
from llm_caption.chat_data.split import deduplicate, sample, train_test_split
from llm_caption.chat_data.stats import apply_length_filter, length_histogram, length_summary
from llm_caption.chat_data.validate import normalize_and_validate

logger = logging.getLogger(__name__)


def read_chat_sources(chat_data: dict[str, Any]) -> list[ChatRecord]:
    """Every record of every source in ``chat_data.sources``, parsed or rejected with a reason."""
    records = read_sources(chat_data["sources"], chat_data.get("sharegpt_roles"))
    logger.info("Read %d chat records", len(records))
    return records


def normalize_and_validate_chats(records: list[ChatRecord], chat_data: dict[str, Any]) -> list[ChatRecord]:
    """Normalise the Persian text of every message and reject conversations that break the turn rules."""
    normalize = PersianNormalizer.from_config(chat_data.get("normalize"))
    keep_system = bool(chat_data.get("keep_system", False))
    out = [normalize_and_validate(r, normalize, keep_system) for r in records]
    check_accounting(records, out)
    return out


def deduplicate_chats(records: list[ChatRecord]) -> list[ChatRecord]:
    """Reject repeated conversations (compared after normalisation); the first occurrence stays."""
    out = deduplicate(records)
    check_accounting(records, out)
    logger.info("%d duplicate chat conversations", sum(r.reason == "duplicate" for r in out))
    return out


def measure_chat_token_lengths(records: list[ChatRecord], chat_data: dict[str, Any],
                               llm_models: dict[str, Any], llm_model: str) -> list[ChatRecord]:
    """Token length of each accepted conversation under the chat model's template; longer than ``max_seq_len`` -> ``too_long``."""
    from llm_caption.llm.models import load_tokenizer

    if llm_model not in llm_models:
        raise KeyError(f"Parameter llm_model={llm_model!r} is not in llm_models ({sorted(llm_models)})")
    if not any(r.accepted for r in records):
        logger.warning("No accepted chat conversation to measure; the tokenizer is not loaded")
        return list(records)
    tokenizer = load_tokenizer(llm_models[llm_model])
    out = apply_length_filter(records, tokenizer, int(chat_data["max_seq_len"]))
    check_accounting(records, out)
    return out


def collect_rejected_chats(raw: list[ChatRecord], final: list[ChatRecord]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The rejected records (source, line, reason, detail, record) and the counts; checks accepted + rejected = input."""
    check_accounting(raw, final)
    summary = rejection_summary(final)
    logger.info("Chat records: %d input, %d accepted, %d rejected %s", summary["input"], summary["accepted"],
                summary["rejected"], summary["rejected_by_reason"])
    for reason, example in first_rejection_per_reason(final).items():
        logger.warning("Rejected %d chat record(s) as %s, e.g. %s: %s", summary["rejected_by_reason"][reason],
                       reason, example.location, example.detail)
    return rejected_frame(final), summary


def sample_and_split_chats(records: list[ChatRecord], summary: dict[str, Any], chat_data: dict[str, Any],
                           seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fail when too much was rejected; otherwise sample ``n_samples`` accepted conversations and split them."""
    check_rejected_share(summary, float(chat_data.get("max_rejected_share", 0.2)))
    accepted = [r for r in records if r.accepted]
    sampled = sample(accepted, chat_data.get("n_samples"), seed)
    train, test = train_test_split(sampled, float(chat_data.get("test_size", 0.1)), seed)
    logger.info("Chat split: %d sampled of %d accepted -> %d train, %d test", len(sampled), len(accepted),
                len(train), len(test))
    return conversations_frame(train), conversations_frame(test)


def plot_chat_token_lengths(records: list[ChatRecord], chat_data: dict[str, Any]):
    """Histogram of the token lengths of all measured conversations, with the ``max_seq_len`` cut-off."""
    lengths = [r.n_tokens for r in records if r.n_tokens is not None]
    return length_histogram(lengths, int(chat_data["max_seq_len"]), int(chat_data.get("histogram_bins", 50)),
                            title="Persian chat conversations: tokens under the chat template")


def report_chat_data(summary: dict[str, Any], records: list[ChatRecord], chat_train: pd.DataFrame,
                     chat_test: pd.DataFrame) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """``chat_data_report`` (counts and token statistics) and the same counts as MLflow metrics."""
    measured = [r.n_tokens for r in records if r.n_tokens is not None]
    report = {
        **summary,
        "sampled": len(chat_train) + len(chat_test),
        "train": len(chat_train),
        "test": len(chat_test),
        "token_stats": {
            "measured": length_summary(measured),
            "train": length_summary(chat_train["n_tokens"].tolist()),
            "test": length_summary(chat_test["n_tokens"].tolist()),
        },
    }
    return report, metrics_from_report(report)


def create_chat_pipeline() -> Pipeline:
    """The chat branch of data_engineering (all nodes tagged ``chat``)."""
    return Pipeline(
        [
            node(read_chat_sources, "params:chat_data", "chat_records_raw", name="read_chat_sources"),
            node(normalize_and_validate_chats, ["chat_records_raw", "params:chat_data"], "chat_records_valid",
                 name="normalize_and_validate_chats"),
            node(deduplicate_chats, "chat_records_valid", "chat_records_unique", name="deduplicate_chats"),
            node(measure_chat_token_lengths,
                 ["chat_records_unique", "params:chat_data", "params:llm_models", "params:llm_model"],
                 "chat_records_measured", name="measure_chat_token_lengths"),
            node(collect_rejected_chats, ["chat_records_raw", "chat_records_measured"],
                 ["chat_rejected", "chat_rejection_summary"], name="collect_rejected_chats"),
            node(sample_and_split_chats,
                 ["chat_records_measured", "chat_rejection_summary", "params:chat_data", "params:seed"],
                 ["chat_train", "chat_test"], name="sample_and_split_chats"),
            node(plot_chat_token_lengths, ["chat_records_measured", "params:chat_data"],
                 "chat_token_length_histogram", name="plot_chat_token_lengths"),
            node(report_chat_data, ["chat_rejection_summary", "chat_records_measured", "chat_train", "chat_test"],
                 ["chat_data_report", "chat_data_metrics"], name="report_chat_data"),
        ],
        tags=["chat"],
    )
