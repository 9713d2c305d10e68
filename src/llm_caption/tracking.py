"""The project's one entry point to MLflow runs: child runs, what is logged on them, which store.

kedro-mlflow opens one MLflow run per ``kedro run`` (the *pipeline run*) and logs the datasets
the catalog wraps. Work that deserves its own run -- one fine-tuning method, one captioning
architecture -- opens a *child run* nested under it with :func:`child_run`, so the MLflow UI
groups them. Outside a Kedro run (tests, notebooks) a child run is simply a top-level run.
Domain code does not import ``mlflow``: a training loop takes a callback (:func:`epoch_logger`),
an experiment calls the helpers here (:func:`log_metrics`, :func:`reopen_run`,
:func:`log_metrics_to_run`).

:func:`tracking_uri` answers "which store?" the same way for ``kedro run`` and the command-line
tools (``$MLFLOW_TRACKING_URI`` wins over ``mlflow.yml``), and :func:`check_tracking_store` fails
fast when that store does not answer.

MLflow and pandas are imported by the functions that use them, not with this module: the command-line
tools ask :func:`reachable_store_uri` which store to use before they know whether they need MLflow at all.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: imported where used (see the module doc)
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)


def flatten_params(params: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, str]:
    """Flatten a nested mapping into ``{"a.b.c": "value"}`` strings that MLflow accepts (values cut to 6000 chars)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, name, sep))
        else:
            flat[name] = str(value)[:6000]
    return flat


@contextlib.contextmanager
def child_run(name: str, tags: Mapping[str, str] | None = None, params: Mapping[str, Any] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open an MLflow run named ``name`` nested under the active (pipeline) run, if any.

    The parent's run id is also written as tag ``llm_caption.parent_run_id`` so the
    child can be found with a plain ``search_runs`` filter.
    """
    import mlflow

    parent = mlflow.active_run()
    all_tags = dict(tags or {})
    if parent is not None:
        all_tags["llm_caption.parent_run_id"] = parent.info.run_id
    with mlflow.start_run(run_name=name, nested=parent is not None, tags=all_tags) as run:
        if params:
            mlflow.log_params(flatten_params(params))
        logger.info("MLflow run %s (%s)%s", name, run.info.run_id,
                    f" nested under {parent.info.run_id}" if parent else "")
        yield run


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log ``metrics`` (as floats) on the active run; nothing outside a run."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_history(history: Sequence[Mapping[str, float]], step_key: str = "epoch") -> None:
    """Log each record of a loss history on the active run at step ``record[step_key]``."""
    for record in history:
        log_metrics({k: v for k, v in record.items() if k != step_key}, step=int(record[step_key]))


def epoch_logger(step_key: str = "epoch") -> Callable[[int, Mapping[str, float], str | None], None]:
    """The ``on_epoch_end(epoch, record, sample)`` callback of a training loop: the epoch's figures as metrics
    at step ``epoch`` and the sample caption as ``samples/epoch_NNN.txt`` of the active run."""
    def on_epoch_end(epoch: int, record: Mapping[str, float], sample: str | None) -> None:
        import mlflow

        if mlflow.active_run() is None:
            return
        log_metrics({k: v for k, v in record.items() if k != step_key}, step=epoch)
        if sample is not None:  # None: an epoch restored from a checkpoint (its sample was logged when it ran)
            mlflow.log_text(sample + "\n", f"samples/epoch_{epoch:03d}.txt")

    return on_epoch_end


def run_exists(run_id: object, owner: str) -> bool:
    """Whether ``run_id`` names a run of the current store; warns (naming ``owner``) when it does not."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if run_id is None or (isinstance(run_id, float) and math.isnan(run_id)) or not str(run_id).strip():
        logger.warning("%s has no MLflow run id", owner)
        return False
    try:
        MlflowClient().get_run(str(run_id))
    except MlflowException:
        logger.warning("%s: MLflow run %s is not in the store %s", owner, run_id, mlflow.get_tracking_uri())
        return False
    return True


@contextlib.contextmanager
def reopen_run(run_id: str | None, owner: str) -> Iterator[mlflow.ActiveRun]:
    """Reopen the model's own run ``run_id`` (nested under the active run, if any) to log more on it; when the
    store does not hold it, a new run named ``register-<owner>`` instead."""
    import mlflow

    known = run_exists(run_id, owner)
    with mlflow.start_run(run_id=str(run_id) if known else None, nested=mlflow.active_run() is not None,
                          run_name=None if known else f"register-{owner}") as run:
        yield run


def log_metrics_to_run(run_id: str | None, metrics: Mapping[str, float], owner: str,
                       client: MlflowClient | None = None) -> bool:
    """Log finite ``metrics`` on run ``run_id``; warn (naming ``owner``) and return False when the run is unknown."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if run_id is None or (isinstance(run_id, float) and math.isnan(run_id)) or not str(run_id).strip():
        logger.warning("%s has no MLflow run id: its evaluation metrics stay on the evaluation run only", owner)
        return False
    client = client or MlflowClient()
    try:
        client.get_run(str(run_id))
    except MlflowException:
        logger.warning("%s: MLflow run %s not found in this store: metrics not logged on it", owner, run_id)
        return False
    for key, value in metrics.items():
        if value is not None and math.isfinite(float(value)):
            client.log_metric(str(run_id), key, float(value))
    return True


def caption_metrics_by_run(caption_metrics: pd.DataFrame, model_results: pd.DataFrame) -> dict[str, dict[str, float]]:
    """``{architecture: {"test_coco_bleu_4": ..., ...}}`` from the long ``caption_metrics`` table."""
    out: dict[str, dict[str, float]] = {str(a): {} for a in model_results["architecture"]}
    for row in caption_metrics.itertuples(index=False):
        out.setdefault(str(row.architecture), {})[f"{row.split}_{row.metric}"] = float(row.value)
    return out


def chat_metrics_by_run(chat_metrics: pd.DataFrame) -> dict[str, dict[str, float]]:
    """``{method: {"test_chrf": ..., ...}}`` from the ``after`` rows of ``chat_metrics``."""
    import pandas as pd

    out: dict[str, dict[str, float]] = {}
    after = chat_metrics[chat_metrics["stage"] == "after"]
    for row in after.to_dict(orient="records"):
        out[str(row["method"])] = {f"test_{k}": float(v) for k, v in row.items()
                                   if k not in ("method", "stage") and pd.notna(v)}
    return out


def active_run_info() -> tuple[str, str | None]:
    """(run id, ``env`` tag) of the active run; a placeholder id and ``None`` outside an MLflow run."""
    import mlflow
    from mlflow.tracking import MlflowClient

    run = mlflow.active_run()
    if run is None:
        return "none (no active MLflow run)", None
    return run.info.run_id, MlflowClient().get_run(run.info.run_id).data.tags.get("env")


# --------------------------------------------------------------------------------------------
# Which store: one answer for `kedro run` and the command-line tools
# --------------------------------------------------------------------------------------------

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working directory when relative), else ``None``."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = uri[len(prefix):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


class TrackingStoreUnreachable(RuntimeError):
    """The MLflow tracking store named in the message does not answer."""


def resolve_tracking_uri(default: str) -> str:
    """The ``${tracking_uri:DEFAULT}`` resolver of ``mlflow.yml``: ``$MLFLOW_TRACKING_URI`` when set, else ``default``."""
    return os.environ.get(TRACKING_URI_ENV) or default


# The project's config loader settings (settings.py hands them to Kedro; tracking_store_uri reads mlflow.yml
# with them outside a Kedro session).
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # Environments (smoke, flickr8k, gpu, ...) override only the keys they name.
    "merge_strategy": {"parameters": "soft", "mlflow": "soft"},
    "config_patterns": {
        "mlflow": ["mlflow*", "mlflow*/**"],
    },
    # mlflow.yml: ``${tracking_uri:DEFAULT}`` is $MLFLOW_TRACKING_URI when set, else DEFAULT, so the
    # variable means the same store for `kedro run` and the command-line tools.
    "custom_resolvers": {"tracking_uri": resolve_tracking_uri},
}


def tracking_uri(env: str | None = None, project_dir: str | Path = ".") -> str:
    """The MLflow store that ``kedro run --env=ENV`` uses in ``project_dir``.

    That is ``server.mlflow_tracking_uri`` of ``conf/base/mlflow.yml`` merged with ``conf/<env>/``
    (the project's own config loader, so ``$MLFLOW_TRACKING_URI`` wins through ``${tracking_uri:...}``);
    outside a project, ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlruns/mlflow.db``.
    """
    conf = Path(project_dir) / "conf"
    if not (conf / "base").is_dir():
        return resolve_tracking_uri(DEFAULT_TRACKING_URI)
    import warnings

    from kedro.config import OmegaConfigLoader

    with warnings.catch_warnings():  # omegaconf's deprecation notice for Kedro's own resolvers
        warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated")
        loader = OmegaConfigLoader(conf_source=str(conf), env=env, **CONFIG_LOADER_ARGS)
        configured = configured_tracking_uri(loader["mlflow"])
    return configured or resolve_tracking_uri(DEFAULT_TRACKING_URI)


def configured_tracking_uri(mlflow_conf: Mapping[str, Any] | None) -> str | None:
    """``server.mlflow_tracking_uri`` of a loaded ``mlflow.yml`` (resolvers applied), else ``None``."""
    server = (mlflow_conf or {}).get("server") or {}
    uri = server.get("mlflow_tracking_uri")
    return str(uri) if uri else None


def _http_get(url: str, timeout_s: float) -> tuple[int, bytes] | str:
    """``(status, body)`` of a GET on ``url`` (any HTTP status), or why no answer came (refused, timed out, ...)."""
    import ssl
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read(4096)
    except urllib.error.HTTPError as err:
        return err.code, err.read(4096)
    except urllib.error.URLError as err:
        reason = err.reason
        if isinstance(reason, ssl.SSLError):
            return 0, b""  # something listens; certificate settings are MLflow's business
        return str(getattr(reason, "strerror", None) or reason)
    except (OSError, ValueError) as err:  # timeouts while reading, malformed URLs
        return str(err) or type(err).__name__


def _http_unreachable(uri: str, timeout_s: float) -> str | None:
    """Why the MLflow server at ``uri`` cannot serve a run, else ``None``.

    No answer, or a 5xx (a proxy's ``502 Bad Gateway``: MLflow would retry it for minutes), is
    unreachable. A 404 for ``/health`` is accepted only if the MLflow REST API answers like MLflow
    (a JSON ``error_code`` or a 200), so a host that is not a tracking server fails here too. Other
    answers (200, 401/403 for credentials) are left to MLflow.
    """
    base = uri.rstrip("/")
    health = _http_get(base + "/health", timeout_s)
    if isinstance(health, str):
        return health
    status = health[0]
    if status >= 500:
        return f"HTTP {status} for {base}/health"
    if status != 404:
        return None
    api = _http_get(base + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default", timeout_s)
    if isinstance(api, str):
        return api
    if api[0] in (200, 401, 403) or b"error_code" in api[1]:
        return None
    return f"HTTP 404 for {base}/health and HTTP {api[0]} for its REST API: not an MLflow tracking server"


def _tcp_unreachable(host: str, port: int, timeout_s: float) -> str | None:
    """Why nothing accepts a TCP connection on ``host:port`` within ``timeout_s``, else ``None``."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as err:
        return str(getattr(err, "strerror", None) or err) or type(err).__name__


def check_tracking_store(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, with one line naming ``uri``, when the tracking store cannot be reached.

    HTTP(S) servers must answer a request within ``timeout_s`` (MLflow itself would retry for minutes);
    database servers must accept a TCP connection. For a sqlite store the folder of the database file is
    created if missing. Other stores are left to MLflow.
    """
    from urllib.parse import urlparse

    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        return
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+", 1)[0]
    if scheme in ("http", "https"):
        why = _http_unreachable(uri, timeout_s)
    elif scheme in DATABASE_PORTS and parsed.hostname:
        why = _tcp_unreachable(parsed.hostname, parsed.port or DATABASE_PORTS[scheme], timeout_s)
    else:
        return
    if why is not None:
        raise TrackingStoreUnreachable(
            f"MLflow tracking store {uri} is unreachable ({why}); start it, or point {TRACKING_URI_ENV} "
            f"(or server.mlflow_tracking_uri in conf/<env>/mlflow.yml) at a store that answers")


def reachable_store_uri(explicit: str | None, env: str | None = None) -> str:
    """The store a command line uses (``explicit``, else :func:`tracking_uri` of ``env``), checked to answer;
    an unreachable one ends the command with exit status 2 and one ``error:`` line naming it."""
    uri = explicit or tracking_uri(env)
    try:
        check_tracking_store(uri)
    except TrackingStoreUnreachable as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return uri
