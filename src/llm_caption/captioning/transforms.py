"""Image pre-processing in one place.

The ``image_transform_spec`` dataset (JSON) describes it::

    {"image_size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
     "train": {"hflip": true, "random_resized_crop": {"scale": [0.8, 1.0]}}}

and :func:`build_transform` turns it into a callable from a PIL RGB image to a tensor.
``mean``/``std`` are the encoder's normalisation (EfficientNet-lite0 uses 0.5/0.5 for every channel).

The eval transform (:class:`EvalTransform`) needs only PIL, NumPy and torch, so captioning
never imports torchvision; the training transform (random crops and flips) is torchvision's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

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


class EvalTransform:
    """Resize a PIL RGB image to ``size`` x ``size`` (bilinear, PIL's antialiased filter), scale to
    ``[0, 1]`` and normalise per channel: ``[3, S, S]`` float32.

    The same numbers, bit for bit, as torchvision's ``Compose([Resize((S, S), antialias=True),
    ToTensor(), Normalize(mean, std)])`` on a PIL image: torchvision resizes PIL images with
    ``Image.resize((w, h), BILINEAR)`` (and leaves an image already ``S`` x ``S`` as it is),
    ``ToTensor`` divides the uint8 values by 255 and ``Normalize`` subtracts ``mean`` then divides
    by ``std`` in torch's default float dtype (float32).
    """

    def __init__(self, size: int, mean: list[float], std: list[float]) -> None:
        self.size = int(size)
        self.mean = [float(x) for x in mean]
        self.std = [float(x) for x in std]

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if not isinstance(img, Image.Image):
            raise TypeError(f"EvalTransform expects a PIL image, got {type(img).__name__}")
        if img.mode != "RGB":
            raise ValueError(f"EvalTransform expects an RGB image, got mode '{img.mode}' (convert('RGB') it first)")
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
        dtype = torch.get_default_dtype()
        pixels = torch.from_numpy(np.array(img, np.uint8, copy=True))  # [H, W, 3]
        tensor = pixels.permute(2, 0, 1).contiguous().to(dtype=dtype).div(255)
        mean = torch.as_tensor(self.mean, dtype=dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=dtype).view(-1, 1, 1)
        return tensor.sub_(mean).div_(std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, mean={self.mean}, std={self.std})"


def build_transform(spec: Mapping[str, Any] | None = None,
                    train: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """A transform from a PIL RGB image to a normalised ``[3, S, S]`` float tensor.

    Eval (``train=False``): resize to ``image_size`` x ``image_size`` -- an :class:`EvalTransform`
    (no torchvision import).
    Train: a torchvision ``Compose``: random-resized-crop to ``image_size`` (when the spec has
    ``random_resized_crop``, else the eval resize), then a horizontal flip with probability 0.5
    (when ``hflip``).
    """
    spec = make_transform_spec(spec)
    size = spec["image_size"]
    if not train:
        return EvalTransform(size, spec["mean"], spec["std"])
    from torchvision import transforms as T

    steps: list[Any] = []
    rrc = spec["train"]["random_resized_crop"]
    if rrc:
        steps.append(T.RandomResizedCrop(size, scale=tuple(rrc["scale"]), ratio=tuple(rrc["ratio"]), antialias=True))
    else:
        steps.append(T.Resize((size, size), antialias=True))
    if spec["train"]["hflip"]:
        steps.append(T.RandomHorizontalFlip(p=0.5))
    steps += [T.ToTensor(), T.Normalize(mean=spec["mean"], std=spec["std"])]
    return T.Compose(steps)
