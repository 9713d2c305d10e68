"""Project hooks: check the MLflow store before anything runs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import click
from kedro.framework.hooks import hook_impl

from .tracking import TrackingStoreUnreachable, check_tracking_store

if TYPE_CHECKING:  # importing kedro.framework.context configures Kedro's logging: not at settings import
    from kedro.framework.context import KedroContext

logger = logging.getLogger(__name__)


class TrackingStoreError(click.ClickException):
    """An unusable tracking store; ``kedro run`` prints it as one line (``Error: ...``) and exits with status 1."""


class TrackingStoreHook:
    """Fail a run at once, with one line naming the URI, when its MLflow tracking store does not answer.

    Runs before kedro-mlflow's own ``after_context_created`` (``tryfirst``), which would otherwise
    retry an unreachable server for minutes before the first node.
    """

    def __init__(self, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s

    @hook_impl(tryfirst=True)
    def after_context_created(self, context: "KedroContext") -> None:
        """Resolve the run's tracking URI from ``mlflow.yml`` (``$MLFLOW_TRACKING_URI`` wins) and check it."""
        server = (context.config_loader["mlflow"] or {}).get("server") or {}
        uri = server.get("mlflow_tracking_uri")
        if not uri:
            return
        try:
            check_tracking_store(str(uri), self.timeout_s)
        except TrackingStoreUnreachable as err:
            raise TrackingStoreError(str(err)) from None
        logger.info("MLflow tracking store: %s", uri)
