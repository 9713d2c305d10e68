"""The champion alias rule on a real sqlite MLflow store, and the chat command on the registered model."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from llm_caption.llm.adapters import save_finetuned
from llm_caption.llm.experiment import method_settings
from llm_caption.llm.methods import MethodContext, build_method
from llm_caption.llm.registration import register_adapter
from llm_fixtures import base_model, finetuning_cfg, model_spec, tokenizer  # noqa: F401 (fixtures)

MODEL = "persian-chat-adapter"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("registry-test")
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)


@pytest.fixture
def saved_lora(base_model, tokenizer, model_spec, finetuning_cfg, tmp_path) -> Path:
    method_cfg, _ = method_settings(finetuning_cfg, "lora")
    model = build_method(copy.deepcopy(base_model), method_cfg, MethodContext(tokenizer=tokenizer))
    return save_finetuned(model, tmp_path / "adapters" / "lora", "lora", method_cfg, model_spec)


def _champion_version() -> str:
    return str(MlflowClient().get_model_version_by_alias(MODEL, "champion").version)


def _chat(tracking_uri: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "llm_caption.chat", "--tracking-uri", tracking_uri, "--threads", "1",
                           *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_alias_moves_only_to_a_better_version_and_chat_answers_from_the_champion(tracking, saved_lora):
    first = register_adapter(str(saved_lora), "lora", 2.0, "split-a", MODEL)
    assert first["promoted"] and _champion_version() == first["version"] == "1"

    worse = register_adapter(str(saved_lora), "lora", 2.5, "split-a", MODEL)
    assert not worse["promoted"] and "not better" in worse["reason"]
    assert _champion_version() == "1"

    better = register_adapter(str(saved_lora), "lora", 1.5, "split-a", MODEL)
    assert better["promoted"] and _champion_version() == better["version"] == "3"
    version = MlflowClient().get_model_version(MODEL, "3")
    assert version.tags["metric_name"] == "eval_loss" and float(version.tags["metric_value"]) == 1.5

    reply = _chat(tracking, "--model-uri", f"models:/{MODEL}@champion", "--max-new-tokens", "6", "سلام، حالت چطوره؟")
    assert reply.returncode == 0, reply.stderr[-2000:]
    assert reply.stdout.strip()


def test_chat_fails_clearly_on_a_missing_model_or_method(tracking, tmp_path):
    missing = _chat(tracking, "--model-uri", "models:/no-such-model@champion", "سلام")
    assert missing.returncode != 0
    assert "models:/no-such-model@champion" in missing.stderr and "does not exist" in missing.stderr
    no_method = _chat(tracking, "--method", "lora", "--adapters-dir", str(tmp_path / "nothing"), "سلام")
    assert no_method.returncode != 0 and "no saved method 'lora'" in no_method.stderr


def test_best_method_skips_nan_losses_and_falls_back_when_all_are_nan():
    import pandas as pd

    from llm_caption.llm.registration import best_method

    results = pd.DataFrame({"method": ["base", "prompt_tuning", "lora", "dora"],
                            "adapter_dir": ["", "a/prompt_tuning", "a/lora", "a/dora"],
                            "eval_loss": [3.0, float("nan"), 2.5, 2.7]})
    assert best_method(results, "eval_loss")["method"] == "lora"
    diverged = results.assign(eval_loss=[3.0, float("nan"), float("nan"), None])
    assert best_method(diverged, "eval_loss")["method"] == "prompt_tuning"  # registered, but never champion
    # The default ranks by bits per character, which compares models with different tokenizers.
    ranked = results.assign(bits_per_char=[2.0, 1.9, 1.95, 1.7])
    assert best_method(ranked)["method"] == "dora"
    with pytest.raises(ValueError, match="no 'bits_per_char' column"):
        best_method(results)


@pytest.mark.slow
def test_a_nan_eval_loss_never_becomes_or_blocks_the_champion_and_an_unknown_run_is_not_fatal(tracking, saved_lora):
    diverged = register_adapter(str(saved_lora), "lora", float("nan"), "split-a", MODEL)
    assert not diverged["promoted"] and "not a finite number" in diverged["reason"]
    assert MlflowClient().get_registered_model(MODEL).aliases == {}
    assert MlflowClient().get_model_version(MODEL, diverged["version"]).tags["metric_value"] == "nan"

    # A result reused from a run recorded in another store: its run id is unknown here, so the model is
    # logged in a run of its own instead of the registration failing.
    missing_run = "0123456789abcdef0123456789abcdef"
    trained = register_adapter(str(saved_lora), "lora", 2.0, "split-a", MODEL, run_id=missing_run)
    assert trained["promoted"] and _champion_version() == trained["version"]
    assert MlflowClient().get_model_version(MODEL, trained["version"]).run_id not in ("", None, missing_run)
