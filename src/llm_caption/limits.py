"""Checks shared by dataclass configurations read from parameters: the request limits of the served models
(captioner ``ServingLimits``, chat ``ChatLimits``) and the caption study's ``TrainConfig`` and ``SceneConfig``."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any


def config_values(limits_class: type, config: Mapping[str, Any] | None, label: str) -> dict[str, Any]:
    """The keys of ``config`` as a dict (missing keys: the dataclass defaults); unknown keys are an error."""
    values = dict(config or {})
    known = {f.name for f in dataclasses.fields(limits_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{label}: unknown keys {unknown}; known: {sorted(known)}")
    return values


def check_positive_ints(limits: Any, names: Iterable[str], prefix: str) -> None:
    """Each named field of ``limits`` is an int >= 1 (not a bool); the error names it as ``prefix + name``."""
    for name in names:
        value = getattr(limits, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{prefix}{name} must be a positive integer, got {value!r}")
