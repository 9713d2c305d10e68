"""Chat with a fine-tuned model from the command line.

    python -m llm_caption.chat --model-uri models:/persian-chat-adapter@champion "سلام، حالت چطوره؟"
    python -m llm_caption.chat --model-uri models:/persian-chat-quickstart@champion "سلام، حالت چطوره؟"
    python -m llm_caption.chat --method lora "سلام، حالت چطوره؟"      # a local adapter of llm_finetuning

Each study registers under its own name (``llm_finetuning.registry.model_name``): ``kedro run --env=persian_study``
(the Persian instruction set, with its release model: the project's chat model) as ``persian-chat-adapter``,
``make run`` / ``kedro run`` (a quick Gemma-3-270m tuning on chatterbot-corpus's Persian) as
``persian-chat-quickstart``; ``@champion`` is each one's best.

Run from the project root: the MLflow store is the one ``kedro run --env ENV`` uses
(``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlruns/mlflow.db``; ``--env smoke``: ``mlruns/smoke.db``)
unless ``--tracking-uri`` says otherwise.

Start-up is most of a call's time, so a registered chat model is loaded the short way when it can be: a
``models:/name@alias`` (or ``/version``) URI in a local sqlite store is resolved with one read-only query of the
store's registry tables, and the model built from the files of its folder (its settings and adapter; no
``mlflow.pyfunc``, no unpickling, no tracking or registry store set-up, and MLflow is not imported at all).
A model logged before its settings were saved as an artifact, another kind of model, or another store goes
through ``mlflow.pyfunc.load_model``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

logger = logging.getLogger("llm_caption.chat")

# A local method (--method) has no logged decoding: conf/persian_study's, chosen on dev answers.
LOCAL_GENERATION = {"max_new_tokens": 128, "do_sample": False, "repetition_penalty": 1.0, "no_repeat_ngram_size": 3}


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llm_caption.chat", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-uri", help="MLflow model URI: models:/persian-chat-adapter@champion after kedro run "
                                            "--env=persian_study, models:/persian-chat-quickstart@champion after make run")
    source.add_argument("--method", help="name of a method saved by llm_finetuning under --adapters-dir")
    parser.add_argument("message", help="the user's message")
    parser.add_argument("--adapters-dir", default="data/06_models/llm", help="where llm_finetuning saved methods")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: the store `kedro run --env ENV` uses)")
    parser.add_argument("--env", default=os.environ.get("KEDRO_ENV"),
                        help="Kedro environment whose store to use, e.g. smoke (default: $KEDRO_ENV or base)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help="default: the registered model's own setting (its logged decoding); 128 for --method")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


def check_model_uri(uri: str) -> None:
    """Fail with a clear message when a ``models:/name@alias`` or ``models:/name/version`` URI does not resolve."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not uri.startswith("models:/"):
        return
    ref = uri[len("models:/"):]
    client = MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, version = ref.split("/", 1)
            client.get_model_version(name, version)
        elif not ref.startswith("m-"):
            client.get_registered_model(ref)
    except MlflowException as error:
        raise SystemExit(f"error: model URI {uri!r} does not exist in the MLflow store "
                         f"{client._registry_uri}: {error.message.splitlines()[0]}") from None


def store_uri(explicit: str | None, env: str | None) -> str:
    """The store to read: ``explicit`` as given when it is an existing local sqlite file (nothing to check, no
    project config to read), else :func:`llm_caption.tracking.reachable_store_uri`."""
    from .caption import sqlite_file

    db = sqlite_file(explicit) if explicit else None
    if db is not None and db.is_file():
        return explicit
    from .tracking import reachable_store_uri

    return reachable_store_uri(explicit, env)


def load_chat_model(args: argparse.Namespace):
    """``(model, refusals)``: the registered model of ``args.model_uri`` and the exception types with which it
    refuses a request (each with a one-line ``message``). A chat model in a local sqlite store is built from its
    folder (:func:`llm_caption.llm.pyfunc.load_local`); anything else is loaded through MLflow, after a clear
    error for a URI that does not resolve."""
    from .caption import local_registered_model
    from .llm.pyfunc import ChatError, load_local

    uri = store_uri(args.tracking_uri, args.env)
    folder = local_registered_model(uri, args.model_uri)
    model = load_local(folder) if folder is not None else None
    if model is not None:
        return model, (ChatError,)
    import mlflow
    from mlflow.exceptions import MlflowException

    from .caption import load_registered

    mlflow.set_tracking_uri(uri)
    if folder is None:  # not found in a local store: a clear error if it does not exist
        check_model_uri(args.model_uri)
    return load_registered(uri, args.model_uri), (ChatError, MlflowException)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.message.strip():
        raise SystemExit("error: the message is empty")
    logging.basicConfig(level=logging.WARNING)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    messages = [{"role": "user", "content": args.message}]
    asked = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    if args.model_uri:
        model, refusals = load_chat_model(args)
        try:  # the decoding the model was registered with (chosen on dev answers); a request changes the length only
            reply = model.predict([messages], params=asked or None)[0]
        except refusals as error:  # a request the model refuses: its one-line reason
            raise SystemExit(f"error: {error.message}") from None
    else:
        from .llm.adapters import load_finetuned
        from .llm.generation import generate_answers

        adapter_dir = Path(args.adapters_dir) / args.method
        if not adapter_dir.is_dir():
            available = sorted(p.name for p in Path(args.adapters_dir).glob("*") if p.is_dir() and not p.name.startswith("."))
            raise SystemExit(f"error: no saved method {args.method!r} in {args.adapters_dir} (found: {available})")
        model, tokenizer = load_finetuned(adapter_dir)
        reply = generate_answers(model, tokenizer, [messages], {**LOCAL_GENERATION, **asked})[0]
    print(reply)
    return 0


if __name__ == "__main__":
    sys.exit(main())
