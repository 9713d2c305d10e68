"""data_engineering, captions branch."""

from kedro.pipeline import Pipeline


def create_captions_pipeline() -> Pipeline:
    return Pipeline([])
