"""Numerics shared by the stages: percentiles of pixel data, the z-score of features, k-means.

Percentiles follow ``np.percentile``'s default (linear) method to the bit: the q-th percentile
of n values sits at rank h = (n - 1) q / 100 between the order statistics k = floor(h) and
k + 1, interpolated from the nearer of the two (numpy's rule, so results agree exactly).
Three ways lead to the same order statistics: counts per integer level (standardize,
crops, features on 8/16-bit data), partial sorting (any dtype) and, in evaluation.features,
torch.topk near the ends.

z-score: scikit-learn's StandardScaler, in chunks and without copying the whole table to
float64 (see zscore).

k-means: scikit-learn's, single-threaded so that it is reproducible bit for bit (DEC's
initial centres, the clustering protocol).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# From this many pixels on, uint8 planes are histogrammed two pixels at a time (measured faster).
_PAIRED_COUNT_MIN_PIXELS = 1 << 17


def percentile_bracket(n: int, q: float) -> tuple[int, int, float]:
    """Ranks of the order statistics around the q-th percentile of n values and the weight of
    the upper one (np.percentile's linear method)."""
    h = (n - 1) * (q / 100.0)
    k = int(np.floor(h))
    return k, min(k + 1, n - 1), h - k


def lerp(below: np.ndarray | float, above: np.ndarray | float, weight: np.ndarray | float) -> np.ndarray:
    """below + weight * (above - below), computed from the nearer end as numpy does."""
    below, above, weight = np.asarray(below, np.float64), np.asarray(above, np.float64), np.asarray(weight)
    step = above - below
    return np.where(weight < 0.5, below + step * weight, above - step * (1 - weight))


def level_counts(levels: np.ndarray) -> np.ndarray:
    """Pixel count per level of a uint8 or uint16 plane.

    Large uint8 planes are viewed as uint16: each element is a pair of neighbouring pixels,
    and the two marginals of that 256 x 256 joint histogram add up to the pixel histogram,
    for half the np.bincount work.
    """
    flat = levels.ravel()
    if flat.dtype != np.uint8 or flat.size < _PAIRED_COUNT_MIN_PIXELS:
        return np.bincount(flat)
    paired = flat[: flat.size - flat.size % 2].view(np.uint16)
    joint = np.bincount(paired, minlength=1 << 16).reshape(256, 256)
    counts = joint.sum(axis=0) + joint.sum(axis=1)
    if flat.size % 2:
        counts[flat[-1]] += 1
    return counts


def histogram_percentiles(counts: np.ndarray, q: Sequence[float], offset: int = 0) -> np.ndarray:
    """Percentiles ``q`` (0-100) of integer data given its counts per level (level i holds the
    value offset + i): ``counts`` (L,) gives (len(q),), (N, L) gives (N, len(q)), float64."""
    counts = np.asarray(counts)
    rows = np.atleast_2d(counts)
    out = np.empty((rows.shape[0], len(q)), np.float64)
    for row, row_counts in enumerate(rows):
        cumulative = np.cumsum(row_counts)
        n = int(cumulative[-1])
        if n == 0:
            raise ValueError("cannot take percentiles of an empty image")
        brackets = [percentile_bracket(n, p) for p in q]
        ranks = [rank for k, k_next, _ in brackets for rank in (k, k_next)]
        # The k-th smallest value (0-based) is the first level whose cumulative count exceeds k.
        values = np.searchsorted(cumulative, ranks, side="right") + offset
        out[row] = lerp(values[0::2], values[1::2], [weight for _, _, weight in brackets])
    return out[0] if counts.ndim == 1 else out


def selection_percentiles(values: np.ndarray, q: Sequence[float]) -> np.ndarray:
    """Percentiles ``q`` of all of ``values`` by partial sorting (np.partition): any numeric
    dtype, O(n); (len(q),) float64."""
    flat = values.ravel()
    brackets = [percentile_bracket(flat.size, p) for p in q]
    partitioned = np.partition(flat, sorted({r for k, k_next, _ in brackets for r in (k, k_next)}))
    return lerp(
        [partitioned[k] for k, _, _ in brackets],
        [partitioned[k_next] for _, k_next, _ in brackets],
        [weight for _, _, weight in brackets],
    )


def zscore(values: np.ndarray, fit_rows: np.ndarray | None = None, chunk: int = 16384) -> np.ndarray:
    """Columns centred and scaled by the mean and population standard deviation of the fit
    rows (all rows by default): scikit-learn's StandardScaler, to rounding.

    Statistics accumulate in float64 over row chunks; a float input keeps its dtype (float32
    profiles stay float32), other inputs become float64. Constant columns follow
    StandardScaler: a column whose variance is within float64 rounding of zero given its mean
    (var <= n eps var + (n |mean| eps)^2) is only centred, not scaled, so a column constant on
    the fit rows keeps the differences of the other rows, and an all-constant column becomes
    (nearly) 0.
    """
    fitted = values if fit_rows is None else values[fit_rows]
    n = len(fitted)
    if n == 0:
        raise ValueError("no rows to fit the z-score on")
    mean = sum(fitted[i : i + chunk].sum(axis=0, dtype=np.float64) for i in range(0, n, chunk)) / n
    variance = sum(((fitted[i : i + chunk] - mean) ** 2).sum(axis=0) for i in range(0, n, chunk)) / n
    eps = np.finfo(np.float64).eps
    constant = variance <= n * eps * variance + (n * mean * eps) ** 2
    scale = np.where(constant, 1.0, np.sqrt(variance))
    dtype = values.dtype if values.dtype.kind == "f" else np.float64
    out = np.empty(values.shape, dtype=dtype)
    for i in range(0, len(values), chunk):
        out[i : i + chunk] = (values[i : i + chunk] - mean) / scale
    return out
