"""Serve the registered captioner with ``mlflow models serve`` and caption a real image over HTTP."""

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest

from caption_fixtures import tiny_captioner
from test_untrusted_requests import bomb_png
from llm_caption.captioning.pyfunc import log_captioner
from llm_caption.registry import register_and_promote
from servers import free_port, stop_group, wait_for_http
from conftest import start_run_in_current_store

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def _post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _post_refused(url: str, payload: dict) -> tuple[int, dict]:
    """Status and JSON body of a request the server refuses."""
    try:
        _post(url, payload)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    raise AssertionError("the request was accepted")


def _rows(*values) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}}


def test_mlflow_models_serve_captions_an_image(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    try:
        cap = tiny_captioner(tmp_path / "data")
        with start_run_in_current_store():
            model_uri = log_captioner(cap["decoder"], cap["config"], cap["vocab"], cap["encoder_weights"],
                                      serving={"max_rows": 3})
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

        # a path on the server is never opened, and the answer does not tell whether it exists
        existing = cap["image_paths"][0]
        missing = existing[:-5] + "X.jpg"
        paths = _post(url, _rows(existing, missing))["predictions"]
        assert paths[0]["caption"] == paths[1]["caption"] == ""
        assert paths[0]["error"].removeprefix("row 0: ") == paths[1]["error"].removeprefix("row 1: ")
        # a decompression bomb is that row's error; the good row is still captioned
        bomb = _post(url, _rows(base64.b64encode(bomb_png()).decode(), image))["predictions"]
        assert bomb[0]["caption"] == "" and "12000x12000 (144.0 MP): over the 40 MP limit" in bomb[0]["error"]
        assert bomb[1]["caption"] == rows[0]["caption"]
        # too many rows, or no image column: refused with a one-line reason, no traceback
        status, body = _post_refused(url, _rows(image, image, image, image))
        assert status == 400 and "the request has 4 rows; this model takes at most 3 per request" in body["message"]
        assert "Traceback" not in json.dumps(body) and "stack_trace" not in body
        status, body = _post_refused(url, {"dataframe_split": {"columns": ["path"], "data": [[existing]]}})
        assert status == 400 and "Traceback" not in json.dumps(body) and "stack_trace" not in body
        assert _post(url, _rows(image))["predictions"][0]["caption"] == rows[0]["caption"]
    finally:
        stop_group(proc)
        log.close()
