"""Caption images with the registered captioner.

    python -m llm_caption.caption path/to/image.jpg [more.jpg ...]
        [--model-uri models:/image-captioner@champion] [--tracking-uri sqlite:///mlruns/mlflow.db]

The tracking URI defaults to the store ``kedro run`` uses (``$MLFLOW_TRACKING_URI``, else the project's
``mlflow.yml``: ``sqlite:///mlruns/mlflow.db``; ``--env smoke``: ``sqlite:///mlruns/smoke.db``).
Prints one line per image: the file name, a tab and the caption (or the error for that image).
The files are read here and their bytes sent to the model, as a client of the served model
would send them (the model itself never opens a path).
"""

from __future__ import annotations

import argparse
import base64
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
    import mlflow

    from .tracking import reachable_store_uri

    uri = reachable_store_uri(args.tracking_uri, args.env)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model(args.model_uri)
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
