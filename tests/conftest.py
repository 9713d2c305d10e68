"""Shared fixtures: a throw-away copy of the Kedro project and a helper that runs a pipeline in it.

Pipelines run through Kedro's real session and runner with the ``smoke`` environment,
inside a temporary directory, so tests never touch ``data/`` or ``mlruns/`` of the checkout.
Inside the copy, the smoke environment keeps its datasets under its own data root
(:func:`data_root`, ``data/smoke``) and records into its own MLflow store (:func:`store_uri`,
``mlruns/smoke.db``), as it does in a real checkout.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_LAYERS = ("01_raw", "02_intermediate", "03_primary", "04_feature",
               "05_model_input", "06_models", "07_model_output", "08_reporting")

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def mlflow_state() -> tuple:
    """MLflow's process-wide settings: tracking and registry URIs, the active experiment, every ``MLFLOW_*``
    variable (:func:`restore_mlflow_state` puts them back)."""
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    return (tracking_utils._tracking_uri, registry_utils._registry_uri, fluent._active_experiment_id,
            {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")})


def restore_mlflow_state(state: tuple) -> None:
    """Put back what :func:`mlflow_state` saved (``MLFLOW_*`` variables set since are removed)."""
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tracking_utils._tracking_uri, registry_utils._registry_uri, fluent._active_experiment_id, environ = state
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        del os.environ[key]
    os.environ.update(environ)


@pytest.fixture(autouse=True)
def restore_mlflow_globals():
    """Put MLflow's process-wide settings back after every test.

    ``mlflow.set_tracking_uri`` / ``set_registry_uri`` keep the URI in module globals and export
    ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI``; ``set_experiment`` exports ``MLFLOW_EXPERIMENT_ID``.
    Left over, a registry URI set by one test (e.g. through ``llm_caption.caption.load_registered``) makes a
    later test's ``MlflowClient(tracking_uri=...)`` read another store's registry; an experiment made
    active by ``set_experiment`` against one store makes a later run in a fresh store fail with
    "No Experiment with id=1 exists". Fixtures shared by several tests (module scope) that change them
    save and restore them themselves with the same two functions.
    """
    state = mlflow_state()
    yield
    restore_mlflow_state(state)


def make_project_copy(dest: Path) -> Path:
    """Copy what a Kedro run needs (conf/, pyproject.toml) into ``dest`` with empty data layers."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO_ROOT / "conf", dest / "conf", ignore=shutil.ignore_patterns("local"))
    (dest / "conf" / "local").mkdir(exist_ok=True)
    shutil.copy2(REPO_ROOT / "pyproject.toml", dest / "pyproject.toml")
    (dest / "src").mkdir(exist_ok=True)
    for layer in DATA_LAYERS:
        (dest / "data" / layer).mkdir(parents=True, exist_ok=True)
    (dest / "mlruns").mkdir(exist_ok=True)
    return dest


@pytest.fixture
def kedro_project(tmp_path, monkeypatch) -> Path:
    """A fresh project copy in ``tmp_path``; the working directory is moved there for the test."""
    project = make_project_copy(tmp_path / "project")
    monkeypatch.chdir(project)
    # mlflow.set_tracking_uri() / set_registry_uri() export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI for
    # the whole process: a value left by an earlier test would pick the store of this one's Kedro runs.
    # Tests that want them set them themselves.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    forget_mlflow_stores()
    return project


def forget_mlflow_stores() -> None:
    """Drop MLflow's cached stores and database engines.

    MLflow caches stores and SQLAlchemy engines by URI string; ``sqlite:///mlruns/mlflow.db`` is
    relative, so without this a second project copy in the same process would write into the first
    copy's database.
    """
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore
    from mlflow.tracking._model_registry.registry import ModelRegistryStoreRegistry
    from mlflow.tracking._tracking_service.registry import TrackingStoreRegistry

    TrackingStoreRegistry._get_store_with_resolved_uri.cache_clear()
    ModelRegistryStoreRegistry._get_store_with_resolved_uri.cache_clear()
    for store in (TrackingStore, RegistryStore):
        with store._engine_map_lock:
            for engine in store._engine_map.values():
                engine.dispose()
            store._engine_map.clear()


def data_root(project: Path, env: str = "smoke") -> Path:
    """Where ``env`` keeps its datasets in ``project`` (``globals.data_root`` of its config)."""
    from kedro.config import OmegaConfigLoader

    from llm_caption.settings import CONFIG_LOADER_ARGS

    loader = OmegaConfigLoader(conf_source=str(project / "conf"), env=env, **CONFIG_LOADER_ARGS)
    return project / loader["globals"]["data_root"]


def store_uri(project: Path, env: str = "smoke") -> str:
    """The MLflow store ``kedro run --env=ENV`` records into in ``project``, as an absolute sqlite URI."""
    from llm_caption.tracking import sqlite_path, tracking_uri

    uri = tracking_uri(env, project)
    path = sqlite_path(uri)
    return uri if path is None or path.is_absolute() else f"sqlite:///{project / path}"


def run_pipeline(project: Path, pipeline: str | None = None, env: str = "smoke",
                 params: dict | None = None, tags: list[str] | None = None) -> dict:
    """Run ``pipeline`` (``None``: the default pipeline) in ``project`` with Kedro's session and runner.

    ``tags`` restricts the run to nodes with those tags, as ``kedro run --tags``.

    kedro-mlflow's hook is active, as in ``kedro run``: the run lands in :func:`store_uri` of ``env``
    (``project/mlruns/smoke.db`` for smoke).
    Returns what the session returns (the pipeline's free outputs).
    """
    import mlflow
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    try:
        with KedroSession.create(project_path=project, env=env, runtime_params=params or {}) as session:
            return session.run(pipeline_names=[pipeline] if pipeline else None, tags=tags)
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for the module (restored afterwards): on a shared 2-core CPU more threads thrash.
    Modules that train or decode ask for it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store, created once (schema migrations take seconds); tests copy it."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def start_run_in_current_store(experiment: str = "tests"):
    """``mlflow.start_run`` in a new experiment of the current tracking store.

    A Kedro session earlier in the same process leaves its experiment active (kedro-mlflow calls
    ``mlflow.set_experiment``); a plain ``start_run()`` against another store would look that id up there
    and fail ("No Experiment with id=1 exists").
    """
    import mlflow

    return mlflow.start_run(experiment_id=mlflow.create_experiment(experiment))
