"""The chat pyfunc refuses what it must (huge max_new_tokens, client sampling, malformed input) with one line,
in process and through a real ``mlflow models serve``; the chat command answers what the model answers."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from llm_caption.llm.adapters import save_finetuned
from llm_caption.llm.experiment import method_settings
from llm_caption.llm.methods import MethodContext, build_method
from llm_caption.llm.pyfunc import ChatLimits, log_chat_model
from llm_fixtures import base_model, finetuning_cfg, model_spec, tokenizer  # noqa: F401 (fixtures)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from servers import free_port, stop_group, wait_for_http  # noqa: E402
from conftest import start_run_in_current_store

GENERATION = {"max_new_tokens": 6, "do_sample": False, "repetition_penalty": 1.2}
LIMITS = {"max_conversations": 2, "max_new_tokens": 16}
QUESTION = "سلام، حالت چطوره؟"


@pytest.fixture
def logged(base_model, tokenizer, model_spec, finetuning_cfg, tmp_path, monkeypatch):
    """A LoRA adapter logged as the chat pyfunc in a temporary store, and the model loaded back."""
    method_cfg, _ = method_settings(finetuning_cfg, "lora")
    model = build_method(copy.deepcopy(base_model), method_cfg, MethodContext(tokenizer=tokenizer))
    adapter = save_finetuned(model, tmp_path / "adapters" / "lora", "lora", method_cfg, model_spec)
    monkeypatch.chdir(tmp_path)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking)
    try:
        with start_run_in_current_store():
            info = log_chat_model(adapter, GENERATION, pip_requirements=["mlflow"], limits=LIMITS)
        loaded = mlflow.pyfunc.load_model(info.model_uri)
    finally:
        mlflow.set_tracking_uri(previous)
    return {"uri": info.model_uri, "tracking": tracking, "model": loaded, "root": tmp_path}


def _refused(call) -> str:
    with pytest.raises(MlflowException) as error:
        call()
    message = error.value.message
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.mark.slow
def test_chat_requests_are_checked_in_process_and_served(logged):
    model = logged["model"]
    python_model = model.unwrap_python_model()
    reply = model.predict([QUESTION])
    assert len(reply) == 1 and isinstance(reply[0], str) and reply[0].strip()

    # generation parameters: capped, ranged, sampling fixed, nothing else
    assert "max_new_tokens must be an integer from 1 to 16, got 1000000000" in _refused(
        lambda: model.predict([QUESTION], params={"max_new_tokens": 10**9}))
    assert "do_sample: this model's decoding is fixed (do_sample=false), got True" in _refused(
        lambda: model.predict([QUESTION], params={"do_sample": True}))
    assert "repetition_penalty must be a number from 1 to 2" in _refused(
        lambda: model.predict([QUESTION], params={"repetition_penalty": 50.0}))
    assert "unknown parameter 'num_beams'" in _refused(
        lambda: python_model.predict(None, [QUESTION], params={"num_beams": 64}))

    # malformed inputs: one line naming the input
    assert _refused(lambda: model.predict([5])).startswith("input 0: expected a message string or a conversation")
    assert _refused(lambda: model.predict([None])).endswith("got None")
    assert "empty input" in _refused(lambda: model.predict([]))
    assert "needs a 'messages' or 'prompt' column, has ['text']" in _refused(
        lambda: model.predict(pd.DataFrame({"text": [QUESTION]})))
    assert "the request has 3 conversations; at most 2 per request" in _refused(
        lambda: model.predict([QUESTION] * 3))
    assert "input 0 message 0: role must be one of" in _refused(
        lambda: model.predict([[{"role": "root", "content": QUESTION}]]))
    assert "input 1: the message is empty" in _refused(lambda: model.predict([QUESTION, "  "]))

    # the chat command answers what the model answers, and passes its refusals on in one line
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "llm_caption.chat", "--tracking-uri", logged["tracking"], "--threads", "1",
               "--model-uri", logged["uri"]]
    cli = subprocess.run([*command, "--max-new-tokens", "6", QUESTION], capture_output=True, text=True, env=env,
                         timeout=300, cwd=logged["root"])
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert cli.stdout.strip() == reply[0]
    too_long = subprocess.run([*command, "--max-new-tokens", "100000", QUESTION], capture_output=True, text=True,
                              env=env, timeout=300, cwd=logged["root"])
    assert too_long.returncode != 0
    assert too_long.stderr.strip().splitlines()[-1] == ("error: max_new_tokens must be an integer from 1 to 16, "
                                                         "got 100000")

    # the same through mlflow models serve: HTTP 400 with one line, no stack trace; the server keeps answering
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    serve_env = {**env, "MLFLOW_TRACKING_URI": logged["tracking"], "PATH": bin_dir + os.pathsep + env.get("PATH", "")}
    log = open(logged["root"] / "serve.log", "w")
    proc = subprocess.Popen([str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", logged["uri"], "--env-manager",
                             "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env=serve_env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=logged["root"])
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, logged["root"] / "serve.log", timeout_s=240)
        url = f"http://127.0.0.1:{port}/invocations"
        for payload, expected in [
            ({"inputs": [5]}, "input 0: expected a message string or a conversation"),
            ({"inputs": [None]}, "got None"),
            ({"inputs": [QUESTION], "params": {"max_new_tokens": 10**9}}, "max_new_tokens must be an integer"),
            ({"inputs": [QUESTION], "params": {"do_sample": True}}, "do_sample: this model's decoding is fixed"),
            ({"dataframe_split": {"columns": ["text"], "data": [[QUESTION]]}}, "needs a 'messages' or 'prompt'"),
        ]:
            status, body = _post(url, payload)
            assert status == 400, (payload, body)
            assert expected in body["message"] and "stack_trace" not in body, body
            assert "Traceback" not in json.dumps(body)
            assert body["message"].splitlines()[-1].startswith("Error: "), body  # MLflow's prefix + our one line
        status, body = _post(url, {"inputs": [QUESTION]})
        assert status == 200 and body["predictions"] == reply
    finally:
        stop_group(proc)
        log.close()


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_chat_limits_are_validated():
    assert ChatLimits.from_config(None) == ChatLimits()
    with pytest.raises(ValueError, match="unknown keys \\['max_tokens'\\]"):
        ChatLimits.from_config({"max_tokens": 5})
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        ChatLimits.from_config({"max_new_tokens": 0})
