"""A throw-away team tracking server for tests: PostgreSQL + an S3 endpoint + ``mlflow server`` with basic auth.

Each server is a real process started in its own process group and stopped by its process id
(:func:`servers.stop_group`): a PostgreSQL 15 cluster made by ``initdb`` in a temporary folder on
127.0.0.1, moto's S3 server (MinIO stands in for it in production) and ``mlflow server --app-name
basic-auth`` with runs and the registry in PostgreSQL and artifacts proxied to an S3 bucket.
Passwords are random per start; nothing is written outside the temporary folders.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import free_port, stop_group, wait_for_http  # noqa: E402

BUCKET = "llm-caption-team"
ARTIFACTS_PREFIX = "mlartifacts"  # the server's --artifacts-destination is s3://BUCKET/ARTIFACTS_PREFIX
S3_KEYS = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_DEFAULT_REGION": "us-east-1"}
# Variables that would point a child process at another store or give it credentials it should not have.
CLIENT_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_USERNAME",
                    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_S3_ENDPOINT_URL",
                    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@dataclass(frozen=True)
class TeamServer:
    uri: str                  # http://127.0.0.1:PORT, the tracking server
    admin_user: str
    admin_password: str
    s3_endpoint: str          # the S3 endpoint behind the server (clients never talk to it)
    backend_uri: str          # postgresql://... of runs and the registry

    def s3_client(self):
        """A boto3 S3 client on the server's bucket endpoint (for checks only)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
                            region_name=S3_KEYS["AWS_DEFAULT_REGION"])


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without MLflow/S3 client settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_VARIABLES}
    env.update(extra)
    return env


def postgres_bin(name: str) -> str | None:
    """A PostgreSQL server program (``initdb``, ``postgres``) on PATH or in Debian's versioned folder."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _wait_for(check, proc: subprocess.Popen, log: Path, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            check()
            return
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                pytest.fail(f"{what} not ready within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A fresh PostgreSQL cluster on 127.0.0.1 with an empty database ``mlflow``; yields its SQLAlchemy URI.

    ``initdb`` refuses to run as root: as root, the cluster belongs to the ``postgres`` system user
    (its folder under /tmp, which that user can reach; pytest's own temporary folders are private to root).
    """
    initdb, postgres = postgres_bin("initdb"), postgres_bin("postgres")
    if not (initdb and postgres):
        pytest.skip("PostgreSQL server programs (initdb, postgres) are not installed")
    as_user: dict = {}
    root = Path(tempfile.mkdtemp(prefix="llm_caption_pg_"))
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        os.chown(root, account.pw_uid, account.pw_gid)
        as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    data, log = root / "data", root / "postgres.log"
    proc = None
    try:
        made = subprocess.run([initdb, "-D", str(data), "-A", "trust", "-U", "mlflow", "-E", "UTF8",
                               "--no-locale", "--no-sync"], capture_output=True, text=True, cwd=root,
                              timeout=120, **as_user)
        assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
        port = free_port(first=43000)
        with open(os.open(log, os.O_WRONLY | os.O_CREAT, 0o644), "w") as out:
            if as_user:
                os.chown(log, as_user["user"], as_user["group"])
            proc = subprocess.Popen(
                [postgres, "-D", str(data), "-p", str(port), "-k", str(root), "-c", "listen_addresses=127.0.0.1",
                 "-c", "fsync=off", "-c", "full_page_writes=off"],
                stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True, **as_user)

        import psycopg  # SQLAlchemy 2.1's driver for postgresql:// (what mlflow server uses too)

        def create_database() -> None:
            with psycopg.connect(host="127.0.0.1", port=port, user="mlflow", dbname="postgres", connect_timeout=3,
                                 autocommit=True) as conn:
                conn.execute("CREATE DATABASE mlflow")

        _wait_for(create_database, proc, log, "PostgreSQL")
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        if proc is not None:
            stop_group(proc)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def s3_server(workdir: Path) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with an empty bucket :data:`BUCKET`; yields its endpoint URL."""
    moto = Path(sys.executable).parent / "moto_server"
    if not moto.exists():
        pytest.skip("moto[server] is not installed (pip install -e '.[dev]')")
    port = free_port(first=44000)
    log = workdir / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=clean_env())
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{endpoint}/moto-api/", proc, log, timeout_s=60)
        TeamServer("", "", "", endpoint, "").s3_client().create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        stop_group(proc)


@contextlib.contextmanager
def mlflow_auth_server(workdir: Path, backend_uri: str, s3_endpoint: str) -> Iterator[TeamServer]:
    """``mlflow server --app-name basic-auth``: runs and registry in ``backend_uri``, artifacts proxied to S3.

    The admin account is created on first start from ``MLFLOW_AUTH_ADMIN_PASSWORD`` (a random one);
    users and permissions live in a sqlite file in ``workdir``.
    """
    port = free_port(first=45000)
    password = secrets.token_urlsafe(16)
    config = workdir / "basic_auth.ini"
    config.write_text("[mlflow]\ndefault_permission = READ\n"
                      f"database_uri = sqlite:///{workdir / 'basic_auth.db'}\n"
                      "admin_username = admin\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                      # Without the cache every request re-hashes the password (PBKDF2, ~1 s on a busy
                      # CPU), and kedro-mlflow logs each parameter in a request of its own.
                      "auth_cache_ttl_seconds = 300\n")
    env = clean_env(MLFLOW_AUTH_CONFIG_PATH=str(config), MLFLOW_AUTH_ADMIN_PASSWORD=password,
                    MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16), MLFLOW_S3_ENDPOINT_URL=s3_endpoint,
                    **S3_KEYS)
    log = workdir / "mlflow-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth",
             "--backend-store-uri", backend_uri, "--artifacts-destination", f"s3://{BUCKET}/{ARTIFACTS_PREFIX}",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", proc, log, timeout_s=240)
        yield TeamServer(uri, "admin", password, s3_endpoint, backend_uri)
    finally:
        stop_group(proc)


@contextlib.contextmanager
def team_server(workdir: Path) -> Iterator[TeamServer]:
    """PostgreSQL, the S3 endpoint and the authenticated tracking server, stopped in reverse order."""
    with postgres_server() as backend_uri, s3_server(workdir) as s3_endpoint, \
            mlflow_auth_server(workdir, backend_uri, s3_endpoint) as server:
        yield server
