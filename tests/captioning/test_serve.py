"""Serve the registered captioner with ``mlflow models serve`` and caption a real image over HTTP."""

import base64
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import pytest

from caption_fixtures import tiny_captioner, one_torch_thread  # noqa: F401
from llm_caption.captioning.pyfunc import log_captioner
from llm_caption.registry import register_and_promote
from servers import free_port, stop_group, wait_for_http

pytestmark = pytest.mark.slow


def _post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def test_mlflow_models_serve_captions_an_image(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    try:
        cap = tiny_captioner(tmp_path / "data")
        with mlflow.start_run():
            model_uri = log_captioner(cap["decoder"], cap["config"], cap["vocab"], cap["encoder_weights"])
        decision = register_and_promote(model_uri, "image-captioner", "val_bleu4", 0.5, True, "split-a")
        assert decision.promoted
    finally:
        mlflow.set_tracking_uri(None)

    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # mlflow runs `uvicorn` from PATH, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri,
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    mlflow_bin = str(Path(bin_dir) / "mlflow")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([mlflow_bin, "models", "serve", "-m", "models:/image-captioner@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, tmp_path / "serve.log", timeout_s=180)
        image = base64.b64encode(Path(cap["image_paths"][0]).read_bytes()).decode()
        url = f"http://127.0.0.1:{port}/invocations"
        reply = _post(url, {"dataframe_split": {"columns": ["image"], "data": [[image], ["%%% not an image"]]}})
        rows = reply["predictions"]
        assert rows[0]["caption"].strip() and rows[0]["error"] == ""
        assert rows[1]["caption"] == "" and "row 1" in rows[1]["error"]
        # the server survived the bad row
        again = _post(url, {"dataframe_split": {"columns": ["image"], "data": [[image]]}})
        assert again["predictions"][0]["caption"] == rows[0]["caption"]
    finally:
        stop_group(proc)
        log.close()
