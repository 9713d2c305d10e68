"""The smoke environment never writes where the default environment keeps its data or models:
every dataset and parameter path of smoke lies under its own data root, and it records into its
own MLflow store with its own artifact folder."""

from __future__ import annotations

from collections.abc import Iterator

from kedro.config import OmegaConfigLoader

from conftest import REPO_ROOT
from llm_caption.settings import CONFIG_LOADER_ARGS
from llm_caption.tracking import tracking_uri


def _strings(node) -> Iterator[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def _config(env: str | None) -> OmegaConfigLoader:
    return OmegaConfigLoader(conf_source=str(REPO_ROOT / "conf"), env=env, **CONFIG_LOADER_ARGS)


def test_every_smoke_dataset_and_parameter_path_is_under_the_smoke_data_root():
    smoke = _config("smoke")
    root = smoke["globals"]["data_root"]
    assert root == smoke["globals"]["chat_data_root"] == "data/smoke"
    paths = [s for s in (*_strings(smoke["catalog"]), *_strings(smoke["parameters"])) if s.startswith("data/")]
    assert len(paths) > 40  # every catalog file, caches, checkpoints, adapters, the raw synthetic scenes
    assert [p for p in paths if not p.startswith(root + "/")] == []


def test_smoke_records_into_its_own_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri("smoke", REPO_ROOT) == "sqlite:///mlruns/smoke.db"
    assert tracking_uri(None, REPO_ROOT) == "sqlite:///mlruns/mlflow.db"
    artifacts = {env: _config(env)["mlflow"]["tracking"]["experiment"]["create_experiment_kwargs"]["artifact_location"]
                 for env in ("smoke", None)}
    assert artifacts == {"smoke": "mlruns/smoke-artifacts", None: "mlruns/artifacts"}
