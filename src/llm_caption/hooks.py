"""Project hooks: check the MLflow store before anything runs, and keep ``MLFLOW_TRACKING_URI`` as the user set it."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import click
from kedro.framework.hooks import hook_impl

from .tracking import TRACKING_URI_ENV, TrackingStoreUnreachable, check_tracking_store

if TYPE_CHECKING:  # importing kedro.framework.context configures Kedro's logging: not at settings import
    from kedro.framework.context import KedroContext

logger = logging.getLogger(__name__)


class TrackingStoreError(click.ClickException):
    """An unusable tracking store; ``kedro run`` prints it as one line (``Error: ...``) and exits with status 1."""


class TrackingStoreHook:
    """Fail a run at once, with one line naming the URI, when its MLflow tracking store does not answer.

    Runs before kedro-mlflow's own ``after_context_created`` (``tryfirst``), which would otherwise
    retry an unreachable server for minutes before the first node. It also remembers
    ``$MLFLOW_TRACKING_URI`` as it was before the session, for :class:`TrackingVariableHook`.
    """

    def __init__(self, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s
        self.variable_before: str | None = None

    @hook_impl(tryfirst=True)
    def after_context_created(self, context: KedroContext) -> None:
        """Resolve the run's tracking URI from ``mlflow.yml`` (``$MLFLOW_TRACKING_URI`` wins) and check it."""
        self.variable_before = os.environ.get(TRACKING_URI_ENV)
        server = (context.config_loader["mlflow"] or {}).get("server") or {}
        uri = server.get("mlflow_tracking_uri")
        if not uri:
            return
        try:
            check_tracking_store(str(uri), self.timeout_s)
        except TrackingStoreUnreachable as err:
            raise TrackingStoreError(str(err)) from None
        logger.info("MLflow tracking store: %s", uri)


class TrackingVariableHook:
    """Put ``$MLFLOW_TRACKING_URI`` back as the user left it once kedro-mlflow has set up the session.

    ``mlflow.set_tracking_uri`` (called by kedro-mlflow) also exports the variable for the whole
    process, so a later session in the same process -- a notebook's ``%reload_kedro --env=smoke``,
    the tests -- would otherwise take this session's store for a choice of the user. This session
    keeps its store (MLflow's in-process setting is untouched).
    """

    def __init__(self, store_hook: TrackingStoreHook) -> None:
        self.store_hook = store_hook

    @hook_impl(trylast=True)
    def after_context_created(self, context: KedroContext) -> None:
        """Restore the variable remembered by :class:`TrackingStoreHook` before this session."""
        before = self.store_hook.variable_before
        if before is None:
            os.environ.pop(TRACKING_URI_ENV, None)
        else:
            os.environ[TRACKING_URI_ENV] = before
