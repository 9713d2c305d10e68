"""EfficientNet-lite0 (and the wider/deeper lite1, lite2) in plain torch: the same network, parameter
names and numbers as timm's ``tf_efficientnet_lite0`` (``_lite1``, ``_lite2``), without importing timm (whose
import pulls in torchvision and ``torch._dynamo``, seconds of start-up for a captioning command).

The TensorFlow port uses "SAME" padding: stride-1 convolutions pad symmetrically (``(k - 1) // 2``),
stride-2 ones pad each input on the fly, the extra row/column going to the bottom/right
(timm's ``Conv2dSame``). Every batch norm has eps 1e-3 and, except after the projection
convolutions, a ReLU6. There is no squeeze-excite (the "lite" variants drop it).

``state_dict()`` keys, shapes and order equal timm's (``conv_stem``, ``bn1``, ``blocks.{stage}.{block}.*``,
``conv_head``, ``bn2``, ``classifier``), so timm checkpoints load with ``strict=True``.

The larger variants scale the lite0 stages (:func:`lite_stages`) as timm does for "lite": output channels
by ``channel_multiplier`` (rounded to a multiple of 8, never below 90% of the scaled value), repeats by
``depth_multiplier`` (rounded up), except the first and the last stage, whose repeats stay as in lite0; the
stem (32 channels) and the head (1280) are not scaled. lite1 is 1.0/1.1 (240 px), lite2 1.1/1.2 (260 px).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3

# (block type, repeats, kernel, stride of the first block, expansion, output channels) per stage:
# timm's arch_def ['ds_r1_k3_s1_e1_c16'], ['ir_r2_k3_s2_e6_c24'], ... for depth/width multiplier 1.0
LITE0_STAGES: tuple[tuple[str, int, int, int, int, int], ...] = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)

# (channel multiplier, depth multiplier, native input size) of timm's tf_efficientnet_lite{0,1,2}
LITE_VARIANTS: dict[str, tuple[float, float, int]] = {
    "lite0": (1.0, 1.0, 224),
    "lite1": (1.0, 1.1, 240),
    "lite2": (1.1, 1.2, 260),
}


def round_channels(channels: int, multiplier: float = 1.0, divisor: int = 8, round_limit: float = 0.9) -> int:
    """``channels * multiplier`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``), one
    ``divisor`` more when rounding lost over 10% (timm's ``round_channels``); ``channels`` when ``multiplier`` is 1."""
    if multiplier == 1.0:
        return channels
    scaled = channels * multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * scaled else rounded


def lite_stages(channel_multiplier: float = 1.0,
                depth_multiplier: float = 1.0) -> tuple[tuple[str, int, int, int, int, int], ...]:
    """:data:`LITE0_STAGES` scaled as timm scales EfficientNet-lite: channels by :func:`round_channels`,
    repeats by ``ceil(repeats * depth_multiplier)`` except in the first and the last stage."""
    last = len(LITE0_STAGES) - 1
    return tuple(
        (kind, repeats if i in (0, last) else max(1, math.ceil(repeats * depth_multiplier)), kernel, stride,
         expansion, round_channels(out_chs, channel_multiplier))
        for i, (kind, repeats, kernel, stride, expansion, out_chs) in enumerate(LITE0_STAGES)
    )


def _same_pad(size: int, kernel: int, stride: int) -> int:
    """Total TF 'SAME' padding along one axis (timm's ``get_same_padding`` with dilation 1)."""
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


class Conv2dSame(nn.Conv2d):
    """A convolution with TF 'SAME' padding computed from the input size (for strided convolutions)."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, groups: int = 1) -> None:
        super().__init__(in_chs, out_chs, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.weight.shape[-2:]
        pad_h = _same_pad(x.shape[-2], kh, self.stride[0])
        pad_w = _same_pad(x.shape[-1], kw, self.stride[1])
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


def _conv(in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """timm's ``create_conv2d(..., padding='same')``: static symmetric padding when stride is 1."""
    if stride == 1:
        return nn.Conv2d(in_chs, out_chs, kernel, 1, padding=(kernel - 1) // 2, groups=groups, bias=False)
    return Conv2dSame(in_chs, out_chs, kernel, stride, groups=groups)


class BatchNormAct2d(nn.BatchNorm2d):
    """Batch norm (eps 1e-3) followed by ReLU6 when ``act``; a ``BatchNorm2d``, so the same state_dict."""

    def __init__(self, channels: int, act: bool = True) -> None:
        super().__init__(channels, eps=BN_EPS)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return F.relu6(x, inplace=True) if self.act else x

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={'relu6' if self.act else None}"


class DepthwiseSeparableConv(nn.Module):
    """Depthwise conv, BN+ReLU6, pointwise projection, BN (residual when the shape is kept)."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_dw = _conv(in_chs, in_chs, kernel, stride, groups=in_chs)
        self.bn1 = BatchNormAct2d(in_chs)
        self.conv_pw = _conv(in_chs, out_chs, 1)
        self.bn2 = BatchNormAct2d(out_chs, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))
        return x + shortcut if self.has_skip else x


class InvertedResidual(nn.Module):
    """Pointwise expansion, BN+ReLU6, depthwise conv, BN+ReLU6, pointwise projection, BN (+ residual)."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid_chs = in_chs * expansion
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_pw = _conv(in_chs, mid_chs, 1)
        self.bn1 = BatchNormAct2d(mid_chs)
        self.conv_dw = _conv(mid_chs, mid_chs, kernel, stride, groups=mid_chs)
        self.bn2 = BatchNormAct2d(mid_chs)
        self.conv_pwl = _conv(mid_chs, out_chs, 1)
        self.bn3 = BatchNormAct2d(out_chs, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        x = self.bn3(self.conv_pwl(x))
        return x + shortcut if self.has_skip else x


class EfficientNetLite(nn.Module):
    """EfficientNet-lite (timm ``tf_efficientnet_lite*``): stem, 7 stages of blocks (:func:`lite_stages` for
    the multipliers), 1x1 head to ``num_features`` (1280) channels, average pool and a ``num_classes``-way classifier.

    :meth:`forward_features` gives the ``[B, 1280, H/32, W/32]`` grid; :meth:`forward` the logits.
    """

    def __init__(self, channel_multiplier: float = 1.0, depth_multiplier: float = 1.0, num_classes: int = 1000,
                 num_features: int = 1280, stem_size: int = 32) -> None:
        super().__init__()
        self.conv_stem = _conv(3, stem_size, 3, stride=2)
        self.bn1 = BatchNormAct2d(stem_size)
        stages: list[nn.Sequential] = []
        in_chs = stem_size
        for kind, repeats, kernel, stride, expansion, out_chs in lite_stages(channel_multiplier, depth_multiplier):
            blocks: list[nn.Module] = []
            for i in range(repeats):
                s = stride if i == 0 else 1
                if kind == "ds":
                    blocks.append(DepthwiseSeparableConv(in_chs, out_chs, kernel, s))
                else:
                    blocks.append(InvertedResidual(in_chs, out_chs, kernel, s, expansion))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = _conv(in_chs, num_features, 1)
        self.bn2 = BatchNormAct2d(num_features)
        self.num_features = num_features
        self.num_classes = num_classes
        self.classifier = nn.Linear(num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> feature grid ``[B, 1280, ceil(H/32), ceil(W/32)]``."""
        x = self.bn1(self.conv_stem(x))
        x = self.blocks(x)
        return self.bn2(self.conv_head(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> ImageNet logits ``[B, num_classes]``."""
        return self.classifier(F.adaptive_avg_pool2d(self.forward_features(x), 1).flatten(1))


class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-lite0 (timm ``tf_efficientnet_lite0``): :class:`EfficientNetLite` with multipliers 1.0/1.0."""

    def __init__(self, num_classes: int = 1000, num_features: int = 1280, stem_size: int = 32) -> None:
        super().__init__(1.0, 1.0, num_classes=num_classes, num_features=num_features, stem_size=stem_size)


class LiteBottom(nn.Module):
    """The stem and stages ``[0, cut_stage)`` of an :class:`EfficientNetLite`: images -> the activations that enter
    stage ``cut_stage`` (the cut). Shares its parameters with ``model``."""

    def __init__(self, model: EfficientNetLite, cut_stage: int) -> None:
        super().__init__()
        self.conv_stem, self.bn1 = model.conv_stem, model.bn1
        self.blocks = nn.Sequential(*list(model.blocks)[:cut_stage])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.bn1(self.conv_stem(x)))


class LiteTop(nn.Module):
    """Stages ``[cut_stage, 7)`` and the 1x1 head of an :class:`EfficientNetLite`: the cut's activations -> the
    feature grid. Shares its parameters with ``model``, so training it trains ``model`` (whose ``state_dict`` is
    then the fine-tuned encoder, loadable wherever the ImageNet file is)."""

    def __init__(self, model: EfficientNetLite, cut_stage: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*list(model.blocks)[cut_stage:])
        self.conv_head, self.bn2 = model.conv_head, model.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv_head(self.blocks(x)))


def split_at(model: EfficientNetLite, cut_stage: int) -> tuple[LiteBottom, LiteTop]:
    """``(bottom, top)`` of ``model`` cut before stage ``cut_stage`` (1..6; 7 leaves only the head on top):
    ``top(bottom(x)) == model.forward_features(x)``."""
    n_stages = len(model.blocks)
    if not 1 <= int(cut_stage) <= n_stages:
        raise ValueError(f"cut_stage {cut_stage}: EfficientNet-lite has stages 0..{n_stages - 1}; the cut must be "
                         f"before one of stages 1..{n_stages - 1}, or {n_stages} (only the head on top)")
    return LiteBottom(model, int(cut_stage)), LiteTop(model, int(cut_stage))
