"""Trains the captioners of ``train_architectures`` for an epoch on smoke-sized data, one process or one rank
of several (``torchrun``). Inputs: a setup JSON naming the captions (parquet), vocabulary (JSON), feature
grids (``torch.save``), parameters and the output folder. Every rank writes ``rank<R>.pt``: its tables and
best weights. MLflow: the store of ``$MLFLOW_TRACKING_URI``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(setup_path: str) -> None:
    import pandas as pd

    from llm_caption import distributed
    from llm_caption.captioning.datasets import FeatureSet
    from llm_caption.captioning.experiment import train_architectures
    from llm_caption.captioning.features import CachedFeatures

    setup = json.loads(Path(setup_path).read_text(encoding="utf-8"))
    torch.set_num_threads(1)
    distributed.ensure_process_group()
    captions = pd.read_parquet(setup["captions"])
    vocab = json.loads(Path(setup["vocab"]).read_text(encoding="utf-8"))
    grids = torch.load(setup["features"], weights_only=True)
    cached = CachedFeatures(grids["features"], list(grids["image_ids"]), (2, 2), "smoke-grids", False, 0.01)
    info = {"key": "smoke-grids", "channels": int(grids["features"].shape[-1]), "grid_hw": [2, 2],
            "seconds_per_image": 0.01, "encoder": "random-grids", "views": int(grids["features"].shape[1])}
    tables = train_architectures(captions, vocab, FeatureSet(cached, info), setup["params"], seed=3)
    out = Path(setup["out"])
    torch.save({"results": tables["caption_model_results"].to_dict(orient="list"),
                "history": tables["caption_loss_history"].to_dict(orient="list"),
                "models": {a: m["model"] for a, m in tables["caption_models"].items()},
                "world_size": distributed.world_size()}, out / f"rank{distributed.rank()}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
