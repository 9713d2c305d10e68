"""A disk cache of encoder feature grids (fp16), computed once per image set and reused by every model.

The cache key is a hash of everything that determines the features: the encoder (name, grid
size, hash of its weights file), the transform spec, the number of views and the image list
(ids, paths and a BLAKE2b digest of each file's bytes, so a replaced image is noticed even when
its size and modification time are unchanged). Change any of them and a new entry is built; the
old one stays until deleted. An entry is a folder ``<root>/<key>/`` with ``features.npy``
(``[N, views, P, C]`` float16; view 1 is the horizontally flipped image) and ``meta.json``,
written to a temporary folder and moved into place; an entry that cannot be read is named in a
warning and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


DTYPES = ("float16", "float32")


@dataclass
class CachedFeatures:
    """Feature grids of an image list, row ``i`` for ``image_ids[i]``."""

    features: torch.Tensor  # [N, views, P, C] float16 (float32 for a cut cache stored so)
    image_ids: list[str]
    grid_hw: tuple[int, int]
    key: str
    built: bool  # True when this call computed the features, False when it read the cache
    seconds_per_image: float  # encoder time per image (measured when built)

    def index_of(self) -> dict[str, int]:
        return {image_id: i for i, image_id in enumerate(self.image_ids)}


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB; raises ``ValueError`` naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:  # PIL raises several types for broken files
        raise ValueError(f"cannot read image '{path}': {exc}") from exc


def file_digest(path: str | Path) -> str:
    """BLAKE2b (128-bit) hex digest of a file's bytes; ``"missing"`` when it does not exist."""
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
    except FileNotFoundError:
        return "missing"


def cache_key(encoder_fingerprint: Mapping[str, Any], transform_spec: Mapping[str, Any],
              image_ids: Sequence[str], image_paths: Sequence[str], views: int) -> str:
    """Hash of encoder, transform, views and image list (ids, paths, content digests)."""
    images = [(i, str(p), file_digest(p)) for i, p in zip(image_ids, image_paths)]
    payload = {"encoder": dict(encoder_fingerprint), "transform": dict(transform_spec), "views": views,
               "images": images}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


@torch.inference_mode()
def extract_features(encoder: torch.nn.Module, image_paths: Sequence[str],
                     transform: Callable[[Image.Image], torch.Tensor], batch_size: int = 32,
                     views: int = 1, desc: str = "features",
                     dtype: str = "float16") -> tuple[np.ndarray, tuple[int, int], float]:
    """Run the encoder over the images; returns ``[N, views, P, C]`` of ``dtype`` (float16 or float32), the grid
    size and seconds per image."""
    encoder.eval()
    out: np.ndarray | None = None
    grid_hw = (0, 0)
    start = time.perf_counter()
    for lo in tqdm(range(0, len(image_paths), batch_size), desc=desc, unit="batch"):
        paths = image_paths[lo: lo + batch_size]
        batch = torch.stack([transform(load_image(p)) for p in paths])
        grids = [encoder(batch)]
        if views > 1:
            grids.append(encoder(torch.flip(batch, dims=[3])))
        stacked = torch.stack([g.flatten(2).transpose(1, 2) for g in grids], dim=1)  # [b, V, P, C]
        if out is None:
            grid_hw = (grids[0].shape[2], grids[0].shape[3])
            out = np.empty((len(image_paths), *stacked.shape[1:]), dtype=np.dtype(dtype))
        out[lo: lo + len(paths)] = stacked.to(getattr(torch, dtype)).numpy()
    seconds = (time.perf_counter() - start) / max(1, len(image_paths) * views)
    if out is None:
        raise ValueError("no images to encode")
    return out, grid_hw, seconds


class FeatureCache:
    """Feature grids on disk under ``root``, one folder per cache key."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def exists(self, key: str) -> bool:
        return (self.path(key) / "meta.json").exists()

    def load(self, key: str) -> CachedFeatures:
        """Read an entry (no pickle); ``ValueError`` when its features do not match its ``meta.json``."""
        folder = self.path(key)
        meta = json.loads((folder / "meta.json").read_text())
        feats = torch.from_numpy(np.load(folder / "features.npy", allow_pickle=False))
        if list(feats.shape) != list(meta["shape"]) or feats.shape[0] != len(meta["image_ids"]):
            raise ValueError(f"{folder / 'features.npy'} has shape {list(feats.shape)}, meta.json says {meta['shape']}")
        return CachedFeatures(feats, meta["image_ids"], tuple(meta["grid_hw"]), key, False, meta["seconds_per_image"])

    def get_or_build(self, encoder: torch.nn.Module, encoder_fingerprint: Mapping[str, Any],
                     transform: Callable[[Image.Image], torch.Tensor], transform_spec: Mapping[str, Any],
                     image_ids: Sequence[str], image_paths: Sequence[str], views: int = 1,
                     batch_size: int = 32, dtype: str = "float16") -> CachedFeatures:
        """Read the entry for this encoder/transform/image list, or compute and write it (``dtype``: float16 or
        float32; part of the key when not float16)."""
        if dtype not in DTYPES:
            raise ValueError(f"feature cache dtype {dtype!r} is not one of {list(DTYPES)}")
        image_ids, image_paths = list(map(str, image_ids)), list(map(str, image_paths))
        if len(set(image_ids)) != len(image_ids):
            raise ValueError("feature cache: image ids must be unique")
        start = time.perf_counter()
        fingerprint = dict(encoder_fingerprint) if dtype == "float16" else {**encoder_fingerprint, "dtype": dtype}
        key = cache_key(fingerprint, transform_spec, image_ids, image_paths, views)
        logger.info("Feature cache key %s from %d image digests (%.1f s)", key, len(image_ids),
                    time.perf_counter() - start)
        if self.exists(key):
            try:
                cached = self.load(key)
            except (OSError, EOFError, ValueError, KeyError) as exc:
                logger.warning("Feature cache entry %s cannot be read (%s: %s); rebuilding it", self.path(key),
                               type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "")
            else:
                if cached.image_ids == image_ids:
                    logger.info("Feature cache hit %s (%d images)", self.path(key), len(image_ids))
                    return cached
                logger.warning("Feature cache entry %s lists other images; rebuilding it", self.path(key))
        logger.info("Feature cache miss: encoding %d images x %d view(s) into %s", len(image_ids), views, self.path(key))
        feats, grid_hw, seconds = extract_features(encoder, image_paths, transform, batch_size, views, dtype=dtype)
        return self.put(key, feats, image_ids, grid_hw, seconds,
                        {"views": views, "encoder": fingerprint, "transform": dict(transform_spec)})

    def put(self, key: str, feats: np.ndarray, image_ids: Sequence[str], grid_hw: tuple[int, int], seconds: float,
            meta: Mapping[str, Any] | None = None) -> CachedFeatures:
        """Write ``feats`` (``[N, views, P, C]``) as the entry ``key`` (a temporary folder moved into place)."""
        image_ids = list(map(str, image_ids))
        tmp = self.root / f".{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "features.npy", feats)
        full = {**dict(meta or {}), "image_ids": image_ids, "grid_hw": list(grid_hw), "seconds_per_image": seconds,
                "shape": list(feats.shape)}
        (tmp / "meta.json").write_text(json.dumps(full, default=str))
        final = self.path(key)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return CachedFeatures(torch.from_numpy(feats), image_ids, tuple(grid_hw), key, True, seconds)
