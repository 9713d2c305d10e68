"""Register the best captioner as ``image-captioner`` and move ``champion`` only when earned.

Architectures are ranked by validation BLEU-4 (greedy, the figure training early-stops on); the
winner is logged as a pyfunc model on its own training run (:func:`llm_caption.tracking.reopen_run`)
and registered on the validation split it was judged on (``eval_split`` of ``caption_model_results``,
computed once by :func:`.experiment.train_architectures`). A captioner that fine-tuned the encoder top is
logged with an encoder weights file holding the fine-tuned blocks (the served model runs that encoder).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from ..registry import register_and_promote
from ..tracking import reopen_run
from .datasets import FeatureSet
from .encoder_top import TopCaptioner, write_encoder_weights
from .experiment import base_architecture, decoder_kwargs, top_config, trained_model
from .pyfunc import log_captioner

RANKING_METRIC = "best_val_bleu4"


def best_architecture(results: pd.DataFrame) -> pd.Series:
    """The row of ``caption_model_results`` with the highest validation BLEU-4 (the first on ties)."""
    if results.empty:
        raise ValueError("caption_model_results has no architecture to register")
    return results.sort_values(RANKING_METRIC, ascending=False, kind="stable").iloc[0]


def served_config(arch: str, transform_spec: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """What the served model needs besides weights and vocabulary (the encoder's weights file path left out)."""
    return {"architecture": base_architecture(arch), "trained_as": arch, "decoder": decoder_kwargs(params, arch),
            "encoder": {k: v for k, v in params["encoder"].items() if k != "weights_path"},
            "transform_spec": transform_spec, "decoding": dict(params["decoding"])}


def register_best(results: pd.DataFrame, models: dict[str, Any], vocab: dict[str, Any],
                  transform_spec: dict[str, Any], features: FeatureSet, params: dict[str, Any]) -> dict[str, Any]:
    """Log the best architecture as a pyfunc model (with the request limits of ``params["serving"]``) and
    register it as ``registry.model_name``; returns the decision."""
    reg = params["registry"]
    best = best_architecture(results)
    arch, run_id, value = str(best["architecture"]), str(best["mlflow_run_id"]), float(best[RANKING_METRIC])
    model = trained_model(models, arch, params, len(vocab["itos"]), features.channels)
    with tempfile.TemporaryDirectory() as tmp, reopen_run(run_id, arch):
        decoder, encoder_weights = model, features.info["encoder_weights"]
        if isinstance(model, TopCaptioner):  # the fine-tuned top travels inside the encoder's weights file
            decoder = model.decoder
            encoder_weights = write_encoder_weights(params["encoder"], top_config(params)["cut_stage"],
                                                    model.top.state_dict(), Path(tmp) / "encoder_weights.pth")
        model_uri = log_captioner(decoder, served_config(arch, transform_spec, params), vocab,
                                  encoder_weights, name=reg.get("artifact_name", "image-captioner"),
                                  serving=params.get("serving"))
    decision = register_and_promote(model_uri, reg["model_name"], "val_bleu4", value, greater_is_better=True,
                                    eval_split=str(best["eval_split"]),
                                    extra_tags={"architecture": arch, "mlflow_run_id": run_id})
    return {"model_uri": model_uri, "architecture": arch, "val_bleu4": value, "name": decision.name,
            "version": decision.version, "promoted": decision.promoted, "reason": decision.reason}
