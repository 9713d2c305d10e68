"""MLflow model registry helpers: register a version and move the ``champion`` alias only when it is earned.

Every registered version carries tags that make promotion decisions auditable:

* ``metric_name`` / ``metric_value`` -- the figure the version is judged on
  (e.g. ``eval_loss`` for ``persian-chat-adapter``, ``val_bleu4`` for ``image-captioner``);
* ``greater_is_better`` -- direction of that figure;
* ``eval_split`` -- a fingerprint of the split the figure was measured on;
* ``champion_decision`` -- what happened to the alias when the version was registered, and why.

The alias moves to a new version only when that version beats the current champion on the
*same* split and metric. A version measured on another split (a smoke run, another data set)
is registered and tagged but never takes an existing champion by itself: the figures are not
comparable, so only an explicit ``promote --force`` moves the alias across splits. A version
without a finite metric (NaN, missing) never takes the alias; a champion without one never
blocks a version that has one.

Reading the champion, deciding and moving the alias happen under a lock file next to a sqlite
store, so two runs registering at once cannot both take the alias; on other stores the alias is
read back after it is set and a run that lost it reports so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .tracking import sqlite_path

logger = logging.getLogger(__name__)

CHAMPION = "champion"
DECISION_TAG = "champion_decision"


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


class RegistryError(Exception):
    """A registry request that cannot be served (unknown model or version, refused promotion, busy lock)."""


def _is_better(new: float, old: float, greater_is_better: bool) -> bool:
    return new > old if greater_is_better else new < old


def finite_metric(value: object) -> float | None:
    """``value`` as a float when it is a finite number (or a string of one), else ``None`` (NaN, inf, missing)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def current_champion(name: str, client: MlflowClient | None = None):
    """The ModelVersion holding the ``champion`` alias, or ``None`` when there is none yet."""
    client = client or MlflowClient()
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


@contextlib.contextmanager
def registry_lock(uri: str, timeout_s: float = 120.0) -> Iterator[Path | None]:
    """Hold an exclusive lock file next to a sqlite store (``<db>.registry.lock``) while the body runs.

    Yields the lock file, or ``None`` for stores that are not a local sqlite file (nothing to lock
    there; callers read the alias back instead). Raises ``RegistryError`` naming the lock file when
    another process holds it for longer than ``timeout_s``.
    """
    db = sqlite_path(uri)
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks; the read-back check still applies
        fcntl = None
    if db is None or fcntl is None:
        yield None
        return
    lock_path = db.with_name(db.name + ".registry.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(lock_path, "a+b") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegistryError(f"registry lock {lock_path} is held by another process for over "
                                        f"{timeout_s:.0f}s; retry, or delete the file if no run is registering")
                time.sleep(0.05)
        try:
            yield lock_path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _not_comparable(champion, metric_name: str, eval_split: str) -> str | None:
    """Why the champion's figure cannot be compared with ``metric_name`` on ``eval_split`` (``None``: comparable)."""
    old_metric, old_split = champion.tags.get("metric_name"), champion.tags.get("eval_split")
    if old_metric != metric_name:
        return f"champion v{champion.version} is judged on {old_metric or 'no metric'}, this version on {metric_name}"
    if old_split != eval_split:
        return (f"measured on split {eval_split}, champion v{champion.version} on split {old_split or '?'}: "
                f"the figures are not comparable")
    return None


def decide(champion, metric_name: str, metric_value: object, greater_is_better: bool,
           eval_split: str) -> tuple[bool, str]:
    """Whether a new version with ``metric_value`` on ``eval_split`` takes the alias from ``champion``, and why."""
    new = finite_metric(metric_value)
    if new is None:
        return False, f"{metric_name} is {metric_value!r}, not a finite number: a version without one never takes {CHAMPION}"
    if champion is None:
        return True, "no champion yet"
    old = finite_metric(champion.tags.get("metric_value"))
    if old is None:
        return True, (f"champion v{champion.version} has no finite metric "
                      f"({champion.tags.get('metric_value', 'missing')!r}): replaced")
    why_not = _not_comparable(champion, metric_name, eval_split)
    if why_not is not None:
        return False, f"{why_not}; {CHAMPION} stays (promote across splits only with `promote --force`)"
    better = _is_better(new, old, greater_is_better)
    direction = "higher" if greater_is_better else "lower"
    return better, (f"{metric_name} {new:.4f} vs champion v{champion.version} {old:.4f} "
                    f"({direction} is better): {'better' if better else 'not better, alias stays'}")


def _claim_alias(client: MlflowClient, name: str, version: str) -> str | None:
    """Set the alias to ``version`` and read it back; returns the version that holds it afterwards."""
    client.set_registered_model_alias(name, CHAMPION, version)
    holder = current_champion(name, client)
    return None if holder is None else str(holder.version)


def register_and_promote(
    model_uri: str,
    name: str,
    metric_name: str,
    metric_value: float,
    greater_is_better: bool,
    eval_split: str,
    extra_tags: dict[str, str] | None = None,
) -> PromotionDecision:
    """Register ``model_uri`` as a new version of ``name`` and move ``champion`` to it if it earned it.

    The decision (and its reason) is written on the version as tag ``champion_decision`` and logged;
    a version kept from the alias is logged as a warning.
    """
    client = MlflowClient()
    tags = {
        "metric_name": metric_name,
        "metric_value": repr(float(metric_value)) if finite_metric(metric_value) is not None else str(metric_value),
        "greater_is_better": str(bool(greater_is_better)).lower(),
        "eval_split": eval_split,
        **(extra_tags or {}),
    }
    version = str(mlflow.register_model(model_uri, name, tags=tags).version)
    with registry_lock(mlflow.get_registry_uri()):
        champion = current_champion(name, client)
        promoted, reason = decide(champion, metric_name, metric_value, greater_is_better, eval_split)
        if promoted:
            holder = _claim_alias(client, name, version)
            if holder != version:
                promoted, reason = False, f"another registration took {CHAMPION} at the same time (v{holder})"
        client.set_model_version_tag(name, version, DECISION_TAG,
                                     f"{'promoted' if promoted else 'not promoted'}: {reason}"[:5000])
    level = logging.INFO if promoted else logging.WARNING
    logger.log(level, "Registered %s v%s; %s %s: %s", name, version, CHAMPION,
               "moved" if promoted else "unchanged", reason)
    return PromotionDecision(name, version, promoted, reason)


# --------------------------------------------------------------------------------------------
# Command line: ``python -m llm_caption.registry list`` / ``promote NAME --version N [--force]``
# --------------------------------------------------------------------------------------------

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
    """Every registered model with its aliases and versions (metric, split, run, decision), newest version last."""
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
                "decision": v.tags.get(DECISION_TAG, ""),
                "forced_promotion": v.tags.get("forced_promotion", ""),
            } for v in versions],
        })
    return out


def showcase_versions(name: str, group_tag: str, client: MlflowClient | None = None) -> list[dict]:
    """The versions of ``name`` worth showing side by side: every version holding an alias and the newest version
    of each value of tag ``group_tag`` (e.g. ``architecture``), champion first, then newest first. Each: version,
    aliases, champion, group (the tag's value), metric_name, metric_value, model_uri (``models:/name/N``).
    Empty when the model is not registered."""
    client = client or MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        return []
    aliases = dict(model.aliases or {})
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: -int(v.version))
    newest: dict[str, str] = {}
    for v in versions:
        newest.setdefault(v.tags.get(group_tag, ""), str(v.version))
    shown = []
    for v in versions:
        held = sorted(a for a, ver in aliases.items() if str(ver) == str(v.version))
        if held or newest.get(v.tags.get(group_tag, "")) == str(v.version):
            shown.append({"version": str(v.version), "aliases": held, "champion": CHAMPION in held,
                          "group": v.tags.get(group_tag, ""), "metric_name": v.tags.get("metric_name", ""),
                          "metric_value": finite_metric(v.tags.get("metric_value")), "run_id": v.run_id or "",
                          "model_uri": f"models:/{name}/{v.version}"})
    return sorted(shown, key=lambda v: (not v["champion"], -int(v["version"])))


def study_methods(model_name: str, alias: str = CHAMPION, client: MlflowClient | None = None) -> list[dict]:
    """The methods of the study that produced ``model_name@alias``: the runs beside the registered version's run
    under the same pipeline run, each trained one with its ``adapter`` artifact. Each: method, run_id,
    bits_per_char, chrf_pp, adapter_uri (``runs:/ID/adapter``). Empty when there is no such version."""
    client = client or MlflowClient()
    try:
        version = client.get_model_version_by_alias(model_name, alias)
        run = client.get_run(version.run_id)
    except MlflowException:
        return []
    parent = run.data.tags.get("mlflow.parentRunId")
    runs = (client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=200)
            if parent else [run])
    methods = []
    for child in sorted(runs, key=lambda r: r.info.start_time or 0):
        method = child.data.tags.get("llm_caption.method")
        if not method or not [a for a in client.list_artifacts(child.info.run_id) if a.path == "adapter"]:
            continue
        metrics = child.data.metrics
        methods.append({"method": method, "run_id": child.info.run_id,
                        "bits_per_char": metrics.get("bits_per_char", math.nan),
                        "chrf_pp": metrics.get("chrf_pp", math.nan),
                        "adapter_uri": f"runs:/{child.info.run_id}/adapter"})
    return methods


def use_store(uri: str) -> None:
    """Point MLflow's tracking and registry at the store ``uri`` (for the helpers here that use the current one)."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


def download(uri: str, dst: str | Path | None = None) -> Path:
    """The local copy of an artifact URI (``runs:/...``, ``models:/...``): MLflow's download, a path on disk."""
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=None if dst is None else str(dst)))


def _format_metric(version: dict) -> str:
    if not version["metric_value"]:
        return "no metric recorded"
    value = finite_metric(version["metric_value"])
    shown = f"{value:.4f}" if value is not None else version["metric_value"]
    return f"{version['metric_name']}={shown}"


def format_listing(models: list[dict]) -> str:
    """Human-readable listing for ``list``: one line per version, then why it holds the alias or not."""
    if not models:
        return "No registered models."
    lines = []
    for model in models:
        aliases = ", ".join(f"{a} -> v{v}" for a, v in sorted(model["aliases"].items())) or "none"
        lines.append(f"{model['name']}  (aliases: {aliases})")
        for v in model["versions"]:
            direction = {"true": "higher is better", "false": "lower is better"}.get(v["greater_is_better"], "")
            tag = f" [{', '.join(v['aliases'])}]" if v["aliases"] else ""
            lines.append(f"  v{v['version']}{tag}  {_format_metric(v)} ({direction}) split={v['eval_split'] or '?'} "
                         f"run={v['run_id'] or '?'}")
            if v["decision"]:
                lines.append(f"      at registration: {v['decision']}")
            if v["forced_promotion"]:
                lines.append(f"      forced promotion: {v['forced_promotion']}")
    return "\n".join(lines)


def _promotion_refusal(candidate, champion) -> str | None:
    """Why ``candidate`` may not replace ``champion`` (``None``: none yet) without ``--force`` (``None``: it may)."""
    new = finite_metric(candidate.tags.get("metric_value"))
    if new is None:
        return (f"v{candidate.version} has no finite metric "
                f"({candidate.tags.get('metric_value', 'missing')!r})")
    old = None if champion is None else finite_metric(champion.tags.get("metric_value"))
    if old is None:
        return None
    why_not = _not_comparable(champion, candidate.tags.get("metric_name", ""), candidate.tags.get("eval_split", ""))
    if why_not is not None:
        return f"v{candidate.version} was {why_not}" if why_not.startswith("measured") else why_not
    greater = candidate.tags.get("greater_is_better", "true") == "true"
    if (new >= old) if greater else (new <= old):
        return None
    return (f"{candidate.tags.get('metric_name', 'metric')} {new:.4f} vs champion v{champion.version} {old:.4f} "
            f"({'higher' if greater else 'lower'} is better): worse")


def _promotion_reason(candidate, champion) -> str:
    """Why an unforced promotion of ``candidate`` over ``champion`` is allowed."""
    if champion is None:
        return "no champion yet"
    old = finite_metric(champion.tags.get("metric_value"))
    if old is None:
        return f"champion v{champion.version} has no finite metric: replaced"
    return (f"{candidate.tags.get('metric_name', 'metric')} {float(candidate.tags['metric_value']):.4f} vs champion "
            f"v{champion.version} {old:.4f}: at least as good")


def _registry_uri(client: MlflowClient) -> str:
    """The registry store ``client`` talks to."""
    return str(getattr(client, "_registry_uri", None) or mlflow.get_registry_uri())


def promote(name: str, version: str, force: bool = False, client: MlflowClient | None = None) -> PromotionDecision:
    """Move ``champion`` of ``name`` to ``version`` if its recorded metric is at least the champion's.

    Refused (``RegistryError``) when the version is worse, was measured on another split or has
    no finite metric -- unless ``force``, which is logged and written as tag ``forced_promotion``.
    A champion without a finite metric never blocks a promotion.
    """
    client = client or MlflowClient()
    _registered_model(client, name)
    candidate = _model_version(client, name, version)
    with registry_lock(_registry_uri(client)):
        champion = current_champion(name, client)
        if champion is not None and str(champion.version) == str(candidate.version):
            return PromotionDecision(name, str(candidate.version), False,
                                     f"v{candidate.version} already holds {CHAMPION}")
        refusal = _promotion_refusal(candidate, champion)
        if refusal is not None:
            if not force:
                raise RegistryError(f"Refusing to promote {name} v{candidate.version}: {refusal}. "
                                    f"Use --force to override.")
            logger.warning("Forced promotion of %s v%s to %s: %s", name, candidate.version, CHAMPION, refusal)
            client.set_model_version_tag(name, candidate.version, "forced_promotion", refusal[:500])
            reason = f"forced: {refusal}"
        else:
            reason = _promotion_reason(candidate, champion)
        client.set_registered_model_alias(name, CHAMPION, candidate.version)
    logger.info("%s v%s is now %s (%s)", name, candidate.version, CHAMPION, reason)
    return PromotionDecision(name, str(candidate.version), True, reason)


def main(argv: list[str] | None = None) -> int:
    """``list`` | ``promote NAME --version N [--force]`` on the project's MLflow registry; returns the exit code."""
    import argparse
    import os
    import sys

    from .tracking import reachable_store_uri

    parser = argparse.ArgumentParser(prog="python -m llm_caption.registry",
                                     description="List registered models; move the champion alias when it is earned.")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: the store `kedro run --env ENV` uses: MLFLOW_TRACKING_URI, "
                             "else conf/<env>/mlflow.yml over conf/base/mlflow.yml)")
    parser.add_argument("--env", default=os.environ.get("KEDRO_ENV"),
                        help="Kedro environment whose store to use, e.g. smoke (default: $KEDRO_ENV or base/local)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="models, versions, aliases, key metric and why each version holds the alias or not")
    prom = sub.add_parser("promote", help=f"move the {CHAMPION!r} alias to a version")
    prom.add_argument("name", help="registered model name, e.g. image-captioner or persian-chat-adapter")
    prom.add_argument("--version", required=True, help="version number to promote")
    prom.add_argument("--force", action="store_true",
                      help="promote even if the version is worse or was measured on another split (logged)")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    uri = reachable_store_uri(args.tracking_uri, args.env)
    # An explicit client, not mlflow.set_*_uri: those export MLFLOW_*_URI to the whole process.
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        if args.command == "list":
            print(f"Store: {uri}")
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
