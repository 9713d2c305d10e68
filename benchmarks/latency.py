"""Latency a user feels: cold command-line calls and the served captioner.

    python -m benchmarks.latency [--chat-store sqlite:///mlruns/mlflow.db] [--reps 3] [--serve]

* a temporary MLflow store gets a captioner registered as ``image-captioner@champion`` (the configured
  Show-Attend-and-Tell sizes, the packaged EfficientNet-lite0 encoder, a vocabulary of Flickr8k captions;
  its weights are not trained: latency does not depend on them);
* ``python -m llm_caption.caption IMG`` and ``python -m llm_caption.chat "..."`` are timed as fresh processes
  (wall time, ``reps`` each); the chat command uses ``persian-chat-adapter@champion`` of ``--chat-store``
  (opened read-only: nothing is written to it);
* ``--serve``: ``mlflow models serve --env-manager local`` on the captioner, then p50/p95 of single-image
  requests and images/s of one 32-image request;
* ``make bench`` (:func:`run`): ``python -c "import torch"`` as the yardstick of a cold process, the caption
  command, the chat command on the Gemma champion (64 new tokens: the wall time of the whole call and when its
  first streamed piece of answer is printed), the served captioner and the served chat model (p50/p95 of a
  64-token answer, 20 requests after one to warm up).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from collections.abc import Iterator
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


CHAT_MODEL_URI = "models:/persian-chat-adapter@champion"
CHAT_QUESTION = "یک شعر کوتاه درباره دانشگاه تهران بنویس"


def prepare_captioner_store(root: Path) -> tuple[str, list[Path]]:
    """A sqlite store under ``root`` with ``image-captioner@champion``; its URI and a few Flickr8k images."""
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from llm_caption.captioning.encoder import build_encoder
    from llm_caption.captioning.models import build_decoder
    from llm_caption.captioning.pyfunc import log_captioner
    from llm_caption.captioning.transforms import make_transform_spec

    from .caption import _params, _vocab_and_tokens, image_captions

    params = _params()
    cfg = params["caption"]
    paths, captions, _ = image_captions(40, 7)
    vocab, _, _ = _vocab_and_tokens(captions, 20)
    decoder_cfg = {k: v for k, v in cfg["decoders"]["show_attend_tell"].items() if k != "training"}
    encoder, weights = build_encoder(cfg["encoder"])
    torch.manual_seed(0)
    decoder = build_decoder("show_attend_tell", len(vocab), encoder.out_channels, **decoder_cfg).eval()
    config = {"architecture": "show_attend_tell", "decoder": decoder_cfg, "encoder": dict(cfg["encoder"]),
              "transform_spec": make_transform_spec(params["data"].get("image_transform")),
              "decoding": dict(cfg["decoding"]), "serving": dict(cfg.get("serving") or {})}
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("latency", artifact_location=str(root / "artifacts")))
    with mlflow.start_run():
        model_uri = log_captioner(decoder, config, vocab.to_dict(), weights)
    version = mlflow.register_model(model_uri, "image-captioner")
    MlflowClient(uri).set_registered_model_alias("image-captioner", "champion", version.version)
    return uri, paths[:32]


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds (user + system) of the process, its output)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({run.returncode}): {run.stderr[-1500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu, run.stdout.strip()


def cli_latency(store: str, image: Path, chat_store: str | None, reps: int,
                sources: dict[str, str | None]) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds of each command, per code version (``sources``: label -> a ``src`` folder to put
    first on ``PYTHONPATH``, e.g. an export of an earlier commit; None: the installed project), alternating."""
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "KEDRO_DISABLE_TELEMETRY": "true"}
    base_env.pop("MLFLOW_TRACKING_URI", None)
    commands = {"caption": [PYTHON, "-m", "llm_caption.caption", str(image), "--tracking-uri", store]}
    if chat_store:
        commands["chat"] = [PYTHON, "-m", "llm_caption.chat", "--model-uri", CHAT_MODEL_URI, "--tracking-uri",
                            chat_store, "--max-new-tokens", "64", CHAT_QUESTION]
    out: dict[str, dict[str, list[float]]] = {}
    labels = list(sources)
    for rep in range(reps):
        for label in labels if rep % 2 == 0 else labels[::-1]:
            env = dict(base_env)
            if sources[label]:
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [sources[label], env.get("PYTHONPATH")]))
            for name, cmd in commands.items():
                wall, cpu, text = timed(cmd, ROOT, env)
                figures = out.setdefault(f"{name} ({label})", {"wall_s": [], "cpu_s": []})
                figures["wall_s"].append(wall)
                figures["cpu_s"].append(cpu)
                print(f"{name} ({label}): {wall:.2f} s wall, {cpu:.2f} s CPU: {text[:100]}", flush=True)
    return out


def first_output(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """(seconds to the first byte the process prints, wall seconds of the whole process, its output)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(1)
    first_s = time.perf_counter() - start
    rest = proc.stdout.read()
    err = proc.stderr.read()
    proc.wait(timeout=900)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}): {err.decode(errors='replace')[-1500:]}")
    return first_s, wall, (first + rest).decode(errors="replace").strip()


def chat_champion(store: str) -> str | None:
    """The folder of ``persian-chat-adapter@champion`` in the local sqlite ``store``, else None."""
    from llm_caption.caption import local_registered_model

    return local_registered_model(store, CHAT_MODEL_URI)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, images: list[str]) -> tuple[float, dict]:
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        payload = json.loads(response.read())
    return time.perf_counter() - start, payload


@contextlib.contextmanager
def served(model_uri: str, store: str, log: Path, extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    """``mlflow models serve --env-manager local`` of ``model_uri`` in ``store`` on a free port, up (``/ping``
    answers); yields its ``/invocations`` URL and stops the server's process group afterwards."""
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           # the server runs `uvicorn` by name: the environment's scripts must be on PATH
           "PATH": os.pathsep.join([str(Path(PYTHON).parent), os.environ.get("PATH", "")])}
    handle = open(log, "wb")
    server = subprocess.Popen([PYTHON, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                               "-p", str(port), "-h", "127.0.0.1", *extra_args], env=env, stdout=handle,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ping(port, server, log)
        yield f"http://127.0.0.1:{port}/invocations"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
        handle.close()


def serve_latency(store: str, images: list[Path], log: Path, singles: int = 20) -> dict[str, float]:
    with served("models:/image-captioner@champion", store, log) as url:
        encoded = [base64.b64encode(p.read_bytes()).decode("ascii") for p in images]
        _post(url, encoded[:1])  # the first request warms the model up
        singles_s = [_post(url, [encoded[i % len(encoded)]])[0] for i in range(singles)]
        batch_s, payload = _post(url, encoded[:32])
    assert len(payload["predictions"]) == min(32, len(encoded))
    quantiles = statistics.quantiles(singles_s, n=20)
    return {"p50_ms": 1000 * statistics.median(singles_s), "p95_ms": 1000 * quantiles[18],
            "batch32_images_per_s": min(32, len(encoded)) / batch_s}


def serve_chat_latency(store: str, log: Path, requests: int = 20, max_new_tokens: int = 64) -> dict[str, float]:
    """``mlflow models serve`` of the chat champion: p50/p95 seconds of one question answered with up to
    ``max_new_tokens`` tokens, ``requests`` requests after one to warm up; the mean answer length in characters."""
    body = json.dumps({"inputs": [CHAT_QUESTION], "params": {"max_new_tokens": max_new_tokens}}).encode()
    with served(CHAT_MODEL_URI, store, log, ("-w", "1")) as url:
        def ask() -> tuple[float, str]:
            request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            start = time.perf_counter()
            with urllib.request.urlopen(request, timeout=600) as response:
                answer = json.loads(response.read())["predictions"][0]
            return time.perf_counter() - start, answer

        ask()
        timed_answers = [ask() for _ in range(requests)]
    seconds = [t for t, _ in timed_answers]
    return {"p50_s": statistics.median(seconds), "p95_s": statistics.quantiles(seconds, n=20)[18],
            "answer_chars": statistics.mean(len(a) for _, a in timed_answers)}


def _wait_ping(port: int, server: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).read()
            return
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"mlflow models serve did not start (exit {server.poll()}): {tail}")
            time.sleep(0.5)


def run(chat_store: str | None, reps: int = 3, serve: bool = True, serve_requests: int = 20) -> dict[str, Any]:
    """The latency figures of ``make bench``: cold commands (``reps`` each, alternating) and served models."""
    from .common import Series

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "KEDRO_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    has_chat = bool(chat_store) and chat_champion(chat_store) is not None
    out: dict[str, Any] = {"chat_store": chat_store, "has_chat": has_chat,
                           "figures": {k: Series() for k in ("torch_s", "caption_s", "chat_s", "chat_first_s")}}
    figures = out["figures"]
    with tempfile.TemporaryDirectory(prefix="llm_caption_latency_") as tmp:
        store, images = prepare_captioner_store(Path(tmp))
        for _ in range(reps):
            figures["torch_s"].add(timed([PYTHON, "-c", "import torch"], ROOT, env)[0])
            figures["caption_s"].add(timed([PYTHON, "-m", "llm_caption.caption", str(images[0]), "--tracking-uri",
                                            store], ROOT, env)[0])
            if has_chat:
                first, wall, answer = first_output(
                    [PYTHON, "-m", "llm_caption.chat", "--model-uri", CHAT_MODEL_URI, "--tracking-uri", chat_store,
                     "--max-new-tokens", "64", CHAT_QUESTION], ROOT, env)
                figures["chat_first_s"].add(first)
                figures["chat_s"].add(wall)
                out["chat_answer"] = answer
            print(f"latency: torch {figures['torch_s'].values[-1]:.2f} s, caption {figures['caption_s'].values[-1]:.2f} s"
                  + (f", chat {figures['chat_s'].values[-1]:.2f} s (first piece {figures['chat_first_s'].values[-1]:.2f} s)"
                     if has_chat else ""), flush=True)
        if serve:
            out["serve_caption"] = serve_latency(store, images, Path(tmp) / "serve.log", singles=serve_requests)
            if has_chat:
                out["serve_chat"] = serve_chat_latency(chat_store, Path(tmp) / "serve_chat.log", serve_requests)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.splitlines()[0])
    parser.add_argument("--chat-store", default=f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}",
                        help="store holding persian-chat-adapter@champion ('' skips the chat command)")
    parser.add_argument("--reps", type=int, default=3, help="command-line repetitions (0: serving only)")
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument("--before-src", default=None,
                        help="a src folder of an earlier version (e.g. `git archive REV src | tar -x -C DIR`): "
                             "timed alternately with the current one")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="llm_caption_latency_") as tmp:
        store, images = prepare_captioner_store(Path(tmp))
        sources = {"current": None, **({"before": args.before_src} if args.before_src else {})}
        figures: dict = {"cli": cli_latency(store, images[0], args.chat_store or None, args.reps, sources)}
        if args.out:
            Path(args.out).write_text(json.dumps(figures, indent=1), encoding="utf-8")
        if args.serve:
            figures["serve"] = serve_latency(store, images, Path(tmp) / "serve.log")
    summary = {k: {f: f"median {statistics.median(v):.2f} s of {[round(x, 2) for x in v]}" for f, v in d.items()}
               for k, d in figures["cli"].items()}
    print(json.dumps({"cli": summary, "serve": figures.get("serve")}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
