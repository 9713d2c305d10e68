"""Small MLflow helpers shared by the pipelines.

kedro-mlflow opens one MLflow run per ``kedro run`` (the *pipeline run*). Work that
deserves its own run -- one fine-tuning method, one captioning architecture -- opens a
*child run* nested under it with :func:`child_run`, so the MLflow UI groups them.
Outside a Kedro run (tests, notebooks) a child run is simply a top-level run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import mlflow

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
