"""A trainable encoder top: the captioner fine-tunes the last stages of EfficientNet-lite from cached activations.

The encoder is cut before stage ``cut_stage`` (:func:`.lite0.split_at`). The bottom runs once per image and its
output, the activations entering the cut, is cached like the feature grids (:class:`.features.FeatureCache`, the
cut in the key). Every training step then runs only the top (stages ``cut_stage..6`` and the 1x1 head, ImageNet
weights to start) and the decoder: :class:`TopCaptioner`. The top's batch norms stay in eval mode (ImageNet
running statistics, never updated: a step's 50 images would be a noisy estimate); their scale and shift train
with the convolutions, at the top's own, lower, learning rate (:func:`param_groups`).

A training batch's captions come grouped by image (:func:`image_grouped_order`), and the top runs once per
distinct image of the batch (``image_index`` picks each caption's grid), not once per caption.

The registered model carries the fine-tuned top inside its encoder weights file (:func:`write_encoder_weights`:
the whole network's ``state_dict`` in the ImageNet file's order), so serving and ``python -m llm_caption.caption``
load it as they load the ImageNet file and run the same network with the same request format.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import lite_model

LITE_ENCODERS = {"efficientnet_lite0": "lite0", "efficientnet_lite1": "lite1", "efficientnet_lite2": "lite2"}


def _variant(spec: Mapping[str, Any]) -> str:
    name = spec.get("name", "efficientnet_lite0")
    if name not in LITE_ENCODERS:
        raise ValueError(f"a trainable encoder top needs an EfficientNet-lite encoder ({sorted(LITE_ENCODERS)}); "
                         f"encoder '{name}' cannot be cut")
    return LITE_ENCODERS[name]


def build_split(spec: Mapping[str, Any], cut_stage: int):
    """``(model, bottom, top, weights_path)``: the ImageNet EfficientNet-lite of ``spec`` cut before ``cut_stage``
    (bottom and top share ``model``'s parameters; the bottom is frozen, the top trainable, both in eval mode)."""
    from .lite0 import split_at

    model, weights = lite_model(_variant(spec), spec)
    bottom, top = split_at(model, cut_stage)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in top.parameters():
        p.requires_grad_(True)
    model.to(memory_format=torch.channels_last)
    model.eval()
    return model, bottom, top, weights


class CutEncoder(nn.Module):
    """The frozen bottom as a feature-cache encoder: images -> the cut's activations ``[B, C, H, W]``."""

    def __init__(self, bottom: nn.Module) -> None:
        super().__init__()
        self.bottom = bottom

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.bottom(images.contiguous(memory_format=torch.channels_last))


def cut_to_grid(top: nn.Module, cut: torch.Tensor, cut_hw: tuple[int, int] | None = None,
                grid_size: int | None = None) -> torch.Tensor:
    """Cached cut activations ``[B, P, C]`` (positions row-major over ``cut_hw``; square when None) -> the grid
    ``[B, P', 1280]``."""
    b, p, c = cut.shape
    if cut_hw is None:
        side = math.isqrt(p)
        cut_hw = (side, side)
    h, w = cut_hw
    if p != h * w:
        raise ValueError(f"cut activations have {p} positions, which is not a {h}x{w} grid")
    x = cut.float().reshape(b, h, w, c).permute(0, 3, 1, 2)  # channels_last strides, no copy
    with torch.autocast("cpu", enabled=False):  # fp32: depthwise convolutions are slower in bf16 on CPUs
        grid = top(x)
    if grid_size and grid.shape[-1] != grid_size:
        grid = F.adaptive_avg_pool2d(grid, grid_size)
    return grid.flatten(2).transpose(1, 2)


class TopCaptioner(nn.Module):
    """The encoder top and a caption decoder as one model over cached cut activations ``[B, P, C]``.

    It has the decoders' interface (:mod:`.models`): ``forward(feats, tokens_in, image_index=None)`` (with
    ``image_index`` the top runs once per row of ``feats`` and caption ``i`` reads the grid of row
    ``image_index[i]``), ``init_state``/``step``/``reorder_state``/``aux_loss`` for decoding.
    """

    per_image = True  # training batches group captions by image (see image_grouped_order)

    def __init__(self, top: nn.Module, decoder: nn.Module, grid_size: int | None = None,
                 cut_hw: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.top = top
        self.decoder = decoder
        self.cut_hw = None if cut_hw is None else (int(cut_hw[0]), int(cut_hw[1]))  # None: a square grid
        self.grid_size = grid_size
        self.pad_id = decoder.pad_id

    def train(self, mode: bool = True) -> "TopCaptioner":
        super().train(mode)
        self.top.eval()  # batch norms keep the ImageNet statistics
        return self

    def grid(self, feats: torch.Tensor) -> torch.Tensor:
        return cut_to_grid(self.top, feats, self.cut_hw, self.grid_size)

    def forward(self, feats: torch.Tensor, tokens_in: torch.Tensor, image_index: torch.Tensor | None = None):
        grid = self.grid(feats)
        if image_index is not None:
            grid = grid.index_select(0, image_index)
        return self.decoder(grid, tokens_in)

    def init_state(self, feats: torch.Tensor):
        return self.decoder.init_state(self.grid(feats))

    def step(self, state, prev_tokens: torch.Tensor):
        return self.decoder.step(state, prev_tokens)

    def reorder_state(self, state, index: torch.Tensor, group: int = 1):
        return self.decoder.reorder_state(state, index, group)

    def aux_loss(self, alphas, mask) -> torch.Tensor:
        return self.decoder.aux_loss(alphas, mask)


def decoder_and_grid(model: nn.Module, feats: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """``(decoder, its input)``: for a :class:`TopCaptioner` its decoder and the top's grid of ``feats`` (one top
    pass, with gradient when enabled), otherwise ``(model, feats)``."""
    if isinstance(model, TopCaptioner):
        return model.decoder, model.grid(feats)
    return model, feats


def param_groups(model: nn.Module, lr: float, top_lr: float | None, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups: the decoder's trainable parameters at ``lr``, a :class:`TopCaptioner`'s top at ``top_lr``."""
    if not isinstance(model, TopCaptioner):
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr, "weight_decay": weight_decay}]
    return [{"params": [p for p in model.decoder.parameters() if p.requires_grad], "lr": lr,
             "weight_decay": weight_decay},
            {"params": [p for p in model.top.parameters() if p.requires_grad], "lr": top_lr if top_lr else lr,
             "weight_decay": weight_decay}]


def image_grouped_order(order: torch.Tensor, image_rows: torch.Tensor, generator: torch.Generator,
                        per_image: int | None = None) -> torch.Tensor:
    """``order`` (a shuffled caption order) regrouped so that every image's captions are adjacent, images in a
    random order drawn from ``generator``: consecutive batches then hold each image's captions together.

    ``per_image=k``: runs of at most ``k`` captions of an image instead (an image's first ``k`` captions in
    ``order`` in the first pass over the images, its next ``k`` in the second, ..., each pass in its own random
    image order): more distinct images per batch, fewer captions sharing each top pass."""
    n_rows = int(image_rows.max()) + 1 if len(image_rows) else 0
    rank = torch.randperm(n_rows, generator=generator)
    grouped = order[torch.argsort(rank[image_rows[order]], stable=True)]
    if not per_image:
        return grouped
    rows = image_rows[grouped]
    starts = torch.ones(len(rows), dtype=torch.bool)
    starts[1:] = rows[1:] != rows[:-1]
    first = torch.cummax(torch.where(starts, torch.arange(len(rows)), 0), dim=0).values
    chunk = (torch.arange(len(rows)) - first) // int(per_image)
    n_chunks = int(chunk.max()) + 1
    pair_rank = torch.randperm(n_rows * n_chunks, generator=generator)  # every pass over the images in a new order
    key = chunk * (n_rows * n_chunks) + pair_rank[rows * n_chunks + chunk]
    return grouped[torch.argsort(key, stable=True)]


def write_encoder_weights(spec: Mapping[str, Any], cut_stage: int, top_state: Mapping[str, torch.Tensor],
                          path: str | Path) -> str:
    """The whole EfficientNet-lite with the fine-tuned top (``top_state``: a :class:`TopCaptioner`'s ``top.*``
    entries, prefix removed) as one weights file at ``path``, in the ImageNet file's tensor order; returns its path."""
    model, _, top, _ = build_split(spec, cut_stage)
    top.load_state_dict(dict(top_state), strict=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return str(path)


def top_state_of(model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``top.*`` entries of a :class:`TopCaptioner` state dict, prefix removed."""
    return {k[len("top."):]: v for k, v in model_state.items() if k.startswith("top.")}


def decoder_state_of(model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``decoder.*`` entries of a :class:`TopCaptioner` state dict (prefix removed), or the state itself."""
    if not any(k.startswith("decoder.") for k in model_state):
        return dict(model_state)
    return {k[len("decoder."):]: v for k, v in model_state.items() if k.startswith("decoder.")}
