"""Shared test data: the path of ../shared/data and real single-cell images from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
YEAST = DATA / "yeast_toy" / "images"
BBBC_CELLS = DATA / "bbbc021_cells"


def to_uint8(channels: list[np.ndarray]) -> np.ndarray:
    """Per-channel min-max scaling to uint8, (H, W, C)."""
    out = []
    for channel in channels:
        channel = channel.astype(np.float64)
        low, high = channel.min(), channel.max()
        out.append(np.round(255 * (channel - low) / max(high - low, 1e-12)).astype(np.uint8))
    return np.stack(out, axis=-1)
