"""The ``z_projection`` source option: how a TIFF stack becomes one plane.

Apart from core.imageio so that the config check (curation.sources, reached from the download
rule) parses the option without the image libraries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cytopretrain.core.errors import ImageReadError


@dataclass(frozen=True)
class ZProjection:
    """How a stack of planes becomes one plane: ``max`` (maximum intensity projection, the
    confocal default), ``mean`` (float32, float64 for float64 input, so no level is lost) or
    ``pick`` one plane by its 0-based ``index``."""

    kind: str
    index: int | None = None

    @classmethod
    def parse(cls, value: str | None) -> ZProjection | None:
        """``max``, ``mean`` or ``pick:<index>`` (None stays None); raises ValueError otherwise."""
        if value is None:
            return None
        text = str(value).strip()
        if text in ("max", "mean"):
            return cls(text)
        kind, _, index = text.partition(":")
        if kind == "pick" and index.isascii() and index.isdigit():
            return cls(kind, int(index))
        raise ValueError(f"{value!r} is not max, mean or pick:<index> (0-based plane number)")

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    def reduce(self, array: np.ndarray, axis: int, path: str) -> np.ndarray:
        if self.kind == "max":
            return array.max(axis=axis)
        if self.kind == "mean":
            return array.mean(axis=axis, dtype=np.float64 if array.dtype == np.float64 else np.float32)
        if self.index >= array.shape[axis]:
            raise ImageReadError(
                "stack", f"{path}: z_projection {self} but the stack has {array.shape[axis]} planes (0-based index)"
            )
        return np.take(array, self.index, axis=axis)
