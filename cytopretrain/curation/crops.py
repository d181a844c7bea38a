"""Upsampling of weakly labelled classes by random crops (CytoImageNet's "Upsampling Classes").

Small classes get more crops per image (``crops_per_image``). An image is split into four
non-overlapping quadrants; ``n_crops`` distinct quadrants are drawn and one square crop is
cut from each, at a random scale and a random position inside its quadrant
(``plan_crops``). Each crop is renormalized to the 0.1th-99.9th percentiles of its own
pixels (``renormalize``). ``upsample_chunk`` applies all this to one standardized chunk.

Choices this project makes where the original is loose:
- crops are square; the side is ``floor(scale * short image side)``, so ``scaling`` is the
  crop side relative to the short side;
- the set of allowed scales is computed once per image against the smallest quadrant, so all
  crops of an image draw from the same set;
- an uncropped image (one crop planned, short side under ``min_image_side`` or no scale
  allowed) is written unchanged: it was already normalized by standardization;
- every image gets its own generator seeded from (seed, stable hash of idx), so the crops do
  not depend on how images are chunked or ordered.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cytopretrain.core.numerics import histogram_percentiles
from cytopretrain.core.tables import PIXEL_FIELDS, ParquetStreamWriter, decode_pixels, encode_pixels

DEFAULT_RULES: tuple[tuple[int, int], ...] = ((1000, 1), (550, 2), (400, 3), (0, 4))
DEFAULT_SCALES: tuple[float, ...] = (1 / 2, 1 / 4, 1 / 8, 1 / 16)
N_QUADRANTS = 4

# Why an image was written whole instead of cropped ("" when it was cropped).
WHOLE_SINGLE = "single_crop_planned"
WHOLE_SMALL = "image_below_min_side"
WHOLE_NO_SCALE = "no_scale_fits"

CROP_FIELDS: dict[str, pa.DataType] = {
    "crop_id": pa.string(),  # "<idx>" for an uncropped image, "<idx>-c<k>" for crop k
    "idx": pa.string(),
    "label": pa.string(),
    "category": pa.string(),
    "crop": pa.bool_(),
    "scaling": pa.float32(),  # crop side / short side of the source image (1.0 if whole)
    "x_min": pa.int32(),  # column slice [x_min, x_max) of the source image
    "x_max": pa.int32(),
    "y_min": pa.int32(),  # row slice [y_min, y_max)
    "y_max": pa.int32(),
    **PIXEL_FIELDS,
}
CROP_SCHEMA = pa.schema(list(CROP_FIELDS.items()))

SELECTION_COLUMNS = ("idx", "label", "category")
STANDARDIZED_COLUMNS = ("idx", *PIXEL_FIELDS)


@dataclass(frozen=True)
class CropBox:
    """Slicing box of one output image: ``image[y_min:y_max, x_min:x_max]``."""

    x_min: int
    x_max: int
    y_min: int
    y_max: int
    scaling: float
    crop: bool = True
    whole_reason: str = ""  # why the whole image was kept; "" for a real crop


# --- crops per image --------------------------------------------------------------------


def _check_rules(rules: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    thresholds = np.array([int(t) for t, _ in rules], dtype=np.int64)
    counts = np.array([int(n) for _, n in rules], dtype=np.int64)
    if thresholds.size == 0:
        raise ValueError("crop rules are empty")
    if np.any(np.diff(thresholds) >= 0):
        raise ValueError(f"crop rule thresholds must be strictly decreasing, got {thresholds.tolist()}")
    if np.any(counts < 1) or np.any(counts > N_QUADRANTS):
        raise ValueError(f"crops per image must be within 1..{N_QUADRANTS}, got {counts.tolist()}")
    return thresholds, counts


def crops_per_image(
    class_size: int | Iterable[int], rules: Sequence[tuple[int, int]] = DEFAULT_RULES
) -> int | np.ndarray:
    """Crops per image for a class of ``class_size`` images: the first rule whose threshold
    is ≤ the size. Accepts one size (returns int) or an array of sizes (returns an array)."""
    thresholds, counts = _check_rules(rules)
    sizes = np.asarray(class_size)
    if sizes.dtype.kind not in "iu":
        raise TypeError(f"class sizes must be integers, got dtype {sizes.dtype}")
    # Thresholds ascending: the matching rule is the largest threshold ≤ size.
    ascending = thresholds[::-1]
    position = np.searchsorted(ascending, sizes, side="right") - 1
    if np.any(position < 0):
        smallest = int(sizes.min())
        raise ValueError(f"class size {smallest} is below every crop rule threshold {thresholds.tolist()}")
    result = counts[::-1][position]
    return int(result) if result.ndim == 0 else result


# --- crop planning ----------------------------------------------------------------------


def _quadrant_bounds(height: int, width: int) -> np.ndarray:
    """(4, 4) array of (y0, y1, x0, x1) per quadrant, row-major: top-left, top-right, ..."""
    half_h, half_w = height // 2, width // 2
    rows = ((0, half_h), (half_h, height))
    cols = ((0, half_w), (half_w, width))
    return np.array([(y0, y1, x0, x1) for y0, y1 in rows for x0, x1 in cols], dtype=np.int64)


def allowed_scales(
    height: int, width: int, scales: Sequence[float] = DEFAULT_SCALES, min_crop_side: int = 70
) -> list[tuple[float, int]]:
    """(scale, side) pairs whose square crop is ≥ ``min_crop_side`` and fits every quadrant."""
    short = min(height, width)
    room = min(height // 2, width // 2)  # side of the smallest quadrant's short edge
    pairs = []
    for scale in scales:
        if not 0 < scale <= 1:
            raise ValueError(f"crop scales must be in (0, 1], got {scale}")
        side = int(np.floor(scale * short))
        if min_crop_side <= side <= room:
            pairs.append((float(scale), side))
    return pairs


def plan_crops(
    height: int,
    width: int,
    n_crops: int,
    rng: np.random.Generator,
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    min_crop_side: int = 70,
    min_image_side: int = 140,
) -> list[CropBox]:
    """Boxes of the crops to cut from an image of ``height`` × ``width``.

    One crop planned, or a short side under ``min_image_side``, or no allowed scale → the
    whole image (one box, ``crop=False``, scaling 1.0, ``whole_reason`` says why). Otherwise
    ``n_crops`` square crops in distinct random quadrants, each at a random allowed scale and
    a random position inside its quadrant. Deterministic given the generator state.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image must be at least 1x1, got {height}x{width}")
    if not 1 <= n_crops <= N_QUADRANTS:
        raise ValueError(f"n_crops must be within 1..{N_QUADRANTS}, got {n_crops}")
    reason = ""
    pairs: list[tuple[float, int]] = []
    if n_crops == 1:
        reason = WHOLE_SINGLE
    elif min(height, width) < min_image_side:
        reason = WHOLE_SMALL
    else:
        pairs = allowed_scales(height, width, scales, min_crop_side)
        if not pairs:
            reason = WHOLE_NO_SCALE
    if reason:
        return [CropBox(0, int(width), 0, int(height), 1.0, crop=False, whole_reason=reason)]

    quadrants = _quadrant_bounds(height, width)[rng.choice(N_QUADRANTS, size=n_crops, replace=False)]
    choice = rng.integers(0, len(pairs), size=n_crops)
    picked_scales = np.array([pairs[i][0] for i in choice])
    sides = np.array([pairs[i][1] for i in choice], dtype=np.int64)
    y0, y1, x0, x1 = quadrants.T
    # integers(low, high) excludes high: the last valid start is (quadrant end - side).
    ys = rng.integers(y0, y1 - sides + 1)
    xs = rng.integers(x0, x1 - sides + 1)
    return [
        CropBox(int(x), int(x + s), int(y), int(y + s), float(sc)) for x, y, s, sc in zip(xs, ys, sides, picked_scales)
    ]


# --- renormalization --------------------------------------------------------------------


def channel_histograms(image: np.ndarray) -> np.ndarray:
    """(C, 256) counts of each uint8 value per channel of an (H, W) or (H, W, C) image."""
    if image.dtype != np.uint8:
        raise TypeError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"image must be 2-D or 3-D, got shape {image.shape}")
    # One bincount per channel (few channels): measured faster than a single bincount over
    # channel-offset keys, which needs a wide integer copy of the image.
    return np.stack([np.bincount(image[:, :, c].ravel(), minlength=256) for c in range(image.shape[2])])


def renormalize(crop: np.ndarray, low: float = 0.1, high: float = 99.9) -> np.ndarray:
    """Clip each channel of a uint8 crop to its [low, high] percentiles and stretch to 0-255.

    A channel whose two percentiles are equal carries no contrast and becomes zeros.
    Values round half up, as standardization does. Applied through one 256-entry lookup
    per channel.
    """
    if not 0 <= low < high <= 100:
        raise ValueError(f"need 0 <= low < high <= 100, got low={low}, high={high}")
    histograms = channel_histograms(crop)
    bounds = histogram_percentiles(histograms, [low, high])
    lo, hi = bounds[:, :1], bounds[:, 1:]
    span = hi - lo
    values = np.arange(256, dtype=np.float64)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        stretched = np.clip((values - lo) / span, 0.0, 1.0) * 255.0
    lookup = np.where(span > 0, np.floor(stretched + 0.5), 0.0).astype(np.uint8)
    if crop.ndim == 2:
        return np.take(lookup[0], crop)
    return np.stack([np.take(lookup[c], crop[:, :, c]) for c in range(crop.shape[2])], axis=2)


# --- one chunk --------------------------------------------------------------------------


def image_seed(seed: int, idx: str) -> list[int]:
    """Seed sequence of one image: the run seed plus a stable (process-independent) hash."""
    digest = hashlib.blake2b(idx.encode("utf-8"), digest_size=8).digest()
    return [int(seed), int.from_bytes(digest, "little")]


def _crops_by_image(selection: pd.DataFrame, class_sizes: Mapping[str, int] | pd.Series, rules) -> pd.DataFrame:
    """Selection indexed by idx, with the number of crops planned for each image's class."""
    missing = [c for c in SELECTION_COLUMNS if c not in selection.columns]
    if missing:
        raise ValueError(f"label selection is missing column(s) {missing}")
    duplicated = selection["idx"].duplicated()
    if duplicated.any():
        raise ValueError(f"label selection assigns image {selection.loc[duplicated, 'idx'].iloc[0]!r} more than once")
    sizes = pd.Series(class_sizes)
    unknown = sorted(set(selection["label"]) - set(sizes.index))
    if unknown:
        raise ValueError(f"class_sizes has no size for label(s) {unknown[:5]}")
    labels = pd.unique(selection["label"])
    per_label = pd.Series(crops_per_image(sizes[labels].to_numpy(dtype=np.int64), rules), index=labels)
    return selection.set_index("idx")[["label", "category"]].assign(n_crops=lambda frame: frame["label"].map(per_label))


def _check_standardized(path: str | os.PathLike) -> None:
    names = set(pq.read_schema(path).names)
    missing = [c for c in STANDARDIZED_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{path}: standardized chunk is missing column(s) {missing}")


def _crop_rows(
    idx: str, label: str, category: str, image: np.ndarray, boxes: list[CropBox], low: float, high: float
) -> Iterator[dict]:
    for k, box in enumerate(boxes):
        if box.crop:
            pixels = renormalize(image[box.y_min : box.y_max, box.x_min : box.x_max], low, high)
            crop_id = f"{idx}-c{k}"
        else:
            pixels, crop_id = image, idx
        yield {
            "crop_id": crop_id,
            "idx": idx,
            "label": label,
            "category": category,
            "crop": box.crop,
            "scaling": box.scaling,
            "x_min": box.x_min,
            "x_max": box.x_max,
            "y_min": box.y_min,
            "y_max": box.y_max,
            **encode_pixels(pixels),
        }


def upsample_chunk(
    std_parquet: str | os.PathLike,
    selection: pd.DataFrame,
    class_sizes: Mapping[str, int] | pd.Series,
    out_parquet: str | os.PathLike,
    *,
    seed: int = 0,
    rules: Sequence[tuple[int, int]] = DEFAULT_RULES,
    scales: Sequence[float] = DEFAULT_SCALES,
    min_crop_side: int = 70,
    min_image_side: int = 140,
    low: float = 0.1,
    high: float = 99.9,
    batch_size: int = 16,
) -> pd.DataFrame:
    """Write the crops of the selected images of one standardized chunk to ``out_parquet``.

    Returns one row per image of the chunk: idx, label, category, selected, n_crops_planned,
    n_crops_written, whole_reason. Images absent from ``selection`` carry no label: they get
    ``selected=False`` and zero crops (not quarantined — they simply serve no class).
    """
    _check_standardized(std_parquet)
    assigned = _crops_by_image(selection, class_sizes, rules)
    records = []
    seen: set[str] = set()
    with ParquetStreamWriter(out_parquet, CROP_SCHEMA) as writer, pq.ParquetFile(std_parquet) as handle:
        for batch in handle.iter_batches(batch_size=batch_size, columns=list(STANDARDIZED_COLUMNS)):
            for row in batch.to_pylist():
                idx = row["idx"]
                if idx in seen:
                    raise ValueError(f"{std_parquet}: image {idx!r} appears twice in the chunk")
                seen.add(idx)
                if idx not in assigned.index:
                    records.append((idx, "", "", False, 0, 0, ""))
                    continue
                label, category, n_planned = assigned.loc[idx, ["label", "category", "n_crops"]]
                image = decode_pixels(row["pixels"], row["height"], row["width"], row["n_channels"])
                boxes = plan_crops(
                    image.shape[0],
                    image.shape[1],
                    int(n_planned),
                    np.random.default_rng(image_seed(seed, idx)),
                    scales=scales,
                    min_crop_side=min_crop_side,
                    min_image_side=min_image_side,
                )
                for out_row in _crop_rows(idx, label, category, image, boxes, low, high):
                    writer.write(out_row)
                records.append((idx, label, category, True, int(n_planned), len(boxes), boxes[0].whole_reason))
    return pd.DataFrame.from_records(
        records,
        columns=["idx", "label", "category", "selected", "n_crops_planned", "n_crops_written", "whole_reason"],
    )
