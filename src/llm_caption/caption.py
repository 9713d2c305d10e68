"""Caption images with the registered captioner.

    python -m llm_caption.caption path/to/image.jpg [more.jpg ...]
        [--model-uri models:/image-captioner@champion] [--tracking-uri sqlite:///mlruns/mlflow.db]

The tracking URI defaults to the store ``kedro run`` uses (``$MLFLOW_TRACKING_URI``, else the project's
``mlflow.yml``: ``sqlite:///mlruns/mlflow.db``; ``--env smoke``: ``sqlite:///mlruns/smoke.db``).
Prints one line per image: the file name, a tab and the caption (or the error for that image).
The files are read here and their bytes sent to the model, as a client of the served model
would send them (the model itself never opens a path).

Start-up is most of a call's time, so the command does no more than it must: MLflow and torch are
imported only once the arguments are valid, a ``models:/name@alias`` (or ``/version``) URI in a local
sqlite store is resolved with one read-only query of the store's registry tables and the captioner
built from the files of its folder where they lie (no ``mlflow.pyfunc``, no unpickling, no tracking or
registry store set-up, no artifact copy; another kind of model there, or another store, goes through
``mlflow.pyfunc.load_model``), and the installed-package scan that compares the model's pip requirements
with this environment is skipped (the command runs in the project's own environment, whose pins the
requirements were written from).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import logging
import os
import sys
from pathlib import Path

DEFAULT_MODEL_URI = "models:/image-captioner@champion"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llm_caption.caption", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="image files to caption")
    parser.add_argument("--model-uri", default=DEFAULT_MODEL_URI, help=f"MLflow model URI (default {DEFAULT_MODEL_URI})")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking/registry store (default: the one `kedro run --env ENV` uses)")
    parser.add_argument("--env", default=os.environ.get("KEDRO_ENV"),
                        help="Kedro environment whose store to use, e.g. smoke (default: $KEDRO_ENV or base)")
    return parser.parse_args(argv)


def read_image_file(path: str) -> tuple[str | None, str]:
    """``(base64 bytes, "")`` of a local file, or ``(None, error)`` when it cannot be read."""
    try:
        return base64.b64encode(Path(path).read_bytes()).decode("ascii"), ""
    except OSError as exc:
        return None, f"cannot read the file: {exc.strerror or exc}"


def sqlite_file(store_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store URI, or None for any other store."""
    if not store_uri.startswith("sqlite:///"):
        return None
    return Path(store_uri[len("sqlite:///"):].split("?", 1)[0])


def local_registered_model(store_uri: str, model_uri: str) -> str | None:
    """The local folder of the model version that ``model_uri`` (``models:/name@alias`` or ``models:/name/N``)
    names in the sqlite store ``store_uri``, read with one read-only query; None when that shortcut does not
    apply (another store or URI form, a version that is not READY, files elsewhere than on this disk), and
    MLflow then resolves the URI itself."""
    import sqlite3
    from urllib.parse import unquote, urlparse

    db = sqlite_file(store_uri)
    if db is None or not db.is_file() or not model_uri.startswith("models:/"):
        return None
    ref = model_uri[len("models:/"):]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version_query = "SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?"
        version_args: tuple = (name, alias)
    elif ref.count("/") == 1 and ref.rsplit("/", 1)[1].isdigit():
        name, number = ref.rsplit("/", 1)
        version_query, version_args = "SELECT ?", (int(number),)
    else:
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            versions = con.execute(version_query, version_args).fetchall()
            if len(versions) != 1:
                return None
            rows = con.execute("SELECT storage_location, status FROM model_versions WHERE name = ? AND version = ?",
                               (name, int(versions[0][0]))).fetchall()
    except (sqlite3.Error, ValueError):
        return None
    if len(rows) != 1 or rows[0][1] != "READY" or not rows[0][0]:
        return None
    location = str(rows[0][0])
    if location.startswith("file://"):
        location = unquote(urlparse(location).path)
    elif "://" in location:
        return None
    folder = Path(location)
    return str(folder) if (folder / "MLmodel").is_file() else None


class LocalCaptioner:
    """A captioner loaded from its local folder without MLflow, answering as the pyfunc model would."""

    def __init__(self, predictor) -> None:
        self.predictor = predictor

    def predict(self, frame):
        return self.predictor.predict(None, frame)

    def unwrap_python_model(self):
        return self.predictor


def load_registered(store_uri: str, model_uri: str):
    """The model of ``model_uri``: a captioner in a local folder of a local sqlite store is loaded from its
    artifacts directly (:func:`llm_caption.captioning.pyfunc.load_local`, no MLflow import); anything else
    through MLflow's registry. The pip-requirement scan of the environment is skipped (see the module doc)."""
    folder = local_registered_model(store_uri, model_uri)
    if folder is not None:
        from .captioning.pyfunc import load_local

        predictor = load_local(folder)
        if predictor is not None:
            return LocalCaptioner(predictor)
    import mlflow

    from .registry import use_store

    use_store(store_uri)
    if folder is None:  # not found in a local store: a clear error if it does not exist
        check_model_uri(model_uri)
    return mlflow.pyfunc.load_model(folder or model_uri, suppress_warnings=True)


def check_model_uri(uri: str) -> None:
    """Fail with a clear message when a ``models:/name@alias`` or ``models:/name/version`` URI does not resolve in
    the registry MLflow is set to."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not uri.startswith("models:/"):
        return
    ref = uri[len("models:/"):]
    client = MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, version = ref.split("/", 1)
            client.get_model_version(name, version)
        elif not ref.startswith("m-"):
            client.get_registered_model(ref)
    except MlflowException as error:
        raise SystemExit(f"error: model URI {uri!r} does not exist in the MLflow store "
                         f"{client._registry_uri}: {error.message.splitlines()[0]}") from None


def mlflow_refusal() -> type[Exception]:
    """The exception type with which a model loaded through MLflow refuses a request (``MlflowException``)."""
    from mlflow.exceptions import MlflowException

    return MlflowException


def rows_per_request(model) -> int:
    """How many images the loaded model takes per call (its serving limit; 1 when it does not say)."""
    try:
        return int(model.unwrap_python_model().limits.max_rows)
    except AttributeError:
        return 1


def caption_files(model, paths: list[str]) -> list[tuple[str, str]]:
    """``(caption, error)`` per file, in order; files are read a request at a time, and those that cannot be
    read are never sent to the model."""
    import pandas as pd

    results: list[tuple[str, str]] = []
    step = rows_per_request(model)
    for lo in range(0, len(paths), step):
        chunk = [read_image_file(p) for p in paths[lo: lo + step]]
        answers = [("", error) for _, error in chunk]
        sent = [i for i, (data, _) in enumerate(chunk) if data is not None]
        if sent:
            out = model.predict(pd.DataFrame({"image": [chunk[i][0] for i in sent]}))
            for i, caption, error in zip(sent, out["caption"], out["error"]):
                answers[i] = (caption, error.split(": ", 1)[1] if error.startswith("row ") else error)
        results += answers
    return results


def main(argv: list[str] | None = None) -> int:
    """Load the model, caption the images, print the captions; exit status 1 if any image failed."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from .tracking import reachable_store_uri

    uri = reachable_store_uri(args.tracking_uri, args.env)
    model = load_registered(uri, args.model_uri)
    failed = False
    for path, (caption, error) in zip(args.images, caption_files(model, list(args.images))):
        if error:
            failed = True
            print(f"{path}\tERROR: {error}")
        else:
            print(f"{path}\t{caption}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
