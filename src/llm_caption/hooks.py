"""Project hooks: check the MLflow store before anything runs, keep ``MLFLOW_TRACKING_URI`` as the user set it,
and run each node with the torch thread count its parameters ask for."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import click
from kedro.framework.hooks import hook_impl

from .distributed import is_main_process, rank
from .tracking import TRACKING_URI_ENV, TrackingStoreUnreachable, check_tracking_store, configured_tracking_uri

if TYPE_CHECKING:  # importing kedro.framework.context configures Kedro's logging: not at settings import
    from kedro.framework.context import KedroContext
    from kedro.io import DataCatalog
    from kedro.pipeline import Pipeline
    from kedro.pipeline.node import Node

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
        uri = configured_tracking_uri(context.config_loader["mlflow"])
        if not uri:
            return
        try:
            check_tracking_store(uri, self.timeout_s)
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


class TorchThreadsHook:
    """Run a node with ``torch_num_threads`` intra-op threads when a parameter block it reads names one, and
    put torch's thread count back afterwards (also when the node fails).

    One key for both studies (``caption_training.torch_num_threads``, ``llm_finetuning.torch_num_threads``);
    ``null`` leaves torch's default (all cores). 1 avoids thread thrashing on a shared CPU.
    """

    def __init__(self) -> None:
        self._before: dict[str, int] = {}

    @staticmethod
    def requested(inputs: dict[str, Any]) -> int | None:
        """The thread count asked for by the node's ``params:...`` inputs, if any."""
        for name, value in inputs.items():
            if name.startswith("params:") and isinstance(value, Mapping) and value.get("torch_num_threads"):
                return int(value["torch_num_threads"])
        return None

    @hook_impl
    def before_node_run(self, node: Node, inputs: dict[str, Any]) -> None:
        threads = self.requested(inputs)
        if threads:
            import torch

            self._before[node.name] = torch.get_num_threads()
            torch.set_num_threads(threads)

    def _restore(self, node: Node) -> None:
        before = self._before.pop(node.name, None)
        if before is not None:
            import torch

            torch.set_num_threads(before)

    @hook_impl
    def after_node_run(self, node: Node) -> None:
        self._restore(node)

    @hook_impl
    def on_node_error(self, node: Node) -> None:
        self._restore(node)


class SecondaryRankHook:
    """Under ``torchrun`` / ``accelerate launch``, keep what ranks other than 0 produce in memory.

    Every rank runs the pipeline (the training nodes need all of them); only rank 0 writes datasets, as
    it alone logs to MLflow (``settings.py`` disables kedro-mlflow's hook on the other ranks) and
    registers. On another rank every output of the pipeline becomes a ``MemoryDataset``, so later nodes
    still read it there and nothing reaches a file or a tracking store twice. One process: no change.
    """

    @hook_impl
    def before_pipeline_run(self, pipeline: Pipeline, catalog: DataCatalog) -> None:
        if is_main_process():
            return
        from kedro.io import MemoryDataset

        outputs = sorted(pipeline.all_outputs())
        for name in outputs:
            catalog[name] = MemoryDataset(copy_mode="assign")
        logger.info("Rank %d: %d pipeline outputs kept in memory (rank 0 writes them)", rank(), len(outputs))
