"""Post-upsampling quality control (CytoImageNet's "Quality Control").

Every crop is checked by filters computed from one 256-bin histogram of all its pixel values
(all channels together). The checks run in this order and the first that matches is the
recorded reason:

1. ``unreadable`` — (qc_chunk only) the pixel bytes do not match the stored shape;
2. ``empty`` — the image has no pixels;
3. ``uniform`` — the low and high percentiles (0.1th, 99.9th) are equal;
4. ``binary`` — at most 2 distinct values (a mask rather than a micrograph);
5. ``dim`` — the 75th percentile is ≤ 0 (most of the image is black);
6. ``too_dark`` — mean ≤ 1;
7. ``too_bright`` — mean ≥ 254.

Labels left with fewer than 500 kept crops are then dropped (``drop_small_labels``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from cytopretrain.core.numerics import histogram_percentiles
from cytopretrain.core.tables import PIXEL_FIELDS, ParquetStreamWriter, decode_pixels

STAGE = "quality_control"
KEPT, QUARANTINED = "kept", "quarantined"
REQUIRED_COLUMNS = ("crop_id", "idx", "label", "category", *PIXEL_FIELDS)
DECISION_COLUMNS = ["crop_id", "idx", "label", "category", "stage", "status", "reason", "detail"]
SMALL_LABEL_REASON = "label_below_min_after_qc"
LABEL_SIZE_KEYS = ("min_images_per_label",)


@dataclass(frozen=True)
class QCThresholds:
    """Thresholds of the filters; defaults are CytoImageNet's. Field names are the keys of
    the workflow's ``quality_control`` config section."""

    low_percentile: float = 0.1  # uniform: this percentile equals ...
    high_percentile: float = 99.9  # ... this one
    binary_max_values: int = 2  # binary: at most this many distinct values
    dim_percentile: float = 75.0  # dim: this percentile is ...
    dim_max_value: float = 0.0  # ... at most this value
    dark_mean: float = 1.0  # too_dark: mean ≤ this
    bright_mean: float = 254.0  # too_bright: mean ≥ this

    @classmethod
    def from_config(cls, settings: QCThresholds | Mapping[str, float] | None) -> QCThresholds:
        """Thresholds from a config mapping; its label-size key belongs to drop_small_labels."""
        if settings is None:
            return cls()
        if isinstance(settings, cls):
            return settings
        values = {k: v for k, v in settings.items() if k not in LABEL_SIZE_KEYS}
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"quality_control: unknown threshold key(s) {unknown}")
        return cls(**values)


Thresholds = QCThresholds | Mapping[str, float] | None


def inspect_image(image: np.ndarray, thresholds: Thresholds = None) -> tuple[str, str]:
    """(reason, detail) of the first failed check of a uint8 (H, W) or (H, W, C) image;
    ("", "") when it passes every check. ``thresholds``: QCThresholds, a config mapping, or
    None for the defaults."""
    thresholds = QCThresholds.from_config(thresholds)
    if image.dtype != np.uint8:
        raise TypeError(f"image must be uint8, got {image.dtype}")
    if image.size == 0:
        return "empty", f"image has shape {image.shape}"
    histogram = np.bincount(image.ravel(), minlength=256)
    p_low, p_high, p_dim = histogram_percentiles(
        histogram, [thresholds.low_percentile, thresholds.high_percentile, thresholds.dim_percentile]
    )
    n_distinct = int(np.count_nonzero(histogram))
    mean = float(histogram @ np.arange(256)) / image.size
    if p_low == p_high:
        return "uniform", f"p{thresholds.low_percentile:g} = p{thresholds.high_percentile:g} = {p_low:g}"
    if n_distinct <= thresholds.binary_max_values:
        return "binary", f"{n_distinct} distinct values"
    if p_dim <= thresholds.dim_max_value:
        return "dim", f"p{thresholds.dim_percentile:g} = {p_dim:g}"
    if mean <= thresholds.dark_mean:
        return "too_dark", f"mean {mean:.3f}"
    if mean >= thresholds.bright_mean:
        return "too_bright", f"mean {mean:.3f}"
    return "", ""


def check_image(image: np.ndarray, thresholds: Thresholds = None) -> str:
    """Reason of the first failed check (see the module docstring), "" if the image is fine."""
    return inspect_image(image, thresholds)[0]


def _check_columns(path: str | os.PathLike) -> None:
    names = set(pq.read_schema(path).names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{path}: crops table is missing column(s) {missing}")


def _inspect_row(row: dict, thresholds: QCThresholds) -> tuple[str, str]:
    try:
        image = decode_pixels(row["pixels"], row["height"], row["width"], row["n_channels"])
    except (TypeError, ValueError) as error:
        return "unreadable", f"crop {row['crop_id']}: {error}"
    return inspect_image(image, thresholds)


def qc_chunk(
    crops_parquet: str | os.PathLike,
    out_parquet: str | os.PathLike,
    *,
    thresholds: Thresholds = None,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Check every crop of ``crops_parquet``; stream the kept ones, unchanged and with the same
    schema, to ``out_parquet``. Returns one decision per crop (columns DECISION_COLUMNS)."""
    _check_columns(crops_parquet)
    thresholds = QCThresholds.from_config(thresholds)
    decisions = []
    with pq.ParquetFile(crops_parquet) as handle:
        with ParquetStreamWriter(out_parquet, handle.schema_arrow) as writer:
            for batch in handle.iter_batches(batch_size=batch_size):
                for row in batch.to_pylist():
                    reason, detail = _inspect_row(row, thresholds)
                    if not reason:
                        writer.write(row)
                    status = QUARANTINED if reason else KEPT
                    decisions.append(
                        (row["crop_id"], row["idx"], row["label"], row["category"], STAGE, status, reason, detail)
                    )
    return pd.DataFrame.from_records(decisions, columns=DECISION_COLUMNS)


def drop_small_labels(
    decisions: pd.DataFrame | list[pd.DataFrame], min_images: int = 500
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split labels by their number of kept crops after QC.

    Returns (kept_labels, dropped_labels), both with columns label, category, n_kept;
    dropped_labels also has reason ``label_below_min_after_qc``. A label whose crops were all
    quarantined appears in dropped_labels with n_kept 0.
    """
    table = pd.concat(decisions, ignore_index=True) if isinstance(decisions, list) else decisions
    missing = [c for c in ("label", "category", "status") if c not in table.columns]
    if missing:
        raise ValueError(f"decision table is missing column(s) {missing}")
    categories = table.groupby("label")["category"].unique()
    ambiguous = categories[categories.map(len) > 1]
    if not ambiguous.empty:
        raise ValueError(f"label {ambiguous.index[0]!r} has several categories {list(ambiguous.iloc[0])}")
    counts = (
        table.assign(is_kept=table["status"].eq(KEPT))
        .groupby("label", sort=True)
        .agg(category=("category", "first"), n_kept=("is_kept", "sum"))
        .reset_index()
    )
    counts["n_kept"] = counts["n_kept"].astype("int64")
    large = counts["n_kept"] >= min_images
    kept = counts[large].reset_index(drop=True)
    dropped = counts[~large].assign(reason=SMALL_LABEL_REASON).reset_index(drop=True)
    return kept, dropped
