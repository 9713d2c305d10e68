"""The registry CLI: listing and guarded promotion of the ``champion`` alias on a real MLflow sqlite store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO_ROOT
from llm_caption.registry import CHAMPION, RegistryError, current_champion, main, promote


def _add_version(client: MlflowClient, tmp_path, name: str, metric: str, value: float, greater: bool,
                 split: str = "split-a") -> str:
    """A real model version (artifact folder + run) tagged as register_and_promote tags it."""
    experiment = mlflow.set_experiment("registry_test")
    run = client.create_run(experiment.experiment_id)
    source = tmp_path / f"{name}-{run.info.run_id}"
    source.mkdir()
    (source / "MLmodel").write_text("flavors: {}\n")
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(name, str(source), run_id=run.info.run_id).version
    for key, val in {"metric_name": metric, "metric_value": repr(value),
                     "greater_is_better": str(greater).lower(), "eval_split": split}.items():
        client.set_model_version_tag(name, version, key, val)
    return str(version)


@pytest.fixture
def store(empty_store, tmp_path, monkeypatch):
    shutil.copy2(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    caption = [_add_version(client, tmp_path, "image-captioner", "val_bleu4", v, True) for v in (0.10, 0.08, 0.12)]
    chat = [_add_version(client, tmp_path, "persian-chat-adapter", "eval_loss", v, False) for v in (2.0, 1.5)]
    client.set_registered_model_alias("image-captioner", CHAMPION, caption[0])
    client.set_registered_model_alias("persian-chat-adapter", CHAMPION, chat[0])
    return uri, client


def test_promote_moves_alias_only_when_at_least_as_good(store, capsys):
    uri, client = store
    # v2 (0.08) is worse than the champion v1 (0.10, higher is better): refused, alias stays
    with pytest.raises(RegistryError, match="worse"):
        promote("image-captioner", "2", client=client)
    assert str(current_champion("image-captioner", client).version) == "1"
    # v3 (0.12) is better: moves
    assert promote("image-captioner", "3", client=client).promoted
    assert str(current_champion("image-captioner", client).version) == "3"
    # lower is better for the chat adapter: v2 (1.5) beats v1 (2.0)
    assert main(["--tracking-uri", uri, "promote", "persian-chat-adapter", "--version", "2"]) == 0
    assert str(current_champion("persian-chat-adapter", client).version) == "2"
    # going back to the worse v1 needs --force, which is recorded on the version
    assert main(["--tracking-uri", uri, "promote", "persian-chat-adapter", "--version", "1"]) == 2
    assert "Use --force" in capsys.readouterr().err
    assert main(["--tracking-uri", uri, "promote", "persian-chat-adapter", "--version", "1", "--force"]) == 0
    assert str(current_champion("persian-chat-adapter", client).version) == "1"
    assert "forced_promotion" in client.get_model_version("persian-chat-adapter", "1").tags


def test_promote_refuses_incomparable_split_and_unknown_names(store, tmp_path, capsys):
    uri, client = store
    other = _add_version(client, tmp_path, "image-captioner", "val_bleu4", 0.5, True, split="split-b")
    with pytest.raises(RegistryError, match="not comparable"):
        promote("image-captioner", other, client=client)
    assert main(["--tracking-uri", uri, "promote", "no-such-model", "--version", "1"]) == 2
    assert "Unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["--tracking-uri", uri, "promote", "image-captioner", "--version", "99"]) == 2
    assert "has no version 99; versions: [1, 2, 3, 4]" in capsys.readouterr().err


def test_list_cli_shows_versions_aliases_and_metric(store):
    uri, _ = store
    out = subprocess.run([sys.executable, "-m", "llm_caption.registry", "list"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "image-captioner  (aliases: champion -> v1)" in lines
    assert "persian-chat-adapter  (aliases: champion -> v1)" in lines
    assert any(line.startswith("  v1 [champion]  val_bleu4=0.1000 (higher is better)") for line in lines)
    assert any(line.startswith("  v2  eval_loss=1.5000 (lower is better)") for line in lines)
