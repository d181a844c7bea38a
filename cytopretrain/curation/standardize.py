"""Standardize stage: per-channel percentile normalization of raw images to 8-bit.

Definition (CytoImageNet's, made precise):

- Percentiles per channel follow ``np.percentile``'s default ("linear") method: for the n
  pixel values sorted as x_0 <= ... <= x_{n-1}, the p-th percentile sits at virtual index
  h = (n - 1) * p / 100 and equals x_k + (h - k) * (x_{k+1} - x_k) with k = floor(h).
  Integer channels whose value range fits ``HISTOGRAM_LEVELS`` levels (all uint8 and uint16
  data) read the order statistics x_k from a cumulative histogram (np.bincount) instead of
  sorting; other channels (floats, very wide integer ranges) select them with np.partition.
  Both give np.percentile's numbers up to float rounding.
- Each channel maps to v = clip((x - p_low) / (p_high - p_low), 0, 1). Mode "keep" writes
  round(255 v) per channel (H, W, C); mode "merge" writes round(255 * mean of v over the
  channels), one gray (H, W) image as CytoImageNet merges fluorescence channels. Rounding is
  half up. The map runs as in-place float32 ufuncs (faster in numpy than a lookup-table
  gather, see ``_keep``), so a value may differ from a float64 computation by one grey level
  where float32 rounding crosses a half.
- A channel with p_low == p_high has no contrast to stretch: it becomes zeros in "keep" mode
  and is left out of the mean in "merge" mode (a blank stain must not dim the merged image).
  Only an image whose channels are all uniform is rejected (reason ``uniform``).
- An image whose every channel holds at most two distinct values is a binary mask, not a
  micrograph (CytoImageNet's filter), and is rejected (reason ``binary``). Checking it here, on
  the raw channels, catches masks that merging would blend into more than two grey levels.
- NaN or infinite pixels reject the image (reason ``non_finite``).
- An image whose shorter side is under ``min_side`` pixels is rejected (reason ``too_small``)
  before any other check: cropping would upsample a few pixels into a training image. The
  default, ``DEFAULT_MIN_SIDE`` = 32, is the smallest side every backbone accepts
  (learning.models: 16 for the resnets and efficientnet_b0, 32 for densenet121).
- A TIFF stack (Z or T planes, or unnamed pages in a per-channel file) is rejected (reason
  ``stack``) unless the source's ``z_projection`` option reduces it (core.imageio).

``standardize_chunk`` runs the stage over a slice of the canonical table (schema.py), streams
kept images to Parquet and returns one decision row per input row.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from cytopretrain.core import tables
from cytopretrain.core.errors import ImageReadError, SchemaError, StandardizeError
from cytopretrain.core.imageio import READ_REASONS, ZProjection, read_channels
from cytopretrain.core.numerics import histogram_percentiles, level_counts, selection_percentiles
from cytopretrain.core.parallel import ordered_map

DEFAULT_LOW = 0.1
DEFAULT_HIGH = 99.9
# The smallest image side every backbone of learning.models accepts (densenet121's 32).
DEFAULT_MIN_SIDE = 32
MODES = ("merge", "keep")
STAGE = "standardize"
# Integer channels spanning at most this many distinct levels are histogrammed, not sorted.
HISTOGRAM_LEVELS = 1 << 16

OUTPUT_FIELDS: dict[str, pa.DataType] = {
    "idx": pa.string(),
    **tables.PIXEL_FIELDS,
    "p_low": pa.list_(pa.float32()),  # per source channel
    "p_high": pa.list_(pa.float32()),
    "source_dtype": pa.string(),  # dtype of the channels that were standardized
    "source_height": pa.int32(),
    "source_width": pa.int32(),
}
OUTPUT_SCHEMA = pa.schema(list(OUTPUT_FIELDS.items()))
DECISION_COLUMNS = ("idx", "stage", "status", "reason", "detail")
REQUIRED_COLUMNS = ("idx", "channel_paths", "channels")
# Every reason a decision row of this stage can carry.
QUARANTINE_REASONS = READ_REASONS + ("too_small", "uniform", "binary", "non_finite")


def _check_options(low: float, high: float, mode: str) -> None:
    if not 0 <= low < high <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got low={low}, high={high}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


@dataclass
class _Channel:
    """One channel's percentiles and the values to map."""

    p_low: float
    p_high: float
    values: np.ndarray  # the raw plane, or its levels (value - offset) when histogrammed
    offset: int  # value of level 0; 0 for raw planes
    two_valued: bool  # at most two distinct pixel values

    @property
    def uniform(self) -> bool:
        return self.p_high <= self.p_low

    def map_into(self, out: np.ndarray, scale: float, bias: float) -> None:
        """out = bias + scale * clip((x - p_low) / (p_high - p_low), 0, 1), in place.

        Three in-place ufunc passes; the bias is folded into the subtracted constant, since
        (x - p_low + bias / slope) * slope = bias + (x - p_low) * slope.
        """
        slope = scale / (self.p_high - self.p_low)
        # float64 values (or wide integers) keep a float64 constant: a large offset with a
        # tiny span would not survive rounding to float32 before the subtraction.
        precision = np.result_type(self.values.dtype, out.dtype).type
        np.subtract(self.values, precision(self.p_low - self.offset - bias / slope), out=out)
        np.multiply(out, out.dtype.type(slope), out=out)
        np.clip(out, bias, bias + scale, out=out)


def _as_levels(plane: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The plane as small non-negative integers (levels) plus the value of level 0, if it fits."""
    if plane.dtype in (np.uint8, np.uint16):
        return plane, 0
    if plane.dtype.kind not in "ui":
        return None
    low, high = int(plane.min()), int(plane.max())
    if high - low >= HISTOGRAM_LEVELS:
        return None
    # Subtract in the native dtype only where it cannot overflow (unsigned, min removed).
    shifted = plane - plane.dtype.type(low) if plane.dtype.kind == "u" else plane.astype(np.int64) - low
    return shifted.astype(np.uint16), low


def _prepare_channel(plane: np.ndarray, index: int, low: float, high: float) -> _Channel:
    if plane.dtype.kind == "f":
        # min/max propagate NaN and expose +-inf, so two reductions detect every non-finite pixel.
        if not (np.isfinite(plane.min()) and np.isfinite(plane.max())):
            bad = int(np.count_nonzero(~np.isfinite(plane)))
            raise StandardizeError("non_finite", f"channel {index} has {bad} NaN or infinite pixels")
    as_levels = _as_levels(plane)
    if as_levels is None:
        p_low, p_high = map(float, selection_percentiles(plane, (low, high)))
        return _Channel(p_low, p_high, plane, 0, _at_most_two_values(plane))
    levels, offset = as_levels
    counts = level_counts(levels)
    p_low, p_high = map(float, histogram_percentiles(counts, (low, high), offset))
    return _Channel(p_low, p_high, levels, offset, np.count_nonzero(counts) <= 2)


def _at_most_two_values(plane: np.ndarray) -> bool:
    """Whether a float plane has at most two distinct values; a small sample decides most planes."""
    flat = plane.ravel()
    if np.unique(flat[:: max(1, flat.size // 4096)]).size > 2:
        return False
    return np.unique(flat).size <= 2


def standardize_image(
    image: np.ndarray, *, low: float = DEFAULT_LOW, high: float = DEFAULT_HIGH, mode: str = "merge"
) -> tuple[np.ndarray, dict]:
    """Normalize an (H, W) or (H, W, C) image to uint8 (see the module docstring).

    Returns the image ((H, W) for "merge", (H, W, C) for "keep") and stats with per-channel
    ``p_low``, ``p_high`` (floats) and ``uniform_channels`` (indices). Raises StandardizeError
    ("non_finite", "uniform", "binary").
    """
    _check_options(low, high, mode)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.size == 0:
        raise ValueError(f"image must be a non-empty (H, W) or (H, W, C) array, got shape {image.shape}")
    channels = [_prepare_channel(image[:, :, c], c, low, high) for c in range(image.shape[2])]
    stats = {
        "p_low": [ch.p_low for ch in channels],
        "p_high": [ch.p_high for ch in channels],
        "uniform_channels": [c for c, ch in enumerate(channels) if ch.uniform],
    }
    active = [ch for ch in channels if not ch.uniform]
    if not active:
        raise StandardizeError(
            "uniform", f"all {len(channels)} channel(s) uniform (p{low} == p{high}: {stats['p_low']})"
        )
    if all(ch.two_valued for ch in channels):
        raise StandardizeError("binary", f"all {len(channels)} channel(s) hold at most two values (a mask)")
    if mode == "keep":
        return _keep(channels, image.shape), stats
    return _merge(active, image.shape[:2]), stats


# Both modes map pixels with three in-place float32 ufunc passes rather than a lookup-table
# gather: numpy's gather first converts uint8/uint16 indices to intp, which costs more than the
# arithmetic.


def _keep(channels: list[_Channel], shape: tuple[int, int, int]) -> np.ndarray:
    planes = np.zeros((shape[2], shape[0], shape[1]), dtype=np.uint8)
    buffer = np.empty(shape[:2], np.float32)
    for plane, channel in zip(planes, channels):
        if not channel.uniform:
            channel.map_into(buffer, 255.0, 0.5)
            np.copyto(plane, buffer, casting="unsafe")  # truncation after +0.5 rounds half up
    # np.stack interleaves 4x faster than a contiguous copy of the transposed array (measured).
    return np.stack(list(planes), axis=-1)


def _merge(active: list[_Channel], shape: tuple[int, int]) -> np.ndarray:
    share = 255.0 / len(active)
    total = np.empty(shape, np.float32)
    active[0].map_into(total, share, 0.5)  # +0.5 once: the final cast then rounds half up
    buffer = np.empty(shape, np.float32) if len(active) > 1 else None
    for channel in active[1:]:
        channel.map_into(buffer, share, 0.0)
        total += buffer
    return total.astype(np.uint8)


# ---------------------------------------------------------------- chunk stage


def _check_table(meta: pd.DataFrame, expected_channels: Mapping[str, int] | None) -> None:
    required = REQUIRED_COLUMNS + (("name",) if expected_channels else ())
    missing = [c for c in required if c not in meta.columns]
    if missing:
        raise SchemaError(f"standardize: metadata table lacks column(s) {missing}")
    duplicated = meta["idx"].duplicated()
    if duplicated.any():
        raise SchemaError(f"standardize: duplicate idx {meta.loc[duplicated, 'idx'].iloc[0]!r}")


@dataclass(frozen=True)
class _Job:
    idx: str
    paths: list[str]
    n_names: int  # channel names listed in the metadata (0 = none listed)
    n_configured: int | None  # expected_channels[name], if configured
    z_projection: ZProjection | None  # z_projections[name], if configured


def _jobs(
    meta: pd.DataFrame, expected_channels: Mapping[str, int] | None, z_projections: Mapping[str, ZProjection]
) -> Iterator[_Job]:
    names = meta["name"].tolist() if expected_channels or z_projections else [None] * len(meta)
    for idx, paths, channels, name in zip(
        meta["idx"].tolist(), meta["channel_paths"].tolist(), meta["channels"].tolist(), names
    ):
        if isinstance(paths, (str, bytes)) or not isinstance(paths, Iterable) or len(paths) == 0:
            raise SchemaError(f"standardize: idx {idx!r}: channel_paths must be a non-empty list, got {paths!r}")
        n_names = len(channels.split("|")) if isinstance(channels, str) and channels else 0
        configured = expected_channels.get(name) if expected_channels else None
        yield _Job(str(idx), [str(p) for p in paths], n_names, configured, z_projections.get(name))


def _expected_count(job: _Job) -> int | None:
    if job.n_names and job.n_configured is not None and job.n_names != job.n_configured:
        raise ImageReadError(
            "wrong_channel_count",
            f"{job.paths[0]}: metadata names {job.n_names} channels, expected_channels says {job.n_configured}",
        )
    return job.n_configured if job.n_configured is not None else (job.n_names or None)


def _standardize_job(job: _Job, low: float, high: float, mode: str, min_side: int) -> dict:
    """Output row of one image, or a decision dict carrying the quarantine reason."""
    try:
        image = read_channels(job.paths, _expected_count(job), job.z_projection)
        if min(image.shape[:2]) < min_side:
            return {
                "reason": "too_small",
                "detail": f"{', '.join(job.paths)}: {image.shape[0]} x {image.shape[1]} pixels, "
                f"a side under standardize.min_side {min_side}",
            }
        pixels, stats = standardize_image(image, low=low, high=high, mode=mode)
    except ImageReadError as exc:
        return {"reason": exc.reason, "detail": exc.detail}
    except StandardizeError as exc:
        return {"reason": exc.reason, "detail": f"{', '.join(job.paths)}: {exc.detail}"}
    return {
        "idx": job.idx,
        **tables.encode_pixels(pixels),
        "p_low": stats["p_low"],
        "p_high": stats["p_high"],
        "source_dtype": str(image.dtype),
        "source_height": image.shape[0],
        "source_width": image.shape[1],
    }


def standardize_chunk(
    meta: pd.DataFrame,
    out_path: str | os.PathLike,
    *,
    low: float = DEFAULT_LOW,
    high: float = DEFAULT_HIGH,
    mode: str = "merge",
    expected_channels: Mapping[str, int] | None = None,
    z_projections: Mapping[str, str] | None = None,
    min_side: int = DEFAULT_MIN_SIDE,
    rows_per_group: int = 32,
    threads: int = 1,
) -> pd.DataFrame:
    """Read and standardize every row of ``meta``; write kept images to ``out_path`` (Parquet).

    ``meta`` needs columns idx, channel_paths, channels (and name when ``expected_channels``,
    a map from source ``name`` to channel count, is given). The expected channel count of a
    row is the number of names in ``channels`` and/or ``expected_channels[name]``; both, when
    present, must agree. ``z_projections`` maps a source ``name`` to its z_projection option
    (max, mean, pick:<index>), which reduces that source's TIFF stacks to one plane; images
    with a side under ``min_side`` pixels are ``too_small``. The output follows OUTPUT_SCHEMA,
    written atomically one row group at a time. Returns the decision table (DECISION_COLUMNS):
    one row per input row, status "kept" or "quarantined" with a machine-readable reason and a detail naming the file.
    ``threads`` > 1 decodes and normalizes images in a thread pool (imagecodecs, zlib and most
    numpy kernels release the GIL); it only pays when the job owns idle cores and inputs are
    compressed (PNG, zlib TIFF) - for uncompressed TIFF the Python-side TIFF parsing holds
    the GIL. Running one single-threaded job per core is the default plan.
    """
    _check_options(low, high, mode)
    _check_table(meta, expected_channels or z_projections)
    projections = {name: ZProjection.parse(value) for name, value in (z_projections or {}).items() if value}
    jobs = list(_jobs(meta, expected_channels, projections))  # validates every row before any output
    decisions: list[tuple[str, str, str, str, str]] = []

    def work(job: _Job) -> dict:
        return _standardize_job(job, low, high, mode, min_side)

    with tables.ParquetStreamWriter(out_path, OUTPUT_SCHEMA, rows_per_group=rows_per_group) as writer:
        for job, result in ordered_map(work, jobs, threads, name="standardize"):
            if "pixels" in result:
                writer.write(result)
                decisions.append((job.idx, STAGE, "kept", "", ""))
            else:
                decisions.append((job.idx, STAGE, "quarantined", result["reason"], result["detail"]))
    return pd.DataFrame(decisions, columns=list(DECISION_COLUMNS)).astype(object)
