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


# --------------------------------------------------------------------------------------------
# Command line: ``python -m llm_caption.registry list`` / ``promote NAME --version N [--force]``
# --------------------------------------------------------------------------------------------

class RegistryError(Exception):
    """A registry request that cannot be served (unknown model or version, refused promotion)."""


def default_tracking_uri(project_dir: str = ".") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``server.mlflow_tracking_uri`` of the project's ``conf/base/mlflow.yml``."""
    import os
    from pathlib import Path

    import yaml

    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    conf = Path(project_dir) / "conf" / "base" / "mlflow.yml"
    if conf.is_file():
        uri = ((yaml.safe_load(conf.read_text(encoding="utf-8")) or {}).get("server") or {}).get("mlflow_tracking_uri")
        if uri:
            return uri
    return "sqlite:///mlruns/mlflow.db"


def _registered_model(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models())
        raise RegistryError(f"Unknown model {name!r}; registered models: {known or 'none'}") from None


def _model_version(client: MlflowClient, name: str, version: str):
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        known = sorted((int(v.version) for v in client.search_model_versions(f"name='{name}'")))
        raise RegistryError(f"Model {name!r} has no version {version}; versions: {known or 'none'}") from None


def list_models(client: MlflowClient | None = None) -> list[dict]:
    """Every registered model with its aliases and versions (metric, split, run), newest version last."""
    client = client or MlflowClient()
    out = []
    for model in sorted(client.search_registered_models(), key=lambda m: m.name):
        versions = sorted(client.search_model_versions(f"name='{model.name}'"), key=lambda v: int(v.version))
        aliases = dict(model.aliases or {})
        out.append({
            "name": model.name,
            "aliases": aliases,
            "versions": [{
                "version": str(v.version),
                "aliases": sorted(a for a, ver in aliases.items() if str(ver) == str(v.version)),
                "metric_name": v.tags.get("metric_name", ""),
                "metric_value": v.tags.get("metric_value", ""),
                "greater_is_better": v.tags.get("greater_is_better", ""),
                "eval_split": v.tags.get("eval_split", ""),
                "run_id": v.run_id or "",
            } for v in versions],
        })
    return out


def format_listing(models: list[dict]) -> str:
    """Human-readable listing for ``list``."""
    if not models:
        return "No registered models."
    lines = []
    for model in models:
        aliases = ", ".join(f"{a} -> v{v}" for a, v in sorted(model["aliases"].items())) or "none"
        lines.append(f"{model['name']}  (aliases: {aliases})")
        for v in model["versions"]:
            direction = {"true": "higher is better", "false": "lower is better"}.get(v["greater_is_better"], "")
            tag = f" [{', '.join(v['aliases'])}]" if v["aliases"] else ""
            metric = f"{v['metric_name']}={float(v['metric_value']):.4f}" if v["metric_value"] else "no metric recorded"
            lines.append(f"  v{v['version']}{tag}  {metric} ({direction}) split={v['eval_split'] or '?'} "
                         f"run={v['run_id'] or '?'}")
    return "\n".join(lines)


def promote(name: str, version: str, force: bool = False, client: MlflowClient | None = None) -> PromotionDecision:
    """Move ``champion`` of ``name`` to ``version`` if its recorded metric is at least the champion's.

    Refused (``RegistryError``) when the version is worse, was measured on another split or has
    no recorded metric -- unless ``force``, which is logged and written as tag ``forced_promotion``.
    """
    client = client or MlflowClient()
    _registered_model(client, name)
    candidate = _model_version(client, name, version)
    champion = current_champion(name, client)
    if champion is not None and str(champion.version) == str(candidate.version):
        return PromotionDecision(name, str(candidate.version), False, f"v{candidate.version} already holds {CHAMPION}")
    refusal = None
    if champion is None:
        reason = "no champion yet"
    elif "metric_value" not in candidate.tags or "metric_value" not in champion.tags:
        refusal = f"v{candidate.version} or champion v{champion.version} has no recorded metric"
    elif candidate.tags.get("eval_split") != champion.tags.get("eval_split"):
        refusal = (f"v{candidate.version} was measured on split {candidate.tags.get('eval_split')}, champion "
                   f"v{champion.version} on {champion.tags.get('eval_split')}: the figures are not comparable")
    else:
        new, old = float(candidate.tags["metric_value"]), float(champion.tags["metric_value"])
        greater = candidate.tags.get("greater_is_better", "true") == "true"
        metric = candidate.tags.get("metric_name", "metric")
        at_least = new >= old if greater else new <= old
        comparison = (f"{metric} {new:.4f} vs champion v{champion.version} {old:.4f} "
                      f"({'higher' if greater else 'lower'} is better)")
        if at_least:
            reason = comparison + ": at least as good"
        else:
            refusal = comparison + ": worse"
    if refusal is not None:
        if not force:
            raise RegistryError(f"Refusing to promote {name} v{candidate.version}: {refusal}. Use --force to override.")
        logger.warning("Forced promotion of %s v%s to %s: %s", name, candidate.version, CHAMPION, refusal)
        client.set_model_version_tag(name, candidate.version, "forced_promotion", refusal[:500])
        reason = f"forced: {refusal}"
    client.set_registered_model_alias(name, CHAMPION, candidate.version)
    logger.info("%s v%s is now %s (%s)", name, candidate.version, CHAMPION, reason)
    return PromotionDecision(name, str(candidate.version), True, reason)


def main(argv: list[str] | None = None) -> int:
    """``list`` | ``promote NAME --version N [--force]`` on the project's MLflow registry; returns the exit code."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m llm_caption.registry",
                                     description="List registered models; move the champion alias when it is earned.")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: MLFLOW_TRACKING_URI or conf/base/mlflow.yml of the current project)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="models, versions, aliases and key metric")
    prom = sub.add_parser("promote", help=f"move the {CHAMPION!r} alias to a version")
    prom.add_argument("name", help="registered model name, e.g. image-captioner or persian-chat-adapter")
    prom.add_argument("--version", required=True, help="version number to promote")
    prom.add_argument("--force", action="store_true", help="promote even if the version's metric is worse (logged)")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    uri = args.tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        if args.command == "list":
            print(format_listing(list_models(client)))
        else:
            decision = promote(args.name, args.version, args.force, client)
            state = "promoted" if decision.promoted else "unchanged"
            print(f"{decision.name} v{decision.version}: {state} ({decision.reason})")
    except RegistryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
