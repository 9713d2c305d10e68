"""Frozen linear weights cast once per training call instead of at every forward.

Under CPU (or CUDA) autocast a ``torch.nn.Linear`` casts its fp32 weight to the autocast dtype at every call, and
autocast caches only the casts of weights that require gradients. A LoRA-family adapter, prompt learning or a
partly frozen model leaves almost every weight frozen, so each training step re-reads every frozen weight in fp32
and writes a bf16 copy of it (SmolLM2-135M: 14% of a step's CPU time, in ``aten::copy_``), and the output layer
(Gemma-3-270m: 168M of its 268M parameters) again for the evaluation passes.

:func:`frozen_weights_cast` makes each frozen ``nn.Linear`` of a model keep that copy for the duration of a
``with`` block: ``.to(dtype)`` of the weight is what autocast computes, so the forward and backward are the same
numbers (tested, bit for bit), only the copy is made once. Outside autocast, with another autocast dtype, or
after the weight changes (its storage or version), a layer runs as before. The parameters themselves are not
touched: saving, checkpoints, merging adapters and DoRA's weight norms see the fp32 weights.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F

_ATTRIBUTE = "_llm_caption_cast_weight"
_INPUTS = "_llm_caption_cast_input"


def cast_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight ``module``'s next ``F.linear`` should use: the copy in the active autocast dtype when
    :func:`frozen_weights_cast` holds one for ``module`` and it is still current, else ``module.weight``."""
    weight = module.weight
    holder = module.__dict__.get(_ATTRIBUTE)
    if holder is None or not torch.is_autocast_enabled(weight.device.type):
        return weight
    return holder.get(weight)


class _Cast:
    """The autocast-dtype copy of one frozen weight, remade when the weight's storage or version changes."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.key: tuple[int, int] | None = None
        self.copy: torch.Tensor | None = None

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.requires_grad or torch.get_autocast_dtype(weight.device.type) != self.dtype:
            return weight
        key = (weight.data_ptr(), weight._version)
        if key != self.key:
            self.copy, self.key = weight.detach().to(self.dtype), key
        return self.copy


class _InputCast:
    """The autocast-dtype copy of the last input seen, shared by the layers that read the same activation (a
    layer's q/k/v projections and their adapters' first matrices)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.key: tuple | None = None
        self.source: torch.Tensor | None = None
        self.copy: torch.Tensor | None = None

    def get(self, input: torch.Tensor) -> torch.Tensor:
        if (input.dtype == self.dtype or not input.is_floating_point()
                or not torch.is_autocast_enabled(input.device.type)
                or torch.get_autocast_dtype(input.device.type) != self.dtype):
            return input
        key = (input._version, torch.is_grad_enabled())
        if input is not self.source or key != self.key:
            self.source, self.key, self.copy = input, key, input.to(self.dtype)
        return self.copy

    def clear(self) -> None:
        self.source = self.copy = self.key = None


def _forward(self, input: torch.Tensor) -> torch.Tensor:
    inputs = self.__dict__.get(_INPUTS)
    if inputs is not None:
        input = inputs.get(input)
    return F.linear(input, cast_weight(self), self.bias)


@contextlib.contextmanager
def frozen_weights_cast(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16,
                        enabled: bool = True, share_inputs: bool = False) -> Iterator[int]:
    """Within the block, every ``torch.nn.Linear`` of ``model`` (exactly that class: quantised and adapter layers
    keep their own forward) with a frozen floating-point weight in another dtype casts it to ``dtype`` once, when
    autocast to ``dtype`` is active, instead of at every call. Yields how many layers were set up."""
    patched: list[torch.nn.Module] = []
    inputs = _InputCast(dtype)
    if enabled:
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if (type(module) is not torch.nn.Linear or not isinstance(weight, torch.nn.Parameter)
                    or not weight.is_floating_point() or weight.dtype == dtype or "forward" in module.__dict__):
                continue
            if not weight.requires_grad:
                module.__dict__[_ATTRIBUTE] = _Cast(dtype)
            elif not share_inputs:
                continue
            if share_inputs:
                module.__dict__[_INPUTS] = inputs
            module.forward = types.MethodType(_forward, module)
            patched.append(module)
    try:
        yield len(patched)
    finally:
        inputs.clear()
        for module in patched:
            for name in (_ATTRIBUTE, _INPUTS, "forward"):
                module.__dict__.pop(name, None)
