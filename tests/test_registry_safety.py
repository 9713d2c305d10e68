"""The champion alias on a real sqlite MLflow store: never moved by a version from another split,
never given to (or blocked by) a NaN or missing metric, and never claimed by two concurrent runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from llm_caption.registry import (
    CHAMPION,
    DECISION_TAG,
    RegistryError,
    current_champion,
    main,
    promote,
    register_and_promote,
    registry_lock,
)

MODEL = "image-captioner"
WORKER = Path(__file__).resolve().parent / "registry_race_worker.py"


@pytest.fixture
def store(empty_store, tmp_path, monkeypatch):
    """A fresh store of this test's own (tracking and registry), and a minimal model folder to register."""
    shutil.copy2(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # both restored when the test ends
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "MLmodel").write_text("flavors: {}\n")
    yield uri, MlflowClient(tracking_uri=uri, registry_uri=uri), str(model_dir)
    mlflow.set_tracking_uri(previous)
    mlflow.set_registry_uri(None)  # the registry follows the tracking store again


def _register(model_dir: str, value, split: str = "split-real"):
    return register_and_promote(model_dir, MODEL, "val_bleu4", value, greater_is_better=True, eval_split=split)


def _champion(client: MlflowClient) -> str | None:
    holder = current_champion(MODEL, client)
    return None if holder is None else str(holder.version)


def test_a_version_from_another_split_never_takes_the_champion(store, caplog, capsys):
    uri, client, model_dir = store
    real = _register(model_dir, 0.20, split="split-real")
    assert real.promoted and _champion(client) == real.version == "1"

    # A smoke-sized run on another split scores far higher: registered and tagged, alias stays.
    with caplog.at_level("WARNING", logger="llm_caption.registry"):
        toy = _register(model_dir, 0.90, split="split-toy")
    assert not toy.promoted and _champion(client) == "1"
    assert "split split-toy" in toy.reason and "split split-real" in toy.reason and "--force" in toy.reason
    tags = client.get_model_version(MODEL, toy.version).tags
    assert tags["eval_split"] == "split-toy" and tags["metric_value"] == "0.9"
    assert tags[DECISION_TAG].startswith("not promoted: measured on split split-toy, champion v1 on split split-real")
    assert any("v2" in r.getMessage() and "unchanged" in r.getMessage() for r in caplog.records
               if r.levelname == "WARNING")

    # `registry list` shows why v2 is not the champion.
    assert main(["--tracking-uri", uri, "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    v2 = lines.index(next(line for line in lines if line.startswith("  v2  val_bleu4=0.9000")))
    assert lines[v2 + 1].startswith("      at registration: not promoted: measured on split split-toy")

    # Only an explicit --force moves the alias across splits, and that is recorded.
    with pytest.raises(RegistryError, match="not comparable"):
        promote(MODEL, toy.version, client=client)
    assert main(["--tracking-uri", uri, "promote", MODEL, "--version", toy.version]) == 2
    assert _champion(client) == "1"
    assert main(["--tracking-uri", uri, "promote", MODEL, "--version", toy.version, "--force"]) == 0
    assert _champion(client) == "2"
    assert "not comparable" in client.get_model_version(MODEL, "2").tags["forced_promotion"]


def test_a_version_judged_on_another_metric_never_takes_the_champion(store):
    _, client, model_dir = store
    assert _register(model_dir, 0.2).promoted
    other = register_and_promote(model_dir, MODEL, "val_bleu1", 0.8, greater_is_better=True, eval_split="split-real")
    assert not other.promoted and "val_bleu1" in other.reason and _champion(client) == "1"


@pytest.mark.parametrize("value", [float("nan"), None, float("inf")])
def test_a_nan_or_missing_metric_never_becomes_champion(store, value):
    _, client, model_dir = store
    first = _register(model_dir, value)
    assert not first.promoted and _champion(client) is None
    assert "not a finite number" in first.reason
    assert client.get_model_version(MODEL, first.version).tags[DECISION_TAG].startswith("not promoted")
    # ...not even by hand without --force
    with pytest.raises(RegistryError, match="no finite metric"):
        promote(MODEL, first.version, client=client)
    # a later version with a real figure takes the alias
    good = _register(model_dir, 0.1)
    assert good.promoted and _champion(client) == good.version
    # and a NaN version never takes it from a real champion
    assert not _register(model_dir, value).promoted and _champion(client) == good.version


def test_a_champion_without_a_finite_metric_never_blocks_a_real_one(store):
    _, client, model_dir = store
    # A champion from before metrics were checked: tag metric_value "nan", alias set by hand.
    client.create_registered_model(MODEL)
    legacy = client.create_model_version(MODEL, model_dir)
    client.set_model_version_tag(MODEL, legacy.version, "metric_value", "nan")
    client.set_model_version_tag(MODEL, legacy.version, "metric_name", "val_bleu4")
    client.set_model_version_tag(MODEL, legacy.version, "eval_split", "split-real")
    client.set_registered_model_alias(MODEL, CHAMPION, legacy.version)

    new = _register(model_dir, 0.05)
    assert new.promoted and "has no finite metric" in new.reason and _champion(client) == new.version

    # By hand too: promoting over a NaN champion needs no --force.
    client.set_registered_model_alias(MODEL, CHAMPION, legacy.version)
    assert promote(MODEL, new.version, client=client).promoted and _champion(client) == new.version


def test_registry_lock_waits_then_names_the_lock_file(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with registry_lock(uri) as held:
        assert held == tmp_path / "mlflow.db.registry.lock"
        start = time.monotonic()
        with pytest.raises(RegistryError, match="mlflow.db.registry.lock"):
            with registry_lock(uri, timeout_s=0.3):
                pass
        assert time.monotonic() - start < 5
    with registry_lock(uri, timeout_s=0.3) as again:  # released
        assert again == held


@pytest.mark.slow
def test_two_processes_registering_at_once_cannot_both_take_the_alias(store, tmp_path):
    """Four real processes register equally good versions at the same moment (no champion yet):
    exactly one may take the alias, and it is the one that holds it afterwards. Reads of the
    champion are slowed by 1.5 s (as on a remote store) so that without serialisation every
    process would see "no champion yet" and claim the alias."""
    uri, client, model_dir = store
    n = 4
    go = tmp_path / "go"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), uri, model_dir, "0.5", str(tmp_path / f"ready{i}"),
                               str(go), "1.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(n)]
    try:
        deadline = time.monotonic() + 180
        while not all((tmp_path / f"ready{i}").exists() for i in range(n)):
            assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
            assert time.monotonic() < deadline, "workers did not start within 180 s"
            time.sleep(0.05)
        go.write_text("go")
        outputs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    decisions = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sorted(int(d["version"]) for d in decisions) == list(range(1, n + 1))
    winners = [d for d in decisions if d["promoted"]]
    assert len(winners) == 1, decisions
    holder = client.get_model_version_by_alias("race-model", CHAMPION)
    assert str(holder.version) == winners[0]["version"]
    for loser in (d for d in decisions if not d["promoted"]):
        assert "not better" in loser["reason"], loser
        tag = client.get_model_version("race-model", loser["version"]).tags[DECISION_TAG]
        assert tag.startswith("not promoted")
