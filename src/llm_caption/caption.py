"""Caption images with the registered captioner.

    python -m llm_caption.caption path/to/image.jpg [more.jpg ...]
        [--model-uri models:/image-captioner@champion] [--tracking-uri sqlite:///mlruns/mlflow.db]

The tracking URI defaults to ``$MLFLOW_TRACKING_URI`` or the project's store ``sqlite:///mlruns/mlflow.db``.
Prints one line per image: the file name, a tab and the caption (or the error for that image).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

DEFAULT_MODEL_URI = "models:/image-captioner@champion"
DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llm_caption.caption", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="image files to caption")
    parser.add_argument("--model-uri", default=DEFAULT_MODEL_URI, help=f"MLflow model URI (default {DEFAULT_MODEL_URI})")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI,
                        help="MLflow tracking/registry store (default $MLFLOW_TRACKING_URI or "
                             f"{DEFAULT_TRACKING_URI})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load the model, caption the images, print the captions; exit status 1 if any image failed."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_registry_uri(args.tracking_uri)
    model = mlflow.pyfunc.load_model(args.model_uri)
    paths = [os.path.abspath(p) for p in args.images]
    out = model.predict(pd.DataFrame({"image": paths}))
    failed = False
    for path, caption, error in zip(args.images, out["caption"], out["error"]):
        if error:
            failed = True
            print(f"{path}\tERROR: {error}")
        else:
            print(f"{path}\t{caption}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
