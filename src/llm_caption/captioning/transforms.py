"""Image pre-processing in one place.

The ``image_transform_spec`` dataset (JSON) describes it::

    {"image_size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
     "train": {"hflip": true, "random_resized_crop": {"scale": [0.8, 1.0]}}}

and :func:`build_transform` turns it into a torchvision transform. ``mean``/``std`` are the
encoder's normalisation (timm's ``tf_efficientnet_lite0`` uses 0.5/0.5 for every channel).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torchvision import transforms as T

DEFAULT_SPEC: dict[str, Any] = {
    "image_size": 224,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "train": {"hflip": True, "random_resized_crop": {"scale": [0.8, 1.0], "ratio": [0.75, 1.3333]}},
}


def make_transform_spec(params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A complete, validated spec: ``DEFAULT_SPEC`` overridden by ``params`` (JSON-ready)."""
    params = dict(params or {})
    spec: dict[str, Any] = {
        "image_size": int(params.get("image_size", DEFAULT_SPEC["image_size"])),
        "mean": [float(x) for x in params.get("mean", DEFAULT_SPEC["mean"])],
        "std": [float(x) for x in params.get("std", DEFAULT_SPEC["std"])],
    }
    train = dict(DEFAULT_SPEC["train"])
    train.update(params.get("train") or {})
    rrc = train.get("random_resized_crop")
    if rrc:
        rrc = dict(rrc)
        rrc["scale"] = [float(x) for x in rrc.get("scale", [0.8, 1.0])]
        rrc["ratio"] = [float(x) for x in rrc.get("ratio", [0.75, 1.3333])]
        if not 0 < rrc["scale"][0] <= rrc["scale"][1] <= 1:
            raise ValueError(f"random_resized_crop.scale must satisfy 0 < lo <= hi <= 1, got {rrc['scale']}")
    spec["train"] = {"hflip": bool(train.get("hflip", False)), "random_resized_crop": rrc or None}
    if len(spec["mean"]) != 3 or len(spec["std"]) != 3 or any(s <= 0 for s in spec["std"]):
        raise ValueError(f"mean/std must be 3 values each (std > 0), got mean={spec['mean']} std={spec['std']}")
    if spec["image_size"] < 8:
        raise ValueError(f"image_size must be >= 8, got {spec['image_size']}")
    return spec


def build_transform(spec: Mapping[str, Any] | None = None, train: bool = False) -> T.Compose:
    """A torchvision transform from a PIL RGB image to a normalised ``[3, S, S]`` float tensor.

    Eval (``train=False``): resize to ``image_size`` x ``image_size``.
    Train: random-resized-crop to ``image_size`` (when the spec has ``random_resized_crop``,
    else the eval resize), then a horizontal flip with probability 0.5 (when ``hflip``).
    """
    spec = make_transform_spec(spec)
    size = spec["image_size"]
    steps: list[Any] = []
    rrc = spec["train"]["random_resized_crop"]
    if train and rrc:
        steps.append(T.RandomResizedCrop(size, scale=tuple(rrc["scale"]), ratio=tuple(rrc["ratio"]), antialias=True))
    else:
        steps.append(T.Resize((size, size), antialias=True))
    if train and spec["train"]["hflip"]:
        steps.append(T.RandomHorizontalFlip(p=0.5))
    steps += [T.ToTensor(), T.Normalize(mean=spec["mean"], std=spec["std"])]
    return T.Compose(steps)
