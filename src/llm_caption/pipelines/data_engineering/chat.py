"""data_engineering, chat branch."""

from kedro.pipeline import Pipeline


def create_chat_pipeline() -> Pipeline:
    return Pipeline([])
