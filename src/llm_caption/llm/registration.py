"""Register the best fine-tuned method as ``persian-chat-adapter`` and move ``champion`` only when earned."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import mlflow
import pandas as pd

from ..registry import register_and_promote
from .pyfunc import log_chat_model

logger = logging.getLogger(__name__)


def best_method(results: pd.DataFrame) -> pd.Series:
    """The trained method (one with an adapter directory) with the lowest eval loss."""
    trained = results[results["adapter_dir"].fillna("").astype(str) != ""]
    if trained.empty:
        raise ValueError("llm_method_results has no trained method to register (only 'base'?)")
    return trained.loc[trained["eval_loss"].astype(float).idxmin()]


def register_adapter(adapter_dir: str, method: str, eval_loss: float, eval_split: str, model_name: str,
                     run_id: str | None = None, generation: Mapping[str, Any] | None = None,
                     pip_requirements: list[str] | None = None) -> dict[str, Any]:
    """Log ``adapter_dir`` as a pyfunc chat model (in run ``run_id``, or a new run), register it as
    ``model_name`` judged on ``eval_loss`` (lower is better) on ``eval_split``; returns the decision."""
    active = mlflow.active_run()
    with mlflow.start_run(run_id=run_id, nested=active is not None,
                          run_name=None if run_id else f"register-{method}"):
        info = log_chat_model(adapter_dir, generation, pip_requirements)
    decision = register_and_promote(info.model_uri, model_name, "eval_loss", float(eval_loss),
                                    greater_is_better=False, eval_split=eval_split,
                                    extra_tags={"method": method})
    if not decision.promoted:
        logger.warning("%s v%s registered without the champion alias: %s", model_name, decision.version,
                       decision.reason)
    return {"model_name": model_name, "version": decision.version, "method": method,
            "eval_loss": float(eval_loss), "eval_split": eval_split, "promoted": decision.promoted,
            "reason": decision.reason, "model_uri": info.model_uri}
