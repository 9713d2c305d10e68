"""A local web page to try both studies' registered models: ``python -m llm_caption.demo``.

    python -m llm_caption.demo                       # http://127.0.0.1:7860, the store `kedro run` uses
    python -m llm_caption.demo --env smoke --port 7861
    python -m llm_caption.demo --chat-model persian-chat-quickstart

Everything it shows comes from the MLflow registry (the store rules of the command-line tools: ``--tracking-uri``,
else ``$MLFLOW_TRACKING_URI``, else the environment's ``mlflow.yml``):

* **Captions**: drop a photo and read the caption of every registered ``image-captioner`` version that holds an
  alias or is the newest of its architecture (the champion marked), with the per-word attention heatmaps of the
  first soft-attention (``show_attend_tell``) model among them.
* **Persian chat**: the champion of ``persian-chat-adapter`` (the Persian study's release model) answers, streamed
  as it is generated; *Compare methods* sends one prompt to every method of the study that produced the champion
  (their adapters from that study's MLflow runs, in fp32 through ``transformers``: the champion's row may differ
  from the chat's answer, which its merged weights give in bf16) and shows the answers side by side with each
  method's bits per character and chrF++.

Uploads and prompts are untrusted: an image goes through the served captioner's checks (bytes, pixels and formats
of the champion's ``serving`` limits, checked before any pixel is decoded), a prompt through the chat model's own
request limits (characters, messages, new tokens); a bad one gets a one-line message on the page, never a
traceback. The page is up before the models: they load in a background thread (the captioners first), and a
request waits for them.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

logger = logging.getLogger("llm_caption.demo")

CAPTION_MODEL = "image-captioner"
CHAT_MODEL = "persian-chat-adapter"
LOAD_WAIT_S = 600.0
EXAMPLE_PROMPT = "یک شعر کوتاه درباره دانشگاه تهران بنویس"


class DemoError(Exception):
    """A request the page refuses or cannot answer: its one-line ``message`` is shown."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Backend:
    """The models behind the page, loaded in the background from the registry of ``store_uri``."""

    def __init__(self, store_uri: str, caption_model: str = CAPTION_MODEL, chat_model: str = CHAT_MODEL,
                 chat_alias: str = "champion", work_dir: str | Path | None = None) -> None:
        self.store_uri = store_uri
        self.caption_model = caption_model
        self.chat_model = chat_model
        self.chat_alias = chat_alias
        self.work_dir = Path(work_dir) if work_dir else None
        self.captioners: list[dict[str, Any]] = []
        self.chat = None
        self.chat_error = ""
        self.caption_error = ""
        self.captioners_ready = threading.Event()
        self.chat_ready = threading.Event()
        self._lock = threading.Lock()  # one generation at a time: the CPU is the limit

    # -- loading --------------------------------------------------------------------------------------------
    def start(self) -> "Backend":
        threading.Thread(target=self._load_all, name="demo-loader", daemon=True).start()
        return self

    def _load_all(self) -> None:
        try:
            self._load_captioners()
        except Exception as error:  # noqa: BLE001 - shown on the page instead of killing the loader
            logger.exception("loading the captioners failed")
            self.caption_error = f"the captioners could not be loaded: {_one_line(error)}"
        finally:
            self.captioners_ready.set()
        try:
            self._load_chat()
        except Exception as error:  # noqa: BLE001
            logger.exception("loading the chat model failed")
            self.chat_error = f"the chat model could not be loaded: {_one_line(error)}"
        finally:
            self.chat_ready.set()

    def _registry(self):
        from . import registry

        registry.use_store(self.store_uri)
        return registry

    def _load_captioners(self) -> None:
        from .caption import load_registered

        versions = self._registry().showcase_versions(self.caption_model, "architecture")
        if not versions:
            self.caption_error = (f"no registered {self.caption_model!r} in {self.store_uri}: run "
                                  "`kedro run --pipeline=caption_training` first")
            return
        for version in versions:
            model = load_registered(self.store_uri, version["model_uri"])
            predictor = model.unwrap_python_model()
            self.captioners.append({**version, "predictor": predictor})
            logger.info("captioner %s v%s (%s) loaded", self.caption_model, version["version"], version["group"])

    def _load_chat(self) -> None:
        from .caption import local_registered_model
        from .llm.pyfunc import load_local

        uri = f"models:/{self.chat_model}@{self.chat_alias}"
        folder = local_registered_model(self.store_uri, uri)
        if folder is None:
            from .caption import check_model_uri

            self._registry()
            check_model_uri(uri)
            folder = str(self._registry().download(uri, self._scratch("chat")))
        model = load_local(folder)
        if model is None:
            raise DemoError(f"{uri} is not a chat model of this project")
        self.chat = model
        logger.info("chat model %s loaded", uri)

    def _scratch(self, name: str) -> Path:
        import tempfile

        root = self.work_dir or Path(tempfile.gettempdir()) / "llm_caption_demo"
        path = root / name
        path.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=path))

    def _wait(self, event: threading.Event, what: str) -> None:
        if not event.wait(LOAD_WAIT_S):
            raise DemoError(f"the {what} are still loading; try again in a moment")

    # -- captions -------------------------------------------------------------------------------------------
    @property
    def image_limits(self):
        from .captioning.pyfunc import ServingLimits

        return self.captioners[0]["predictor"].limits if self.captioners else ServingLimits()

    def caption_file(self, path: str | None) -> dict[str, Any]:
        """Captions of the uploaded file at ``path`` by every shown captioner: ``{"rows": [...], "heatmaps":
        [(image, word), ...], "model": label of the heatmaps' model}``; :class:`DemoError` for a bad upload."""
        from .captioning.pyfunc import open_image_bytes

        if not path:
            raise DemoError("no file: drop a photo (JPEG or PNG) on the box")
        self._wait(self.captioners_ready, "captioners")
        if not self.captioners:
            raise DemoError(self.caption_error or "no captioner is registered")
        limits = self.image_limits
        size = Path(path).stat().st_size
        if size > limits.max_image_bytes:
            raise DemoError(f"the file has {size:,} bytes: over the {limits.max_image_bytes:,}-byte limit per image")
        raw = Path(path).read_bytes()
        try:
            image = open_image_bytes(raw, limits)
        except ValueError as error:
            raise DemoError(f"{Path(path).name}: {error}") from None
        rows, heatmaps, heat_model = [], [], ""
        with self._lock:
            for entry in self.captioners:
                caption, words, attention = entry["predictor"].captioner.caption_with_attention(image)
                label = _version_label(self.caption_model, entry)
                rows.append([label, caption])
                if attention is not None and not heatmaps:
                    heatmaps = [(overlay(image, a), w) for w, a in zip(words, attention)]
                    heat_model = label
        return {"rows": rows, "heatmaps": heatmaps, "model": heat_model}

    # -- chat -----------------------------------------------------------------------------------------------
    def stream_reply(self, messages: list[dict[str, str]]) -> Iterator[str]:
        """The champion's answer to ``messages`` as it grows (each item the text so far); :class:`DemoError`
        for a refused request or a model that is not there."""
        from .llm.pyfunc import ChatError

        self._wait(self.chat_ready, "chat model")
        if self.chat is None:
            raise DemoError(self.chat_error or "no chat model")
        pieces: queue.Queue = queue.Queue()
        done = object()
        failure: list[BaseException] = []

        def work() -> None:
            try:
                with self._lock:
                    self.chat.stream(messages, pieces.put)
            except BaseException as error:  # noqa: BLE001 - handed to the page's thread
                failure.append(error)
            finally:
                pieces.put(done)

        threading.Thread(target=work, name="demo-chat", daemon=True).start()
        text = ""
        while (piece := pieces.get()) is not done:
            text += piece
            yield text
        if failure:
            error = failure[0]
            raise DemoError(error.message if isinstance(error, ChatError) else _one_line(error))
        yield text

    def compare_methods(self, prompt: str) -> Iterator[list[list[Any]]]:
        """One row per method of the champion's study (method, bits/char, chrF++, answer), growing as each
        method answers ``prompt``."""
        import copy

        from .llm.adapters import load_finetuned, read_method
        from .llm.generation import generate_answers
        from .llm.models import load_model, load_tokenizer
        from .llm.pyfunc import ChatError, check_conversations, check_generation

        self._wait(self.chat_ready, "chat model")
        if self.chat is None:
            raise DemoError(self.chat_error or "no chat model")
        predictor = self.chat.predictor
        try:
            conversation = check_conversations([prompt], predictor.limits)
            settings = check_generation(predictor.generation, None, predictor.limits)
        except ChatError as error:
            raise DemoError(error.message) from None
        methods = self._registry().study_methods(self.chat_model, self.chat_alias)
        if not methods:
            raise DemoError(f"the study of {self.chat_model}@{self.chat_alias} has no method runs with adapters")
        rows = [[m["method"], _fmt(m["bits_per_char"], 3), _fmt(m["chrf_pp"], 1), "…"] for m in methods]
        yield [list(r) for r in rows]
        base = None
        for i, method in enumerate(methods):
            adapter = self._registry().download(method["adapter_uri"], self._scratch("adapters"))
            with self._lock:
                if base is None:  # the base model's spec travels with every adapter
                    spec = read_method(adapter)["model_spec"]
                    tokenizer, base = load_tokenizer(spec), load_model(spec, quantization={})
                model, _ = load_finetuned(adapter, copy.deepcopy(base), tokenizer)
                rows[i][3] = generate_answers(model, tokenizer, conversation, settings)[0]
                del model
            yield [list(r) for r in rows]


def overlay(image, attention) -> Any:
    """The image with one attention map laid over it (brighter: where the model looked)."""
    import numpy as np
    from PIL import Image

    side = 224
    base = image.convert("RGB").resize((side, side))
    heat = attention.detach().float().numpy()
    heat = (heat - heat.min()) / (float(heat.max() - heat.min()) or 1.0)
    mask = Image.fromarray((heat * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
    red = Image.new("RGB", (side, side), (255, 40, 0))
    return Image.composite(red, base, mask.point(lambda v: int(v * 0.6))).convert("RGB")


def _version_label(name: str, entry: dict[str, Any]) -> str:
    aliases = ", ".join(entry["aliases"])
    champion = " ★ champion" if entry["champion"] else ""
    rest = f" ({aliases})" if aliases and not entry["champion"] else ""
    metric = f", {entry['metric_name']} {entry['metric_value']:.3f}" if entry.get("metric_value") is not None else ""
    return f"{name} v{entry['version']} · {entry['group']}{metric}{champion}{rest}"


def _fmt(value: Any, digits: int) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if value != value else f"{value:.{digits}f}"


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


# -- the page -------------------------------------------------------------------------------------------------
def build_app(backend: Backend):
    """The Gradio page over ``backend``."""
    import gradio as gr

    def on_upload(path):
        try:
            out = backend.caption_file(path)
        except DemoError as error:
            return [], [], f"⚠️ {error.message}"
        note = (f"Attention of {out['model']}: one map per word." if out["heatmaps"]
                else "No soft-attention captioner among these: no heatmaps.")
        return out["rows"], out["heatmaps"], note

    def on_message(message, history):
        history = list(history or [])
        message = (message or "").strip()
        if not message:
            yield history, "⚠️ the message is empty", ""
            return
        history.append({"role": "user", "content": message})
        asked = [{"role": m["role"], "content": _text(m["content"])} for m in history]
        history.append({"role": "assistant", "content": "…"})
        try:
            for text in backend.stream_reply(asked):
                history[-1] = {"role": "assistant", "content": text}
                yield history, "", ""
        except DemoError as error:
            history = history[:-2]
            yield history, f"⚠️ {error.message}", message

    def on_compare(prompt):
        try:
            for rows in backend.compare_methods((prompt or "").strip()):
                yield rows, ""
        except DemoError as error:
            yield [], f"⚠️ {error.message}"

    with gr.Blocks(title="llm_caption demo") as app:
        gr.Markdown("# llm_caption: try the registered models\nEverything here is read from the MLflow registry "
                    f"(`{backend.store_uri}`).")
        with gr.Tab("Captions"):
            with gr.Row():
                upload = gr.File(label="Drop a photo (JPEG or PNG)", file_count="single", type="filepath",
                                 elem_id="caption-upload")
                with gr.Column(scale=2):  # wide enough for the model label and its caption side by side
                    captions = gr.Dataframe(headers=["model", "caption"], label="Captions", interactive=False,
                                            elem_id="captions", wrap=True, column_widths=["40%", "60%"])
                    caption_note = gr.Markdown(elem_id="caption-note")
            heatmaps = gr.Gallery(label="Where the attention model looked, word by word", columns=6, height=260,
                                  elem_id="heatmaps")
            upload.upload(on_upload, upload, [captions, heatmaps, caption_note])
        with gr.Tab("Persian chat"):
            chatbot = gr.Chatbot(label=f"{backend.chat_model}@{backend.chat_alias}", elem_id="chatbot",
                                 rtl=True, height=360)
            message = gr.Textbox(label="Message", placeholder=EXAMPLE_PROMPT, rtl=True, elem_id="chat-input")
            chat_note = gr.Markdown(elem_id="chat-note")
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="chat-send")
                reset = gr.Button("Reset", elem_id="chat-reset")
            send.click(on_message, [message, chatbot], [chatbot, chat_note, message])
            message.submit(on_message, [message, chatbot], [chatbot, chat_note, message])
            reset.click(lambda: ([], ""), None, [chatbot, chat_note])
            with gr.Accordion("Compare methods: one prompt, every method of the champion's study", open=False):
                compare_prompt = gr.Textbox(label="Prompt", value=EXAMPLE_PROMPT, rtl=True, elem_id="compare-input")
                compare = gr.Button("Compare", elem_id="compare-send")
                compare_table = gr.Dataframe(headers=["method", "bits/char", "chrF++", "answer"], wrap=True,
                                             interactive=False, elem_id="compare-table")
                compare_note = gr.Markdown(elem_id="compare-note")
                compare.click(on_compare, compare_prompt, [compare_table, compare_note])
    return app


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # Gradio's structured message content
        return " ".join(_text(c) for c in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llm_caption.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: the one `kedro run` uses)")
    parser.add_argument("--env", default=os.environ.get("KEDRO_ENV"), help="Kedro environment whose store to use")
    parser.add_argument("--caption-model", default=CAPTION_MODEL)
    parser.add_argument("--chat-model", default=CHAT_MODEL,
                        help="persian-chat-adapter (the Persian study) or persian-chat-quickstart (make run)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    from .chat import store_uri

    uri = store_uri(args.tracking_uri, args.env)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    backend = Backend(uri, args.caption_model, args.chat_model).start()
    app = build_app(backend)
    limits = backend.image_limits
    app.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, prevent_thread_lock=True, show_error=False,
        max_file_size=limits.max_image_bytes, quiet=True)
    logger.info("demo page up at http://%s:%d after %.1f s (models load in the background)", args.host, args.port,
                time.perf_counter() - start)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
