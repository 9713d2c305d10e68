"""Which MLflow store: `kedro run` and the command-line tools agree, $MLFLOW_TRACKING_URI wins over
mlflow.yml for both, and a store that does not answer fails a real `kedro run` in seconds with one
line naming it, before any node runs."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import data_root, run_pipeline
from llm_caption.tracking import TrackingStoreUnreachable, check_tracking_store, tracking_uri

CLOSED = "http://127.0.0.1:9"  # discard port: nothing listens there


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "KEDRO_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1", **extra}


def test_tracking_uri_is_the_environment_store_unless_the_variable_names_another(kedro_project, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None, kedro_project) == "sqlite:///mlruns/mlflow.db"
    assert tracking_uri("flickr8k", kedro_project) == "sqlite:///mlruns/mlflow.db"
    assert tracking_uri("smoke", kedro_project) == "sqlite:///mlruns/smoke.db"
    assert tracking_uri(None, tmp_path / "not-a-project") == "sqlite:///mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////somewhere/else.db")
    for env in (None, "smoke", "flickr8k"):
        assert tracking_uri(env, kedro_project) == "sqlite:////somewhere/else.db"
    assert tracking_uri(None, tmp_path / "not-a-project") == "sqlite:////somewhere/else.db"


def test_kedro_run_records_into_the_store_named_by_the_variable(kedro_project, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere" / "store.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}")
    run_pipeline(kedro_project, "data_engineering", env="smoke", tags=["caption_data"],
                 params={"caption_data": {"synthetic": {"n_images": 30, "image_size": 64}}})
    assert (data_root(kedro_project, "smoke") / "03_primary/caption_images.parquet").is_file()
    assert not (kedro_project / "mlruns/smoke.db").exists() and not (kedro_project / "mlruns/mlflow.db").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{elsewhere}")
    experiment = client.get_experiment_by_name("llm_caption")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and "data_engineering" in runs[0].info.run_name, [(r.info.run_name, r.data.tags) for r in runs]


def test_the_registry_command_uses_the_same_store(kedro_project):
    smoke = subprocess.run([sys.executable, "-m", "llm_caption.registry", "--env", "smoke", "list"],
                           cwd=kedro_project, capture_output=True, text=True, timeout=120, env=_env())
    assert smoke.returncode == 0, smoke.stderr[-2000:]
    assert smoke.stdout.splitlines()[0] == "Store: sqlite:///mlruns/smoke.db"
    start = time.monotonic()
    down = subprocess.run([sys.executable, "-m", "llm_caption.registry", "list"], cwd=kedro_project,
                          capture_output=True, text=True, timeout=120, env=_env(MLFLOW_TRACKING_URI=CLOSED))
    # Fails at once rather than after MLflow's retries with back-off (minutes, to a closed port); the
    # bound leaves room for the start-up of a Python process on a busy 2-core machine.
    assert time.monotonic() - start < 90
    assert down.returncode == 2
    assert [line for line in down.stderr.splitlines() if line.strip()] == [
        f"error: MLflow tracking store {CLOSED} is unreachable (Connection refused); start it, or point "
        "MLFLOW_TRACKING_URI (or server.mlflow_tracking_uri in conf/<env>/mlflow.yml) at a store that answers"]


def test_kedro_run_fails_in_seconds_naming_an_unreachable_server(kedro_project):
    """A real `kedro run` subprocess against a closed port: one line on stderr, no node run, and no retries with
    back-off (minutes): the bound leaves room for Kedro's start-up on a busy 2-core machine."""
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "kedro", "run", "--env=smoke", "--pipelines=caption_training"],
                         cwd=kedro_project, capture_output=True, text=True, timeout=180,
                         env=_env(MLFLOW_TRACKING_URI=CLOSED))
    elapsed = time.monotonic() - start
    assert run.returncode == 1, run.stderr[-3000:]
    assert elapsed <= 90, elapsed
    errors = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"Error: MLflow tracking store {CLOSED} is unreachable"), errors
    assert "Running node" not in run.stdout and "Completed" not in run.stdout
    assert not (kedro_project / "data/smoke").exists()


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections (kernel backlog) but never answers a request."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_a_server_that_never_answers_fails_after_the_timeout(silent_server):
    start = time.monotonic()
    with pytest.raises(TrackingStoreUnreachable, match=f"{silent_server} is unreachable .*timed out"):
        check_tracking_store(silent_server, timeout_s=1.0)
    assert time.monotonic() - start < 5


@pytest.fixture
def http_server():
    """Start a local HTTP server answering GET ``path -> (status, body)`` (unknown paths: 404, empty)."""
    servers = []

    def start(routes: dict[str, tuple[int, bytes]]) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                status, body = routes.get(self.path.split("?", 1)[0], (404, b""))
                self.send_response(status)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


API = "/api/2.0/mlflow/experiments/get-by-name"


@pytest.mark.parametrize("routes", [
    {"/health": (200, b"OK")},                                      # an MLflow server
    {"/health": (401, b"")},                                         # credentials: MLflow's business
    {API: (404, b'{"error_code": "RESOURCE_DOES_NOT_EXIST"}')},      # MLflow without /health (old, or a gateway)
])
def test_a_server_that_answers_like_mlflow_passes(http_server, routes):
    check_tracking_store(http_server(routes), timeout_s=5.0)


@pytest.mark.parametrize("routes, why", [
    ({"/health": (502, b"Bad Gateway")}, "HTTP 502"),                # a proxy in front of a dead server
    ({}, "not an MLflow tracking server"),                           # some other web server
])
def test_a_server_that_cannot_serve_a_run_fails_in_one_line(http_server, routes, why):
    uri = http_server(routes)
    with pytest.raises(TrackingStoreUnreachable, match=f"{uri} is unreachable .*{why}"):
        check_tracking_store(uri, timeout_s=5.0)


def test_a_closed_database_port_fails_and_a_sqlite_folder_is_created(tmp_path):
    with pytest.raises(TrackingStoreUnreachable, match=r"postgresql://mlflow@127\.0\.0\.1:9/mlflow is unreachable"):
        check_tracking_store("postgresql://mlflow@127.0.0.1:9/mlflow", timeout_s=2.0)
    check_tracking_store(f"sqlite:///{tmp_path / 'new' / 'folder' / 'mlflow.db'}")
    assert (tmp_path / "new" / "folder").is_dir()


def test_a_later_session_in_the_same_process_is_not_sent_to_an_earlier_sessions_store(kedro_project):
    """mlflow.set_tracking_uri (kedro-mlflow) exports MLFLOW_TRACKING_URI process-wide; a notebook's
    `%reload_kedro --env=...` or the next test must still get its own environment's store."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(kedro_project)
    stores = {}
    for env in ("smoke", None, "smoke"):
        with KedroSession.create(project_path=kedro_project, env=env) as session:
            stores.setdefault(env, []).append(session.load_context().mlflow.server.mlflow_tracking_uri)
        assert "MLFLOW_TRACKING_URI" not in os.environ
    assert stores == {"smoke": ["sqlite:///mlruns/smoke.db"] * 2, None: ["sqlite:///mlruns/mlflow.db"]}


@pytest.mark.slow
def test_kedro_run_against_a_real_tracking_server_passes_the_check_and_records_there(kedro_project, tmp_path,
                                                                                     monkeypatch):
    """A real `mlflow server`: the store check lets it through, and the run lands in its backend store."""
    from servers import free_port, stop_group, wait_for_http

    port = free_port()
    backend = tmp_path / "server" / "mlflow.db"
    backend.parent.mkdir()
    log_path = tmp_path / "server.log"
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{backend}",
                                 "--default-artifact-root", str(tmp_path / "server" / "artifacts"),
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_for_http(f"{uri}/health", proc, log_path, timeout_s=180)
        check_tracking_store(uri)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        run_pipeline(kedro_project, "data_engineering", env="smoke", tags=["caption_data"],
                     params={"caption_data": {"synthetic": {"n_images": 30, "image_size": 64}}})
        client = MlflowClient(tracking_uri=f"sqlite:///{backend}")
        runs = client.search_runs([client.get_experiment_by_name("llm_caption").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert not (kedro_project / "mlruns/smoke.db").exists()
    finally:
        stop_group(proc)
