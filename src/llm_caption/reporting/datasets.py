"""A figure dataset that can be read back: saved from a matplotlib Figure, loaded as PNG bytes.

``kedro_datasets.matplotlib.MatplotlibDataset`` cannot load, so a report could not embed a
plot that another node drew. :class:`FigurePNGDataset` saves exactly like it (and keeps its
kedro-viz image preview) and loads the PNG file's bytes. With ``allow_missing: true`` a
missing file loads as ``None`` (the report then says the plot was not produced).
"""

from __future__ import annotations

from typing import Any

from kedro.io.core import get_filepath_str
from kedro_datasets.matplotlib import MatplotlibDataset


class FigurePNGDataset(MatplotlibDataset):
    """``MatplotlibDataset`` whose ``load`` returns the PNG bytes (or ``None`` when missing and allowed)."""

    def __init__(self, *, allow_missing: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self._allow_missing = bool(allow_missing)

    def load(self) -> bytes | None:
        load_path = get_filepath_str(self._get_load_path(), self._protocol)
        if self._allow_missing and not self._fs.exists(load_path):
            return None
        with self._fs.open(load_path, mode="rb") as handle:
            return handle.read()

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "allow_missing": self._allow_missing}
