"""Nodes of llm_finetuning: thin calls into :mod:`llm_caption.llm`."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from ... import distributed
from ...llm.experiment import compare_models, dev_split, eval_subset, run_methods
from ...llm.release import run_release
from ...llm.registration import RANKING_METRIC, best_method, register_adapter
from ...registry import split_fingerprint

logger = logging.getLogger(__name__)


def finetune_methods(chat_train: pd.DataFrame, chat_test: pd.DataFrame, params: dict[str, Any],
                     llm_models: dict[str, Any], llm_model: str, seed: int
                     ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Train and measure every selected method on model ``llm_model``, then the release stage when it is on.

    Returns ``llm_method_results`` (one row per method, the release model's last), ``llm_loss_history`` (method,
    step, split, loss), ``llm_generations`` (before/after answers to fixed and test prompts; ``final``: the
    release stage's answers to every test question) and ``llm_release_results`` (untuned model, study champion
    and release model on every test question; empty when the release stage is off).
    """
    if llm_model not in llm_models:
        raise ValueError(f"llm_model {llm_model!r} is not in llm_models ({sorted(llm_models)})")
    tables = run_methods(chat_train, chat_test, params, llm_models[llm_model], seed, release=run_release)
    return (tables["llm_method_results"], tables["llm_loss_history"], tables["llm_generations"],
            tables["llm_release_results"])


def compare_base_and_instruct(chat_train: pd.DataFrame, chat_test: pd.DataFrame, params: dict[str, Any],
                              llm_models: dict[str, Any], llm_model: str, llm_method_results: pd.DataFrame,
                              seed: int) -> pd.DataFrame:
    """``llm_model_comparison``: every model of ``model_comparison.models`` untuned and after LoRA on the same
    test split (bits per character and chrF++ compare across tokenizers). Empty when none are listed."""
    return compare_models(chat_train, chat_test, params, llm_models, llm_model, llm_method_results, seed)


def register_best_method(results: pd.DataFrame, chat_train: pd.DataFrame, chat_test: pd.DataFrame,
                         params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Register the study's method with the lowest ``registry.metric`` as ``registry.model_name``, then the
    release model (when the release stage ran); ``champion`` moves to a version only if it is better than the
    current champion on the same split. Returns the study's decision, the release's under ``release``.

    Under a multi-process launcher only rank 0 registers; the other ranks return its decision."""
    distributed.ensure_process_group()
    decision = _register(results, chat_train, chat_test, params, seed) if distributed.is_main_process() else None
    return distributed.broadcast(decision)


def measured_split(chat_train: pd.DataFrame, chat_test: pd.DataFrame, params: dict[str, Any], metric: str,
                   seed: int) -> str:
    """Fingerprint of the conversations ``metric`` is measured on: the dev split for ``dev_*`` metrics, else the
    eval subset of the test split."""
    if metric.startswith("dev_"):
        _, dev = dev_split(chat_train, params, seed)
        if dev is None:
            raise ValueError(f"registry.metric {metric!r} needs a dev split: set llm_finetuning.n_dev_conversations")
        return split_fingerprint(dev["conversation_id"].astype(str))
    return split_fingerprint(eval_subset(chat_test, params, seed)["conversation_id"].astype(str))


def _register(results: pd.DataFrame, chat_train: pd.DataFrame, chat_test: pd.DataFrame, params: dict[str, Any],
              seed: int) -> dict[str, Any]:
    registry = params.get("registry") or {}
    metric = registry.get("metric", RANKING_METRIC)
    split = measured_split(chat_train, chat_test, params, metric, seed)
    stages = results["stage"].fillna("study").astype(str) if "stage" in results.columns else pd.Series(
        "study", index=results.index)

    def register(row: pd.Series) -> dict[str, Any]:
        return register_adapter(
            adapter_dir=row["adapter_dir"], method=row["method"], value=float(row[metric]), eval_split=split,
            model_name=registry.get("model_name", "persian-chat-adapter"), run_id=row["mlflow_run_id"],
            generation=params.get("generation"), pip_requirements=registry.get("pip_requirements"), metric=metric,
            limits=registry.get("serving"))

    decision = register(best_method(results[stages != "release"], metric))
    released = results[(stages == "release") & (results["adapter_dir"].fillna("").astype(str) != "")]
    if not released.empty:
        decision["release"] = register(released.iloc[0])
    return decision
