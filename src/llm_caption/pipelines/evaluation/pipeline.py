"""The evaluation pipeline: caption metrics, chat metrics, and the figures on each model's MLflow run."""

from kedro.pipeline import Pipeline, node

from .nodes import log_evaluation_metrics, score_captions, score_chat


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        node(score_captions, ["caption_predictions", "params:evaluation.captions"],
             ["caption_metrics", "caption_per_image_scores"], name="score_captions"),
        node(score_chat, ["llm_method_results", "llm_generations", "params:evaluation.chat"],
             "chat_metrics", name="score_chat"),
        node(log_evaluation_metrics,
             ["caption_metrics", "chat_metrics", "caption_model_results", "llm_method_results"],
             "evaluation_mlflow_metrics", name="log_evaluation_metrics"),
    ])
