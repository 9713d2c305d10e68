"""data_engineering: Persian chat conversations and image captions, cleaned, validated and split."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
