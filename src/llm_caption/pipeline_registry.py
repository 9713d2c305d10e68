"""Project pipelines: one folder per pipeline under ``pipelines/``, discovered by ``find_pipelines``."""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

# The order in which ``kedro run`` (no arguments) chains the studies.
PIPELINE_ORDER = ("data_engineering", "llm_finetuning", "caption_training", "evaluation", "reporting")


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines; ``__default__`` runs all of them."""
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum(pipelines.values(), Pipeline([]))
    return pipelines
