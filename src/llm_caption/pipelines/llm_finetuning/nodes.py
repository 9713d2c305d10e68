"""Nodes of llm_finetuning: thin calls into :mod:`llm_caption.llm`."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from ... import distributed
from ...llm.experiment import compare_models, eval_subset, run_methods
from ...llm.registration import RANKING_METRIC, best_method, register_adapter
from ...registry import split_fingerprint

logger = logging.getLogger(__name__)


def finetune_methods(chat_train: pd.DataFrame, chat_test: pd.DataFrame, params: dict[str, Any],
                     llm_models: dict[str, Any], llm_model: str, seed: int
                     ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Train and measure every selected method on model ``llm_model``.

    Returns ``llm_method_results`` (one row per method), ``llm_loss_history`` (method, step,
    split, loss) and ``llm_generations`` (before/after answers to fixed and test prompts).
    """
    if llm_model not in llm_models:
        raise ValueError(f"llm_model {llm_model!r} is not in llm_models ({sorted(llm_models)})")
    tables = run_methods(chat_train, chat_test, params, llm_models[llm_model], seed)
    return tables["llm_method_results"], tables["llm_loss_history"], tables["llm_generations"]


def compare_base_and_instruct(chat_train: pd.DataFrame, chat_test: pd.DataFrame, params: dict[str, Any],
                              llm_models: dict[str, Any], llm_model: str, llm_method_results: pd.DataFrame,
                              seed: int) -> pd.DataFrame:
    """``llm_model_comparison``: every model of ``model_comparison.models`` untuned and after LoRA on the same
    test split (bits per character and chrF++ compare across tokenizers). Empty when none are listed."""
    return compare_models(chat_train, chat_test, params, llm_models, llm_model, llm_method_results, seed)


def register_best_method(results: pd.DataFrame, chat_test: pd.DataFrame, params: dict[str, Any],
                         seed: int) -> dict[str, Any]:
    """Register the method with the lowest bits per character as ``registry.model_name``; ``champion`` moves only
    if it is better than the current champion on the same eval split. Returns the decision (saved as JSON).

    Under a multi-process launcher only rank 0 registers; the other ranks return its decision."""
    distributed.ensure_process_group()
    decision = _register(results, chat_test, params, seed) if distributed.is_main_process() else None
    return distributed.broadcast(decision)


def _register(results: pd.DataFrame, chat_test: pd.DataFrame, params: dict[str, Any], seed: int) -> dict[str, Any]:
    registry = params.get("registry") or {}
    metric = registry.get("metric", RANKING_METRIC)
    best = best_method(results, metric)
    eval_ids = eval_subset(chat_test, params, seed)["conversation_id"].astype(str)
    return register_adapter(
        adapter_dir=best["adapter_dir"], method=best["method"], value=float(best[metric]),
        eval_split=split_fingerprint(eval_ids), model_name=registry.get("model_name", "persian-chat-adapter"),
        run_id=best["mlflow_run_id"], generation=params.get("generation"),
        pip_requirements=registry.get("pip_requirements"), metric=metric, limits=registry.get("serving"))
