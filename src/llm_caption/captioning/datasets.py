"""Catalog datasets of the caption study: the feature cache and the trained captioners travel as objects.

:class:`FeatureCacheDataset` saves the description of a feature-cache entry (JSON) and loads the
entry itself (:class:`FeatureSet`: the fp16 grids and their description), so no node reopens the
cache from a pointer. :class:`CaptionModelsDataset` holds each architecture's best weights as
``<path>/<architecture>/best.pt`` and loads them back (``torch.load(weights_only=True)``). Both are
declared in ``catalog_caption_training.yml`` with paths from ``${globals:data_root}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from kedro.io import AbstractDataset, DatasetError

from .features import CachedFeatures, FeatureCache
from .epochs import save_atomic


@dataclass
class FeatureSet:
    """A feature-cache entry as the experiment uses it: the grids (``cached``) and their description."""

    cached: CachedFeatures
    info: dict[str, Any]  # root, key, n_images, grid_hw, channels, views, built, seconds_per_image, encoder, cut...
    cut: CachedFeatures | None = None  # the activations at the encoder's cut (encoder_top.cut_stage), same rows

    @property
    def channels(self) -> int:
        return int(self.info["channels"])

    def rows(self, image_ids: list[str], cut: bool = False) -> torch.Tensor:
        """Feature rows (view 0) of ``image_ids``: grids, or with ``cut`` the cut's activations."""
        source = self.cached
        if cut:
            if self.cut is None:
                raise ValueError("this feature cache has no cut activations (caption_training.encoder_top.cut_stage)")
            source = self.cut
        index = source.index_of()
        return source.features[torch.tensor([index[i] for i in image_ids]), 0]


class FeatureCacheDataset(AbstractDataset[FeatureSet, FeatureSet]):
    """``filepath``: the JSON description of the entry; the grids stay in the cache folder it names."""

    def __init__(self, *, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = PurePosixPath(filepath)
        self.metadata = metadata

    def load(self) -> FeatureSet:
        path = Path(self._filepath)
        if not path.is_file():
            raise DatasetError(f"caption_feature_cache: {path} does not exist; run the node "
                               f"build_caption_feature_cache first")
        info = json.loads(path.read_text())
        cache = FeatureCache(info["root"])
        cut = cache.load(info["cut"]["key"]) if info.get("cut") else None
        return FeatureSet(cache.load(info["key"]), info, cut)

    def save(self, data: FeatureSet) -> None:
        path = Path(self._filepath)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data.info, indent=2, default=str))
        os.replace(tmp, path)

    def _exists(self) -> bool:
        return Path(self._filepath).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}


class CaptionModelsDataset(AbstractDataset[dict, dict]):
    """``{architecture: {"model": state_dict, "epoch": int, "val_bleu4": float}}`` as ``<path>/<arch>/best.pt``."""

    FILE = "best.pt"

    def __init__(self, *, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = PurePosixPath(path)
        self.metadata = metadata

    def load(self) -> dict[str, dict[str, Any]]:
        root = Path(self._path)
        files = sorted(root.glob(f"*/{self.FILE}")) if root.is_dir() else []
        if not files:
            raise DatasetError(f"caption_models: no trained captioner under {root}; run train_caption_models first")
        return {f.parent.name: torch.load(f, map_location="cpu", weights_only=True) for f in files}

    def save(self, data: dict[str, dict[str, Any]]) -> None:
        for arch, best in data.items():
            folder = Path(self._path) / arch
            folder.mkdir(parents=True, exist_ok=True)
            save_atomic(dict(best), folder / self.FILE)

    def _exists(self) -> bool:
        root = Path(self._path)
        return root.is_dir() and any(root.glob(f"*/{self.FILE}"))

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
