"""The data_engineering pipeline: the chat branch and the caption branch, side by side."""

from kedro.pipeline import Pipeline

from .captions import create_captions_pipeline
from .chat import create_chat_pipeline


def create_pipeline(**kwargs) -> Pipeline:
    """Both studies' data preparation; the two branches share no datasets."""
    return create_chat_pipeline() + create_captions_pipeline()
