"""Crop files and shard sets written by the real stages (crops Parquet -> write_shards), for the
tests of the loader, training, outliers and the report. Fixtures in conftest.py use them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from cytopretrain.core.schema import conform
from cytopretrain.core.tables import ParquetStreamWriter, encode_pixels
from cytopretrain.curation import shards
from cytopretrain.curation.crops import CROP_SCHEMA


def crop_row(crop_id: str, idx: str, label: str, category: str, pixels, window=None) -> dict:
    """One crop file row; ``window`` (x_min, x_max, y_min, y_max) defaults to the whole image."""
    h, w = pixels.shape[:2]
    x_min, x_max, y_min, y_max = window or (0, w, 0, h)
    return {
        "crop_id": crop_id,
        "idx": idx,
        "label": label,
        "category": category,
        "crop": window is not None,
        "scaling": 1.0,
        "x_min": x_min,
        "x_max": x_max,
        "y_min": y_min,
        "y_max": y_max,
        **encode_pixels(pixels),
    }


def write_crop_file(rows: Iterable[dict], path: Path, rows_per_group: int = 32) -> Path:
    """A crop Parquet file as upsample_crops / quality_control write them."""
    with ParquetStreamWriter(path, CROP_SCHEMA, rows_per_group=rows_per_group) as writer:
        for row in rows:
            writer.write(row)
    return path


def canonical_metadata(idx: list[str], **columns) -> pd.DataFrame:
    """A canonical table for ``idx`` (fluorescence, a placeholder channel path) plus ``columns``."""
    frame = pd.DataFrame(
        {"idx": idx, "database": "test", "microscopy": "fluorescence", "channel_paths": [["/test/none.tif"]] * len(idx)}
    )
    for name, values in columns.items():
        frame[name] = values
    return conform(frame, "test metadata")


def write_shard_set(
    images: list[dict],
    folder: Path,
    *,
    samples_per_shard: int,
    fmt: str = "parquet",
    seed: int = 0,
    validation_fraction: float = 0.2,
    category: str = "gene",
) -> dict:
    """Shards of ``images`` (dicts: idx, label, crops = list of uint8 (H, W, C) arrays).

    Returns the shard folder, every crop by crop_id (its row in the crop file) and the labels.
    """
    crops = {}
    for image in images:
        for number, pixels in enumerate(image["crops"]):
            crop_id = f"{image['idx']}-c{number}"
            window = None if number == 0 else (0, pixels.shape[1], 0, pixels.shape[0])
            crops[crop_id] = crop_row(crop_id, image["idx"], image["label"], category, pixels, window)
    crop_file = write_crop_file(crops.values(), folder / "crops.parquet")
    labels = sorted({image["label"] for image in images})
    kept = pd.DataFrame({"label": labels, "category": category})
    metadata = canonical_metadata(
        [image["idx"] for image in images],
        **{category: [f"{image['label']} targeted" if category == "gene" else image["label"] for image in images]},
    )
    out_dir = folder / f"shards-{fmt}"
    shards.write_shards(
        [crop_file],
        kept,
        metadata,
        out_dir,
        samples_per_shard=samples_per_shard,
        fmt=fmt,
        validation_fraction=validation_fraction,
        seed=seed,
    )
    return {"dir": out_dir, "crops": crops, "labels": labels}
