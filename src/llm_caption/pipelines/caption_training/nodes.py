"""caption_training nodes: thin calls into :mod:`llm_caption.captioning` (contract: docs/datasets.md).

Torch's thread count comes from ``torch_num_threads`` through the project's ``TorchThreadsHook``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from llm_caption import distributed
from llm_caption.captioning.datasets import FeatureSet
from llm_caption.captioning.experiment import build_features, predict_captions as predict_all, train_architectures
from llm_caption.captioning.registration import register_best


def build_feature_cache(caption_images: pd.DataFrame, image_transform_spec: dict[str, Any],
                        params: dict[str, Any]) -> FeatureSet:
    """``caption_feature_cache``: the frozen encoder's fp16 grids of every image (built once, then reused)."""
    return build_features(caption_images, image_transform_spec, params)


def train_caption_models(captions_encoded: pd.DataFrame, caption_vocab: dict[str, Any],
                         caption_feature_cache: FeatureSet, params: dict[str, Any],
                         seed: int) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Train every architecture of ``params["architectures"]``, each in its own MLflow run.

    Returns ``caption_model_results`` (one row per architecture), ``caption_loss_history`` (one row
    per architecture and epoch) and ``caption_models`` (each architecture's best weights).
    """
    tables = train_architectures(captions_encoded, caption_vocab, caption_feature_cache, params, seed)
    return tables["caption_model_results"], tables["caption_loss_history"], tables["caption_models"]


def predict_captions(caption_model_results: pd.DataFrame, caption_models: dict[str, Any],
                     caption_images: pd.DataFrame, captions_encoded: pd.DataFrame, caption_vocab: dict[str, Any],
                     caption_feature_cache: FeatureSet,
                     params: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Beam-search captions of val and test images by every architecture (``caption_predictions``) and one
    test image's attention maps from ``show_attend_tell`` (``caption_attention_sample``)."""
    return predict_all(caption_model_results, caption_models, caption_images, captions_encoded, caption_vocab,
                       caption_feature_cache, params)


def register_best_captioner(caption_model_results: pd.DataFrame, caption_models: dict[str, Any],
                            caption_vocab: dict[str, Any], image_transform_spec: dict[str, Any],
                            caption_feature_cache: FeatureSet, params: dict[str, Any]) -> dict[str, Any]:
    """Register the architecture with the best validation BLEU-4 as ``image-captioner``; ``champion`` moves only
    if it beats the champion on the same validation split. Returns the decision (``caption_registration``).
    Under a multi-process launcher only rank 0 registers; the other ranks return its decision."""
    distributed.ensure_process_group()
    decision = register_best(caption_model_results, caption_models, caption_vocab, image_transform_spec,
                             caption_feature_cache, params) if distributed.is_main_process() else None
    return distributed.broadcast(decision)
