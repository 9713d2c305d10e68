"""MLflow model registry helpers: register a version and move the ``champion`` alias only when it is earned.

Every registered version carries three tags that make promotion decisions auditable:

* ``metric_name`` / ``metric_value`` -- the figure the version is judged on
  (e.g. ``eval_loss`` for ``persian-chat-adapter``, ``val_bleu4`` for ``image-captioner``);
* ``greater_is_better`` -- direction of that figure;
* ``eval_split`` -- a fingerprint of the split the figure was measured on.

The alias moves to a new version when it beats the current champion on the *same*
split. When the champion was measured on another split the two figures are not
comparable; the new version then takes the alias (the newest data defines the task)
and the log says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

CHAMPION = "champion"


def split_fingerprint(items: Iterable[str]) -> str:
    """A short, order-independent fingerprint of a split (e.g. its image ids or conversation ids)."""
    digest = hashlib.sha256(json.dumps(sorted(map(str, items))).encode("utf-8")).hexdigest()
    return digest[:16]


@dataclass(frozen=True)
class PromotionDecision:
    """What happened to the alias when a version was registered."""

    name: str
    version: str
    promoted: bool
    reason: str


def _is_better(new: float, old: float, greater_is_better: bool) -> bool:
    return new > old if greater_is_better else new < old


def current_champion(name: str, client: MlflowClient | None = None):
    """The ModelVersion holding the ``champion`` alias, or ``None`` when there is none yet."""
    client = client or MlflowClient()
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def register_and_promote(
    model_uri: str,
    name: str,
    metric_name: str,
    metric_value: float,
    greater_is_better: bool,
    eval_split: str,
    extra_tags: dict[str, str] | None = None,
) -> PromotionDecision:
    """Register ``model_uri`` as a new version of ``name`` and move ``champion`` to it if it earned it."""
    client = MlflowClient()
    champion = current_champion(name, client)
    version = mlflow.register_model(model_uri, name)
    tags = {
        "metric_name": metric_name,
        "metric_value": repr(float(metric_value)),
        "greater_is_better": str(bool(greater_is_better)).lower(),
        "eval_split": eval_split,
        **(extra_tags or {}),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)

    if champion is None:
        promoted, reason = True, "no champion yet"
    elif champion.tags.get("eval_split") != eval_split:
        promoted = True
        reason = (f"champion v{champion.version} was measured on another split "
                  f"({champion.tags.get('eval_split')} vs {eval_split}); the new version takes the alias")
    else:
        old = float(champion.tags["metric_value"])
        promoted = _is_better(float(metric_value), old, greater_is_better)
        direction = "higher" if greater_is_better else "lower"
        reason = (f"{metric_name} {metric_value:.4f} vs champion v{champion.version} {old:.4f} "
                  f"({direction} is better): {'better' if promoted else 'not better, alias stays'}")
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    logger.info("Registered %s v%s; champion %s: %s", name, version.version,
                "moved" if promoted else "unchanged", reason)
    return PromotionDecision(name, str(version.version), promoted, reason)
