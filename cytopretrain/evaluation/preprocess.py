"""Images to the backbone's inputs: steps 1-5 of feature extraction (evaluation.features).

1. Read the channels in their native dtype (core.imageio.read_channels), (H, W, C).
2. Map each channel to [0, 1] as float32:
   - ``normalize=True``: clip((x - p_low) / (p_high - p_low), 0, 1) with p_low, p_high the
     ``low``-th and ``high``-th percentiles of the channel (np.percentile's linear method,
     exactly; core.numerics). A channel with p_low == p_high has no contrast: it becomes zeros
     in ``concat`` mode and is left out of the mean in ``merge`` mode, as in the standardize
     stage. An image whose channels are all uniform fails (reason ``uniform``).
   - ``normalize=False``: the dtype's range maps to [0, 1]: uint8 / 255, uint16 / 65535, other
     integers (x - min) / (max - min) of the dtype; float images are taken as already in
     [0, 1] and clipped to it (a float channel with values above 1 saturates).
   NaN or infinite pixels fail the image (reason ``non_finite``).
3. ``merge``: the mean of the (non-uniform) channels, one grey image; ``concat``: every
   channel on its own.
4. ``resize=N``: each grey image resized to N x N (bilinear, antialiased when shrinking).
5. Grey images smaller than the backbone's ``min_input_size`` on a side are zero-padded
   (black, centred) up to that size, and for a ViT further up to the next multiple of its
   patch size (``input_multiple``): the padding adds background, which the average pool
   dilutes (a ViT's CLS token attends to it as to any background patch).

Images are read in load groups (one backbone batch's worth); the images of a group that share
shape and dtype go through steps 2-5 as one stack.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cytopretrain.core.errors import FeatureInputError, ImageReadError
from cytopretrain.core.imageio import read_channels
from cytopretrain.core.numerics import histogram_percentiles, lerp, level_counts, percentile_bracket

CHANNEL_MODES = ("concat", "merge")
# Below this many pixels partial sorting beats a histogram for uint8/uint16 percentiles
# (benchmarks/README.md, "percentiles").
_HISTOGRAM_MIN_PIXELS = 1 << 15


@dataclass(frozen=True)
class Job:
    """One image to extract: its row in the input table, id, channel files, expected count, and
    the source's z_projection (how a TIFF stack becomes one plane; None: a stack fails)."""

    position: int
    idx: str
    paths: tuple[str, ...]
    expected: int | None
    z_projection: str | None = None


@dataclass
class Loaded:
    position: int
    inputs: np.ndarray  # (C', H, W) float32 grey images fed to the backbone; C' = 1 in merge mode


@dataclass
class Failed:
    position: int
    idx: str
    reason: str
    detail: str


def plane_percentiles(planes: np.ndarray, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """The low-th and high-th percentiles (np.percentile's linear method) of each row of an
    (N, n) array of N flattened planes, as two float64 arrays of N values: from a histogram
    per plane for large uint8 / uint16 planes, else by partial sorting along the rows."""
    count, n = planes.shape
    if planes.dtype in (np.uint8, np.uint16) and n >= _HISTOGRAM_MIN_PIXELS:
        values = np.stack([histogram_percentiles(level_counts(plane), (low, high)) for plane in planes])
        return values[:, 0], values[:, 1]
    (k_low, k_low_next, w_low), (k_high, k_high_next, w_high) = percentile_bracket(n, low), percentile_bracket(n, high)
    partitioned = np.partition(planes, sorted({k_low, k_low_next, k_high, k_high_next}), axis=1)
    lower = lerp(partitioned[:, k_low], partitioned[:, k_low_next], w_low)
    upper = lerp(partitioned[:, k_high], partitioned[:, k_high_next], w_high)
    return lower, upper


def _dtype_range(dtype: np.dtype) -> tuple[float, float]:
    """The values mapped to 0 and 1 without normalization."""
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return 0.0, 1.0


def _check_finite(image: np.ndarray) -> None:
    # min/max propagate NaN and expose +-inf: two reductions find every non-finite pixel.
    if image.dtype.kind == "f" and not (np.isfinite(image.min()) and np.isfinite(image.max())):
        bad = int(np.count_nonzero(~np.isfinite(image)))
        raise FeatureInputError("non_finite", f"{bad} NaN or infinite pixels")


def unit_channels(
    images: np.ndarray, *, normalize: bool = True, low: float = 0.1, high: float = 99.9
) -> tuple[torch.Tensor, np.ndarray]:
    """A stack of B images of one shape and dtype, (B, C, H, W), as float32 planes in [0, 1]
    (step 2), (B, C, H, W), and a boolean mask (B, C) of the channels with contrast (all True
    without normalization). Pixels must be finite; an image whose channels all lack contrast
    comes back all zeros, with no channel active."""
    count, channels = images.shape[:2]
    # The subtraction runs in float32 for data that fits it (8/16-bit integers, float32) and in
    # float64 for wider data, where a large offset with a tiny span would not survive float32;
    # its result, within the span, then fits float32.
    work = np.result_type(images.dtype, np.float32)
    x = images.astype(work, order="C")
    if normalize:
        lower, upper = plane_percentiles(images.reshape(count * channels, -1), low, high)
        lower, upper = lower.reshape(count, channels), upper.reshape(count, channels)
    else:
        low_value, high_value = _dtype_range(images.dtype)
        lower, upper = np.full((count, channels), low_value), np.full((count, channels), high_value)
    active = upper > lower
    scale = np.where(active, 1.0 / np.where(active, upper - lower, 1.0), 0.0)  # 0 maps a uniform channel to 0
    shape = (count, channels, 1, 1)
    planes = torch.from_numpy(x).sub_(torch.from_numpy(lower.astype(work)).view(shape)).to(torch.float32)
    planes.mul_(torch.from_numpy(scale.astype(np.float32)).view(shape)).clamp_(0.0, 1.0)
    return planes, active


def merge_channels(planes: torch.Tensor, active: np.ndarray) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W): per image the mean of its channels with contrast (the
    others are zeros, so their sum over the count of the active ones)."""
    merged = planes[:, :1].clone()
    for c in range(1, planes.shape[1]):
        merged.add_(planes[:, c : c + 1])
    counts = active.sum(axis=1)
    if (counts == planes.shape[1]).all():
        return merged.div_(planes.shape[1])
    return merged.div_(torch.from_numpy(np.maximum(counts, 1).astype(np.float32)).view(-1, 1, 1, 1))


def resize_planes(planes: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) float32 -> (B, C, size, size): bilinear, antialiased (torch's interpolate)."""
    if planes.shape[2:] == (size, size):
        return planes
    return F.interpolate(planes, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def pad_planes(planes: torch.Tensor, min_size: int, multiple: int = 1) -> torch.Tensor:
    """(B, C, H, W) zero-padded, centred, to at least min_size on each side, then up to a
    multiple of ``multiple``."""
    height, width = planes.shape[2:]
    out_h, out_w = (-(-max(side, min_size) // multiple) * multiple for side in (height, width))
    if (out_h, out_w) == (height, width):
        return planes
    top, left = (out_h - height) // 2, (out_w - width) // 2
    return F.pad(planes, (left, out_w - width - left, top, out_h - height - top))


def read_job(job: Job) -> np.ndarray | Failed:
    """One image as (C, H, W) in its native dtype, or why it cannot be used."""
    try:
        image = read_channels(job.paths, job.expected, job.z_projection)
        _check_finite(image)
    except ImageReadError as error:
        return Failed(job.position, job.idx, error.reason, error.detail)
    except FeatureInputError as error:
        return Failed(job.position, job.idx, error.reason, f"{', '.join(job.paths)}: {error.detail}")
    return image.transpose(2, 0, 1)


def load_group(
    jobs: list[Job],
    *,
    channel_mode: str,
    normalize: bool,
    low: float,
    high: float,
    resize: int | None,
    min_size: int,
    multiple: int = 1,
) -> list[Loaded | Failed]:
    """Read a group of images and turn each into the backbone's grey inputs (steps 1-5), or say
    why it cannot, in job order; images of one shape and dtype go through steps 2-5 as one stack."""
    results: list[Loaded | Failed] = []
    stacks: dict[tuple, list[tuple[Job, np.ndarray]]] = {}
    for job in jobs:
        image = read_job(job)
        if isinstance(image, Failed):
            results.append(image)
        else:
            stacks.setdefault((image.shape, image.dtype), []).append((job, image))
    for members in stacks.values():
        images = np.stack([image for _, image in members])
        planes, active = unit_channels(images, normalize=normalize, low=low, high=high)
        if channel_mode == "merge":
            planes = merge_channels(planes, active)
        if resize is not None:
            planes = resize_planes(planes, resize)
        inputs = pad_planes(planes, min_size, multiple).numpy()
        for (job, _), image_inputs, image_active in zip(members, inputs, active):
            if image_active.any():
                results.append(Loaded(job.position, image_inputs))
            else:
                detail = f"all {len(image_active)} channel(s) uniform (p{low} == p{high})"
                results.append(Failed(job.position, job.idx, "uniform", f"{', '.join(job.paths)}: {detail}"))
    results.sort(key=lambda result: result.position)
    return results
