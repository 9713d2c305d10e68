"""The ``team`` environment against a real team server: PostgreSQL + S3 artifacts + ``mlflow server`` with basic auth.

The servers are started by the test (tests/team_servers.py) and stopped by process id. The pipelines run
with ``kedro run --env=team`` in a throw-away copy of the project whose ``conf/team`` holds the repository's
team files (mlflow.yml, credentials.yml) plus the smoke environment's budgets and data root, so the
team configuration is exercised as committed while the run stays smoke-sized and writes only in the copy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import REPO_ROOT, data_root, make_project_copy  # noqa: E402
from team_servers import ARTIFACTS_PREFIX, BUCKET, TeamServer, clean_env, team_server  # noqa: E402

pytestmark = pytest.mark.slow
PIPELINES = "data_engineering,llm_finetuning,caption_training"  # the smallest set that registers both models
# One fine-tuning method keeps the run short; the captioners train as in smoke (three architectures, 2 epochs).
PARAMS = "llm_finetuning.methods_to_run=[lora]"
MODELS = ("persian-chat-quickstart", "image-captioner")  # what the base config (the team env) registers


def team_project(dest: Path) -> Path:
    """A project copy whose ``team`` environment is the repository's plus smoke's budgets and data root."""
    project = make_project_copy(dest)
    team, smoke = project / "conf/team", project / "conf/smoke"
    committed = {p.name for p in team.iterdir()}
    assert committed >= {"mlflow.yml", "credentials.yml"}
    for path in smoke.iterdir():
        if path.name != "mlflow.yml":
            assert path.name not in committed, f"conf/team/{path.name} would be replaced by smoke's"
            shutil.copy2(path, team / path.name)
    return project


def kedro(project: Path, env: dict[str, str], *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kedro", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=timeout)


def http_status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def s3_key(artifact_uri: str) -> str:
    """The bucket key behind a proxied ``mlflow-artifacts:/...`` URI (the server's --artifacts-destination)."""
    prefix = "mlflow-artifacts:/"
    assert artifact_uri.startswith(prefix), artifact_uri  # served by the server, not a client-side path
    return f"{ARTIFACTS_PREFIX}/{artifact_uri[len(prefix):].lstrip('/')}"


def s3_keys(server: TeamServer, prefix: str) -> set[str]:
    pages = server.s3_client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def test_team_env_fails_fast_without_a_server(tmp_path):
    """No $MLFLOW_TRACKING_URI: the run stops before any node, naming the placeholder and the variable."""
    project = team_project(tmp_path / "project")
    started = time.monotonic()
    run = kedro(project, clean_env(), "run", "--env=team", "--pipelines=reporting", timeout=120)
    assert run.returncode != 0
    assert "mlflow-server.invalid" in run.stderr + run.stdout and "MLFLOW_TRACKING_URI" in run.stderr + run.stdout
    assert time.monotonic() - started < 90
    assert not any((project / "mlruns").iterdir())  # no local store made instead


def test_smoke_pipelines_tracked_and_registered_on_the_team_server(tmp_path, monkeypatch):
    workdir = tmp_path / "servers"
    workdir.mkdir()
    project = team_project(tmp_path / "project")
    with team_server(workdir) as server:
        # Without credentials the server answers 401 (the REST API and the UI); /health stays open.
        api = f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_status(api) == 401
        assert http_status(api, ("admin", "wrong-password")) == 401
        assert http_status(f"{server.uri}/") == 401
        assert http_status(f"{server.uri}/health") == 200
        assert http_status(api, (server.admin_user, server.admin_password)) == 200

        # A team member's account, made by the admin through MLflow's auth API.
        from mlflow.server import get_app_client

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", server.admin_user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.admin_password)
        get_app_client("basic-auth", tracking_uri=server.uri).create_user("trainer", "trainer-pass-1")
        member = {"MLFLOW_TRACKING_USERNAME": "trainer", "MLFLOW_TRACKING_PASSWORD": "trainer-pass-1"}

        # The team env without the account: stopped before any node, naming the missing variable.
        no_account = kedro(project, clean_env(MLFLOW_TRACKING_URI=server.uri), "run", "--env=team",
                           "--pipelines=reporting", timeout=300)
        assert no_account.returncode != 0
        assert "MLFLOW_TRACKING_USERNAME" in no_account.stderr + no_account.stdout

        # The smoke-sized pipelines, as a team member; the client has no S3 keys (the server proxies artifacts).
        started = time.monotonic()
        run = kedro(project, clean_env(MLFLOW_TRACKING_URI=server.uri, **member), "run", "--env=team",
                    f"--pipelines={PIPELINES}", f"--params={PARAMS}")
        assert run.returncode == 0, run.stderr[-4000:]
        print(f"kedro run --env=team --pipelines={PIPELINES}: {time.monotonic() - started:.0f} s")
        assert not (project / "mlruns/mlflow.db").exists() and not (project / "mlruns/smoke.db").exists()
        assert not (project / "mlruns/artifacts").exists()

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "trainer-pass-1")
        client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
        experiment = client.get_experiment_by_name("llm_caption")
        assert experiment is not None and experiment.artifact_location.startswith("mlflow-artifacts:")
        runs = client.search_runs([experiment.experiment_id], max_results=100)
        parents = [r for r in runs if "llm_caption.parent_run_id" not in r.data.tags]
        assert len(parents) == 1  # one pipeline run ...
        parent_id = parents[0].info.run_id
        assert parents[0].info.status == "FINISHED" and parents[0].info.user_id == "trainer"
        assert parents[0].data.params  # ... with the run's parameters logged flattened
        out = data_root(project, "team") / "07_model_output"

        # The fine-tuning method's child run: its metrics, and its artifact in the bucket, byte for byte.
        methods = pd.read_csv(out / "llm_method_results.csv")
        assert methods["method"].tolist() == ["lora"]
        lora = client.get_run(methods["mlflow_run_id"][0])
        assert lora.data.tags["llm_caption.parent_run_id"] == parent_id
        for metric in ("eval_loss", "bits_per_char", "train_time_s", "trainable_params"):
            assert metric in lora.data.metrics, metric
        assert len(client.get_metric_history(lora.info.run_id, "train_loss")) == 2
        assert "generations.json" in {a.path for a in client.list_artifacts(lora.info.run_id)}
        key = f"{s3_key(lora.info.artifact_uri)}/generations.json"
        in_bucket = server.s3_client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
        served = Path(client.download_artifacts(lora.info.run_id, "generations.json", str(tmp_path)))
        assert served.read_bytes() == in_bucket and json.loads(in_bucket)

        # The captioners' child runs: two epochs of validation BLEU-4 each (SCST's row: its start and one epoch).
        captioners = pd.read_csv(out / "caption_model_results.csv")
        assert len(captioners) == 4 and captioners["architecture"].iloc[3].endswith("+scst")
        for run_id in captioners["mlflow_run_id"]:
            child = client.get_run(run_id)
            assert child.data.tags["llm_caption.parent_run_id"] == parent_id
            assert len(client.get_metric_history(run_id, "val_bleu4")) == 2

        # Both models registered in PostgreSQL with the champion alias, their files in the bucket.
        decision = json.loads((out / "llm_registry_decision.json").read_text())
        assert decision["promoted"] and decision["method"] == "lora"
        for name in MODELS:
            versions = client.search_model_versions(f"name='{name}'")
            assert len(versions) == 1, name
            champion = client.get_model_version_by_alias(name, "champion")
            assert champion.version == versions[0].version and champion.status == "READY"
            assert champion.tags["metric_name"] and champion.tags["champion_decision"].startswith("promoted")
            files = s3_keys(server, s3_key(client.get_model_version_download_uri(name, champion.version)) + "/")
            assert any(f.endswith("/MLmodel") for f in files), (name, sorted(files)[:10])
        assert str(client.get_model_version_by_alias("persian-chat-quickstart", "champion").version) == \
            str(decision["version"])

        # The registry command finds the same server through the team env (URI and account from the environment).
        listing = subprocess.run([sys.executable, "-m", "llm_caption.registry", "--env", "team", "list"],
                                 cwd=project, env=clean_env(MLFLOW_TRACKING_URI=server.uri, **member),
                                 capture_output=True, text=True, timeout=300)
        assert listing.returncode == 0, listing.stderr[-3000:]
        assert server.uri in listing.stdout
        for name in MODELS:
            assert f"{name}  (aliases: champion -> v1)" in listing.stdout, listing.stdout
        denied = subprocess.run([sys.executable, "-m", "llm_caption.registry", "--env", "team", "list"],
                                cwd=project, env=clean_env(MLFLOW_TRACKING_URI=server.uri),
                                capture_output=True, text=True, timeout=300)
        assert denied.returncode != 0 and "401" in denied.stderr + denied.stdout
    assert not (REPO_ROOT / "conf/team/parameters.yml").exists()  # smoke's files went to the copy only
