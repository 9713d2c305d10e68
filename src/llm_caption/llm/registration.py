"""Register the best fine-tuned method (``registry.model_name``: ``persian-chat-adapter`` for the Persian study,
``persian-chat-quickstart`` for the default run) and move ``champion`` only when earned.

Methods are ranked by **bits per character** of the assistant text on the eval split (lower is better): unlike
the per-token eval loss it means the same thing for models with different tokenizers, so an adapter of one model
can be compared with the champion of another.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ..registry import finite_metric, register_and_promote
from ..tracking import reopen_run
from .pyfunc import log_chat_model

logger = logging.getLogger(__name__)


RANKING_METRIC = "bits_per_char"


def best_method(results: pd.DataFrame, metric: str = RANKING_METRIC) -> pd.Series:
    """The trained method (one with an adapter directory) with the lowest finite ``metric``.

    When no trained method has a finite value (every one diverged to NaN), the first trained
    method is returned: it is registered with its NaN value, which never takes the champion alias.
    """
    trained = results[results["adapter_dir"].fillna("").astype(str) != ""]
    if trained.empty:
        raise ValueError("llm_method_results has no trained method to register (only 'base'?)")
    if metric not in trained.columns:
        raise ValueError(f"llm_method_results has no {metric!r} column to rank methods by; has {list(trained.columns)}")
    values = pd.to_numeric(trained[metric], errors="coerce")
    finite = values[np.isfinite(values)]
    if finite.empty:
        logger.warning("No trained method has a finite %s (%s): registering %s without the champion alias", metric,
                       dict(zip(trained["method"], trained[metric])), trained.iloc[0]["method"])
        return trained.iloc[0]
    return trained.loc[finite.idxmin()]


def register_adapter(adapter_dir: str, method: str, value: float, eval_split: str, model_name: str,
                     run_id: str | None = None, generation: Mapping[str, Any] | None = None,
                     pip_requirements: list[str] | None = None, metric: str = "eval_loss",
                     limits: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Log ``adapter_dir`` as a pyfunc chat model (in run ``run_id``, or a new run), register it as
    ``model_name`` judged on ``value`` of ``metric`` (lower is better, e.g. ``eval_loss`` or ``bits_per_char``)
    on ``eval_split``; returns the decision. ``limits`` caps what a request to the served model may ask.

    A NaN or missing value is registered as NaN and never takes the champion alias; a version
    measured on another ``eval_split`` or metric than the champion's never takes it either (see ``registry``)."""
    with reopen_run(run_id, method):  # the method's own run; a new run `register-<method>` if the store lacks it
        info = log_chat_model(adapter_dir, generation, pip_requirements, limits=limits)
    loss = float("nan") if finite_metric(value) is None else float(value)
    decision = register_and_promote(info.model_uri, model_name, metric, loss,
                                    greater_is_better=False, eval_split=eval_split,
                                    extra_tags={"method": method})
    return {"model_name": model_name, "version": decision.version, "method": method,
            "metric": metric, "value": loss, "eval_split": eval_split, "promoted": decision.promoted,
            "reason": decision.reason, "model_uri": info.model_uri}
