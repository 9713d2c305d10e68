"""llm_caption: parameter-efficient Persian chat fine-tuning and image captioning, as a Kedro project tracked with MLflow."""

__version__ = "0.1.0"
