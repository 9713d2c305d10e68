"""The caption_training pipeline: feature cache -> three captioners -> beam-search predictions -> registry."""

from kedro.pipeline import Pipeline, node

from .nodes import build_feature_cache, predict_captions, register_best_captioner, train_caption_models


def create_pipeline(**kwargs) -> Pipeline:
    """Nodes of ``kedro run --pipeline=caption_training`` (inputs from data_engineering's caption branch)."""
    return Pipeline([
        node(build_feature_cache, ["caption_images", "image_transform_spec", "params:caption_training"],
             "caption_feature_cache", name="build_caption_feature_cache"),
        node(train_caption_models,
             ["captions_encoded", "caption_vocab", "caption_feature_cache", "params:caption_training", "params:seed"],
             ["caption_model_results", "caption_loss_history", "caption_models"], name="train_caption_models"),
        node(predict_captions,
             ["caption_model_results", "caption_models", "caption_images", "captions_encoded", "caption_vocab",
              "caption_feature_cache", "params:caption_training"],
             ["caption_predictions", "caption_attention_sample"], name="predict_captions"),
        node(register_best_captioner,
             ["caption_model_results", "caption_models", "caption_vocab", "image_transform_spec",
              "caption_feature_cache", "params:caption_training"],
             "caption_registration", name="register_best_captioner"),
    ])
