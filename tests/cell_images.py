"""Shared test data: the path of ../shared/data and real single-cell images from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
YEAST = DATA / "yeast_toy" / "images"
BBBC_CELLS = DATA / "bbbc021_cells"
# The manifest adapter's options for bbbc021_cells (cells.csv, one .npy of 3 channels per cell).
BBBC_CELLS_OPTIONS = {
    "file": "cells.csv",
    "path_column": "file",
    "channels": ["dna", "tubulin", "actin"],
    "columns": {
        "phenotype": "moa",
        "compound": "compound",
        "concentration": "concentration",
        "plate": "plate",
        "well": "well",
    },
    "constants": {"organism": "human", "cell_type": "mcf7", "cell_visible": "nucleus|microtubules|actin"},
}


def to_uint8(channels: list[np.ndarray]) -> np.ndarray:
    """Per-channel min-max scaling to uint8, (H, W, C)."""
    out = []
    for channel in channels:
        channel = channel.astype(np.float64)
        low, high = channel.min(), channel.max()
        out.append(np.round(255 * (channel - low) / max(high - low, 1e-12)).astype(np.uint8))
    return np.stack(out, axis=-1)


def yeast_cell_images(per_protein: int = 9) -> list[dict]:
    """Real yeast cells as shard images: the whole 64 px cell (GFP + RFP, or GFP only every
    second cell) and 0-2 of its 32 px quadrants."""
    images = []
    for protein in sorted(p.name for p in YEAST.iterdir()):
        for gfp in sorted((YEAST / protein).glob("*_gfp.tif"))[:per_protein]:
            rfp = gfp.with_name(gfp.name.replace("_gfp.tif", "_rfp.tif"))
            n = len(images)
            cell = to_uint8([tifffile.imread(gfp), tifffile.imread(rfp)][: 1 + n % 2])
            quadrants = [cell[:32, :32], cell[32:, 32:], cell[:32, 32:]][: n % 3]
            images.append({"idx": f"yeast-{n}", "label": protein.lower(), "crops": [cell, *quadrants]})
    return images
