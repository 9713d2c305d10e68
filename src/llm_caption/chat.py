"""Chat with a fine-tuned model from the command line.

    python -m llm_caption.chat --model-uri models:/persian-chat-adapter@champion "سلام، حالت چطوره؟"
    python -m llm_caption.chat --model-uri models:/persian-chat-quickstart@champion "سلام، حالت چطوره؟"
    python -m llm_caption.chat --method lora "سلام، حالت چطوره؟"      # a local adapter of llm_finetuning
    python -m llm_caption.chat --model-uri models:/persian-chat-adapter@champion   # a conversation

The answer is printed as it is generated (``--no-stream``: whole, at the end). Without a message the command
opens a conversation: each answer streamed, the history kept (up to the model's request limits), ``/reset`` to
start over, Ctrl-D to leave.

Each study registers under its own name (``llm_finetuning.registry.model_name``): ``kedro run --env=persian_study``
(the Persian instruction set, with its release model: the project's chat model) as ``persian-chat-adapter``,
``make run`` / ``kedro run`` (a quick Gemma-3-270m tuning on chatterbot-corpus's Persian) as
``persian-chat-quickstart``; ``@champion`` is each one's best.

Run from the project root: the MLflow store is the one ``kedro run --env ENV`` uses
(``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlruns/mlflow.db``; ``--env smoke``: ``mlruns/smoke.db``)
unless ``--tracking-uri`` says otherwise.

Start-up is most of a call's time, so a registered chat model is loaded the short way when it can be: a
``models:/name@alias`` (or ``/version``) URI in a local sqlite store is resolved with one read-only query of the
store's registry tables, and the model built from the files of its folder (its settings and its merged weights,
or base model + adapter for a method that cannot be merged; no ``mlflow.pyfunc``, no unpickling, no tracking or
registry store set-up, and MLflow, PEFT and the GGUF conversion are not imported at all). Merged Gemma-3 weights
decoded greedily run in plain torch (:mod:`llm_caption.llm.fast_gemma`: ``transformers`` is not imported either),
with bf16 layers and an int4 output layer whose top 256 are recomputed in fp32.
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
LOCAL_GENERATION = {"max_new_tokens": 128, "do_sample": False, "repetition_penalty": 1.0, "no_repeat_ngram_size": 3,
                    "exponential_decay_length_penalty": [48, 1.1], "non_persian_penalty": 2.0}


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
    parser.add_argument("message", nargs="?", default=None,
                        help="the user's message (none: an interactive conversation; /reset clears it, Ctrl-D leaves)")
    parser.add_argument("--adapters-dir", default="data/06_models/llm", help="where llm_finetuning saved methods")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: the store `kedro run --env ENV` uses)")
    parser.add_argument("--env", default=os.environ.get("KEDRO_ENV"),
                        help="Kedro environment whose store to use, e.g. smoke (default: $KEDRO_ENV or base)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help="default: the registered model's own setting (its logged decoding); 128 for --method")
    parser.add_argument("--temperature", type=positive_float, default=None,
                        help="sample at this temperature (--method, or a model registered with do_sample: true; "
                             "the registered models decode greedily, as chosen on dev answers)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling (with --temperature)")
    parser.add_argument("--no-stream", action="store_true", help="print each answer whole, once it is done")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


def positive_float(text: str) -> float:
    """An argparse type: a number above 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


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
    folder (:func:`llm_caption.llm.pyfunc.load_local`: its merged weights when it has them); anything else is
    loaded through MLflow, after a clear error for a URI that does not resolve."""
    from .caption import local_registered_model
    from .llm.pyfunc import ChatError, load_local

    uri = store_uri(args.tracking_uri, args.env)
    folder = local_registered_model(uri, args.model_uri)
    model = load_local(folder) if folder is not None else None
    if model is not None:
        return model, (ChatError,)
    from .caption import load_registered, mlflow_refusal

    return load_registered(uri, args.model_uri), (ChatError, mlflow_refusal())


class ChatSession:
    """One model to talk to: ``reply(messages, on_text)`` answers a conversation, streaming when it can."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.refusals: tuple[type[Exception], ...] = ()
        self.params: dict = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
        if args.model_uri:
            self.model, self.refusals = load_chat_model(args)
            if args.temperature is not None:
                logged = getattr(getattr(self.model, "predictor", None), "generation", None)
                if not (logged or {}).get("do_sample"):
                    raise SystemExit(f"error: {args.model_uri} was registered with greedy decoding (do_sample: false, "
                                     "chosen on dev answers): --temperature needs a model registered with sampling "
                                     "or --method")
                self.params.update(temperature=args.temperature)
        else:
            from .llm.adapters import load_finetuned

            adapter_dir = Path(args.adapters_dir) / args.method
            if not adapter_dir.is_dir():
                available = sorted(p.name for p in Path(args.adapters_dir).glob("*")
                                   if p.is_dir() and not p.name.startswith("."))
                raise SystemExit(f"error: no saved method {args.method!r} in {args.adapters_dir} (found: {available})")
            self.model, self.tokenizer = load_finetuned(adapter_dir)
            self.settings = {**LOCAL_GENERATION, **self.params}
            if args.temperature is not None:
                self.settings.update(do_sample=True, temperature=args.temperature,
                                     seed=0 if args.seed is None else args.seed)

    def reply(self, messages: list[dict[str, str]], on_text=None) -> str:
        """The answer to ``messages``; ``on_text`` gets it piece by piece where the model streams (a model loaded
        through MLflow answers whole: ``on_text`` then gets the whole answer)."""
        if not self.args.model_uri:
            from .llm.generation import generate_answers

            return generate_answers(self.model, self.tokenizer, [messages], self.settings, on_text=on_text)[0]
        if on_text is not None and hasattr(self.model, "stream"):
            return self.model.stream(messages, on_text, params=self.params or None)
        reply = self.model.predict([messages], params=self.params or None)[0]
        if on_text is not None:
            on_text(reply)
        return reply


def _printer(stream, shown: list[str] | None = None):
    """An ``on_text`` that prints each piece as it comes (and keeps it in ``shown``, to know whether anything was)."""
    def on_text(piece: str) -> None:
        if shown is not None:
            shown.append(piece)
        stream.write(piece)
        stream.flush()
    return on_text


def fit_history(history: list[dict[str, str]], max_messages: int) -> list[dict[str, str]]:
    """The last turns of ``history`` that fit ``max_messages`` messages, starting with a user message."""
    kept = history[-max_messages:]
    while kept and kept[0]["role"] != "user":
        kept = kept[1:]
    return kept


def converse(session: ChatSession, read=input, out=sys.stdout) -> int:
    """The interactive conversation: each answer streamed, the history kept (as much as the model's request limits
    take), ``/reset`` to start over, Ctrl-D (end of input) to leave. A refused message is reported and dropped."""
    limits = getattr(getattr(session.model, "predictor", None), "limits", None)
    max_messages = int(getattr(limits, "max_messages", 32))
    history: list[dict[str, str]] = []
    out.write("Persian chat: type a message; /reset starts over, Ctrl-D leaves.\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            return 130
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history.clear()
            out.write("(conversation cleared)\n")
            continue
        asked = fit_history(history + [{"role": "user", "content": text}], max_messages)
        out.write("model> ")
        out.flush()
        shown: list[str] = []
        try:
            reply = session.reply(asked, on_text=_printer(out, shown))
        except session.refusals as error:  # reported; the conversation goes on without that message
            out.write(("\n" if shown else "") + f"error: {error.message}\n")
            continue
        out.write("\n")
        history = asked + [{"role": "assistant", "content": reply}]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.message is not None and not args.message.strip():
        raise SystemExit("error: the message is empty")
    if args.seed is not None and args.temperature is None:
        raise SystemExit("error: --seed seeds sampling: give --temperature too")
    logging.basicConfig(level=logging.WARNING)
    # the answer is the output: no weight-loading or artifact-download bars around it
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    session = ChatSession(args)
    if args.message is None:
        return converse(session)
    printed: list[str] = []
    try:  # the decoding the model was registered with (chosen on dev answers); a request changes the length only
        reply = session.reply([{"role": "user", "content": args.message}],
                              on_text=None if args.no_stream else _printer(sys.stdout, printed))
    except session.refusals as error:  # a request the model refuses: its one-line reason
        if printed:
            print()
        raise SystemExit(f"error: {error.message}") from None
    print() if not args.no_stream else print(reply)
    return 0


if __name__ == "__main__":
    sys.exit(main())
