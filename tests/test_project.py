"""The project skeleton: pipelines are discovered, config environments load, MLflow points at the sqlite store."""

from __future__ import annotations

import subprocess
import sys

import pytest
from kedro.framework.project import pipelines
from kedro.framework.startup import bootstrap_project

from conftest import REPO_ROOT

EXPECTED = {"data_engineering", "llm_finetuning", "caption_training", "evaluation", "reporting"}


def test_all_five_pipelines_registered():
    bootstrap_project(REPO_ROOT)
    names = set(pipelines.keys())
    assert EXPECTED <= names
    assert "__default__" in names
    default_nodes = {n.name for n in pipelines["__default__"].nodes}
    for name in EXPECTED:
        assert {n.name for n in pipelines[name].nodes} <= default_nodes


def test_kedro_registry_list_cli():
    out = subprocess.run([sys.executable, "-m", "kedro", "registry", "list"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=180,
                         env={"KEDRO_DISABLE_TELEMETRY": "true", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    for name in EXPECTED:
        assert f"- {name}" in out.stdout


@pytest.mark.parametrize("env", ["base", "smoke", "flickr8k"])
def test_config_environments_load(kedro_project, env):
    from kedro.framework.session import KedroSession

    bootstrap_project(kedro_project)
    with KedroSession.create(project_path=kedro_project, env=None if env == "base" else env) as session:
        context = session.load_context()
        params = context.params
        assert params["seed"] == 42
        assert params["llm_model"] in params["llm_models"]
        mlflow_conf = context.config_loader["mlflow"]
        store = "smoke.db" if env == "smoke" else "mlflow.db"  # smoke never records into the default store
        assert mlflow_conf["server"]["mlflow_tracking_uri"] == f"sqlite:///mlruns/{store}"


def test_ci_runs_the_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "make run" in readme and "make test" in readme
    assert "make test" in ci
