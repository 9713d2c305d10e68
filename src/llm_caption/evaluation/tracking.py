"""Write evaluation figures back onto the MLflow run of the model they describe."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)


def log_metrics_to_run(run_id: str | None, metrics: Mapping[str, float], owner: str,
                       client: MlflowClient | None = None) -> bool:
    """Log finite ``metrics`` on run ``run_id``; warn (naming ``owner``) and return False when the run is unknown."""
    if run_id is None or (isinstance(run_id, float) and math.isnan(run_id)) or not str(run_id).strip():
        logger.warning("%s has no MLflow run id: its evaluation metrics stay on the evaluation run only", owner)
        return False
    client = client or MlflowClient()
    try:
        client.get_run(str(run_id))
    except MlflowException:
        logger.warning("%s: MLflow run %s not found in this store: metrics not logged on it", owner, run_id)
        return False
    for key, value in metrics.items():
        if value is not None and math.isfinite(float(value)):
            client.log_metric(str(run_id), key, float(value))
    return True


def caption_metrics_by_run(caption_metrics: pd.DataFrame, model_results: pd.DataFrame) -> dict[str, dict[str, float]]:
    """``{architecture: {"test_coco_bleu_4": ..., ...}}`` from the long ``caption_metrics`` table."""
    out: dict[str, dict[str, float]] = {str(a): {} for a in model_results["architecture"]}
    for row in caption_metrics.itertuples(index=False):
        out.setdefault(str(row.architecture), {})[f"{row.split}_{row.metric}"] = float(row.value)
    return out


def chat_metrics_by_run(chat_metrics: pd.DataFrame) -> dict[str, dict[str, float]]:
    """``{method: {"test_chrf": ..., ...}}`` from the ``after`` rows of ``chat_metrics``."""
    out: dict[str, dict[str, float]] = {}
    after = chat_metrics[chat_metrics["stage"] == "after"]
    for row in after.to_dict(orient="records"):
        out[str(row["method"])] = {f"test_{k}": float(v) for k, v in row.items()
                                   if k not in ("method", "stage") and pd.notna(v)}
    return out
