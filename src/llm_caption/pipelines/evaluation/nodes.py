"""Nodes of the evaluation pipeline: thin wrappers around ``llm_caption.evaluation``."""

from __future__ import annotations

import logging
import re
from typing import Any

import pandas as pd

from llm_caption.evaluation.caption_metrics import score_splits
from llm_caption.evaluation.chat_metrics import evaluate_chat
from llm_caption.tracking import caption_metrics_by_run, chat_metrics_by_run, log_metrics_to_run

logger = logging.getLogger(__name__)

_NOT_IN_METRIC_NAMES = re.compile(r"[^/\w.\- ]")


def metric_name_part(name: str) -> str:
    """``name`` (an architecture or method) as part of an MLflow metric name, which may hold only alphanumerics,
    ``_ - . /`` and spaces: any other character becomes ``-``
    (``show_attend_tell+scst`` -> ``show_attend_tell-scst``)."""
    return _NOT_IN_METRIC_NAMES.sub("-", str(name))


def score_captions(caption_predictions: pd.DataFrame, params: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score every architecture's beam-search captions on each split.

    Args:
        caption_predictions: ``architecture, split, image_id, image_path, prediction, references``.
        params: ``scorers`` (names from ``CAPTION_SCORERS``), ``splits``, ``meteor_timeout_s``.

    Returns:
        ``caption_metrics`` (long: architecture, split, metric, value, implementation) and
        ``caption_per_image_scores`` (one row per image and architecture).
    """
    return score_splits(caption_predictions, params["scorers"], params.get("splits"),
                        params.get("meteor_timeout_s", 300))


def score_chat(llm_method_results: pd.DataFrame, llm_generations: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
    """Test-split chat metrics per method: loss, perplexity, chrF, ROUGE-L, Persian share, distinct-n, repetition."""
    return evaluate_chat(llm_method_results, llm_generations, params.get("repetition_ngram", 3))


def log_evaluation_metrics(caption_metrics: pd.DataFrame, chat_metrics: pd.DataFrame,
                           caption_model_results: pd.DataFrame, llm_method_results: pd.DataFrame) -> dict[str, dict]:
    """Put the figures on each model's own MLflow run and return them for the evaluation run.

    Returns:
        ``{"caption.<arch>.<split>_<metric>": {"value", "step"}, "chat.<method>.test_<metric>": ...}``
        for kedro-mlflow's ``MlflowMetricsHistoryDataset`` (names through :func:`metric_name_part`).
    """
    named = (("architectures", caption_model_results["architecture"]), ("methods", llm_method_results["method"]))
    for kind, names in named:
        parts: dict[str, str] = {}
        for name in map(str, names):
            if parts.setdefault(metric_name_part(name), name) != name:
                raise ValueError(f"{kind} {parts[metric_name_part(name)]!r} and {name!r} get the same MLflow metric "
                                 f"names ({metric_name_part(name)!r}); rename one")
    out: dict[str, dict] = {}
    caption_runs = dict(zip(caption_model_results["architecture"].astype(str), caption_model_results["mlflow_run_id"]))
    for arch, metrics in caption_metrics_by_run(caption_metrics, caption_model_results).items():
        log_metrics_to_run(caption_runs.get(arch), metrics, owner=f"caption architecture {arch!r}")
        out.update({f"caption.{metric_name_part(arch)}.{k}": {"value": v, "step": 0}
                    for k, v in metrics.items() if pd.notna(v)})
    chat_runs = dict(zip(llm_method_results["method"].astype(str), llm_method_results["mlflow_run_id"]))
    for method, metrics in chat_metrics_by_run(chat_metrics).items():
        log_metrics_to_run(chat_runs.get(method), metrics, owner=f"chat method {method!r}")
        out.update({f"chat.{metric_name_part(method)}.{k}": {"value": v, "step": 0} for k, v in metrics.items()})
    logger.info("Logged %d evaluation metrics", len(out))
    return out
