"""Feature extraction: a backbone's global-average-pooled features for every image of a table.

Input is a canonical table (schema.py) of a benchmark source, one row per image; output is a
profile table in the pycytominer / copairs convention: ``Metadata_``-prefixed metadata columns
(METADATA_COLUMNS, from the canonical columns of the same name) followed by float32 feature
columns. Images that cannot give features go to a failure table (idx, stage, reason, detail):
profiles + failures = table rows.

Per image (CytoImageNet's four extraction methods are ``channel_mode`` x ``normalize``):

1. Read the channels in their native dtype (imageio.read_channels), (H, W, C).
2. Map each channel to [0, 1] as float32:
   - ``normalize=True``: clip((x - p_low) / (p_high - p_low), 0, 1) with p_low, p_high the
     ``low``-th and ``high``-th percentiles of the channel (np.percentile's linear method,
     exactly; plane_percentiles picks the cheapest way). A channel with p_low == p_high has
     no contrast: it becomes zeros in ``concat`` mode and is left out of the mean in
     ``merge`` mode, as in the standardize stage. An image whose channels are all uniform fails (reason ``uniform``).
   - ``normalize=False``: the dtype's range maps to [0, 1]: uint8 / 255, uint16 / 65535, other
     integers (x - min) / (max - min) of the dtype; float images are taken as already in
     [0, 1] and clipped to it (a float channel with values above 1 saturates).
   NaN or infinite pixels fail the image (reason ``non_finite``).
3. ``merge``: the mean of the (non-uniform) channels, one grey image; ``concat``: every
   channel on its own.
4. ``resize=N``: each grey image resized to N x N (bilinear, antialiased when shrinking).
5. Grey images smaller than ``backbone.min_input_size`` on a side are zero-padded (black,
   centred) up to that size: the padding adds background, which the average pool dilutes.
6. The grey image is repeated over the backbone's ``in_channels``; ``input_norm="imagenet"``
   then subtracts the ImageNet mean and divides by its standard deviation per RGB channel
   (for ImageNet weights; needs a 3-channel backbone).

Features: ``merge`` gives D features per image (``f_<k>``), ``concat`` gives D per channel,
concatenated in channel order (``f_<channel>_<k>``, names from the table's ``channels``
column, or c0, c1, ... when it is empty).

Batching. At native resolution images of one (H, W) are batched together: rows are read as a
stream and sorted into one bucket per shape; a bucket is run through the backbone when it holds
a batch, every partial bucket at the end, and the fullest bucket early when more than four
batches' worth of images wait in part-filled buckets (tables of many different shapes).
``batch_size`` counts backbone inputs (grey images), so a ``concat`` batch holds
batch_size // C images. Images are read in load groups of one batch's worth; the images of a
group that share shape and dtype are normalized, merged, resized and padded as one stack.
Without channel names a ``concat`` run takes the channel count of its first readable image.
On the CPU the model takes a batch in slices of at most 2^18 input pixels (5 images of
224 x 224, the whole batch of 68 px crops), whose activations stay in the caches: 224 px
fields ran 25-38 % faster than in one forward of 32 (cpu_slice_images).

Threads. On the CPU, work runs in "lanes": as many threads as torch has
(torch.get_num_threads()), each running torch on one intra-op thread. A lane reads a load
group and, when the group makes a full batch of one shape (the usual case), runs it through
the backbone at once; the other images go to the shape buckets, whose batches run in the next
free lane. On 2 cores the whole pipeline ran 16-26 % faster this way than with the model in
the calling thread on both intra-op threads (68 px crops, bf16 / fp32) and 14 % faster on
224 px fields in fp32, 7 % slower in bf16: an efficientnet's many small kernels leave
intra-op threads waiting, and each lane's reading overlaps the other's forward;
``num_workers`` is not used then. While lanes run, Python switches threads every 1 ms instead of
5 (restored afterwards), so that a lane in Python code keeps the other waiting for the GIL
less (_LANE_SWITCH_SECONDS). On a GPU, or on the CPU with one torch thread, the calling
thread runs the model and ``num_workers`` loader threads (2-8 beside a GPU; 0: load
in the calling thread) read the groups, at most one group per thread ahead. Memory stays
bounded by a few batches either way; torch's thread count is restored when the run ends.

Devices and precision. ``device="auto"`` is CUDA when available, else the CPU. ``precision``
"auto" is bf16 autocast on a GPU that supports it and fp32 on the CPU (CPU bf16 is about twice
as fast on processors with bf16 matrix units and slower elsewhere; ask for it with "bf16").
The model and batches use the channels_last layout (on the CPU in fp32 too, measured faster,
except for densenet121). Features are float32 in every case.

The model. The run uses an inference copy of the backbone (models.InferenceBackbone): eval
mode, each BatchNorm that follows a convolution folded into it, on the run's device and in its
layout, under torch.inference_mode. Its features equal the backbone's eval-mode forward up to
float rounding, and it ran 19-27 % faster on the CPU (efficientnet_b0, ResNets). The backbone
itself is left as it was (mode, device, layout, hooks). The copy is kept for later runs with
the same backbone while its weights are unchanged (inference_copy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import sys
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from cytopretrain.imageio import ImageReadError, read_channels
from cytopretrain.models import Backbone, InferenceBackbone, build_backbone
from cytopretrain.schema import QUARANTINE_FIELDS, SchemaError
from cytopretrain.standardize import histogram_percentiles, level_counts, percentile_bracket
from cytopretrain.tables import atomic_path

STAGE = "extract_features"
METADATA_PREFIX = "Metadata_"
FEATURE_PREFIX = "f_"
CHANNEL_MODES = ("concat", "merge")
PRECISIONS = ("auto", "fp32", "bf16")
INPUT_NORMS = (None, "imagenet")
# Canonical columns carried into the profile table (as Metadata_<column>), in this order.
METADATA_COLUMNS = (
    "idx",
    "name",
    "phenotype",
    "compound",
    "concentration",
    "sirna",
    "gene",
    "cell_type",
    "plate",
    "well",
    "batch",
    "split",
    "organism",
    "channels",
)
_FLOAT_METADATA = ("concentration",)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Below this many pixels selection beats a histogram for uint8/uint16 percentiles (measured per
# plane: 68 x 68 uint16 17 us by np.partition against 60 us, 224 x 224 uint16 410 us against 120 us).
_SELECTION_MAX_PIXELS = 1 << 15
# torch.topk finds percentiles this close to either end of the sorted values faster than a
# partition of the whole plane (68 x 68 planes, k = 6: both ends in 7 us per plane on 2 threads,
# against 14 us for np.partition).
_TOPK_MAX_RANK = 64
# The float dtype that holds every value of a pixel dtype exactly (topk runs on floats).
_EXACT_FLOAT = {
    np.dtype(np.uint8): np.float32, np.dtype(np.int8): np.float32, np.dtype(np.uint16): np.float32,
    np.dtype(np.int16): np.float32, np.dtype(np.float32): np.float32, np.dtype(np.uint32): np.float64,
    np.dtype(np.int32): np.float64, np.dtype(np.float64): np.float64,
}
# Backbones that run fp32 on the CPU faster in NCHW than in channels_last (measured on this
# project's 2-core machines: densenet121 0.7x in channels_last; efficientnet_b0 1.2-2.5x and
# the ResNets up to 2x faster in channels_last).
_NCHW_FP32_ON_CPU = ("densenet121",)
# On the CPU a batch runs through the model in slices of at most this many input pixels
# (images x H x W), whose activations stay in the caches. efficientnet_b0 on one thread, ms per
# image fp32 / bf16: 224 px 28.3 / 16.0 in batches of 32, 17.6 / 12.0 in slices of 8;
# 128 px 6.9 / 4.1 against 6.0 / 4.1 in slices of 8; 68 px 2.3 / 1.8 in batches of 32, slower
# below 16 images (2.7 / 2.1 at 8).
_CPU_SLICE_PIXELS = 1 << 18
# Python's thread switch interval while lanes run (the default is 5 ms). A lane in Python code
# (reading files, dispatching the model's modules) holds the GIL until it blocks or the interval
# ends, while the other lane may wait for it to dispatch its next kernel. With 1 ms the 2 lanes
# kept 1.85-1.87 cores busy on 68 px crops in bf16, against 1.81-1.83 with 5 ms.
_LANE_SWITCH_SECONDS = 0.001
# Batches' worth of images that may wait in part-filled shape buckets (see _Buckets).
_BUFFERED_BATCHES = 4
# Rows per Parquet row group when profiles are streamed to a file.
_ROWS_PER_GROUP = 2048

ChannelMode = Literal["concat", "merge"]


class FeatureInputError(ValueError):
    """An image gives no features; ``reason`` is "non_finite" (uniform images fail in _load_group)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ExtractionOptions:
    """Validated options of one extraction run (see extract_features)."""

    channel_mode: ChannelMode = "concat"
    normalize: bool = True
    low: float = 0.1
    high: float = 99.9
    resize: int | None = None
    batch_size: int = 32
    device: str | torch.device = "auto"
    precision: str = "auto"
    input_norm: str | None = None
    expected_channels: int | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.channel_mode not in CHANNEL_MODES:
            raise ValueError(f"channel_mode must be one of {CHANNEL_MODES}, got {self.channel_mode!r}")
        if not 0 <= self.low < self.high <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got low={self.low}, high={self.high}")
        if self.resize is not None and (not isinstance(self.resize, int) or self.resize < 1):
            raise ValueError(f"resize must be None or a positive integer, got {self.resize!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be None or 'imagenet', got {self.input_norm!r}")
        if self.expected_channels is not None and (
            not isinstance(self.expected_channels, int) or self.expected_channels < 1
        ):
            raise ValueError(f"expected_channels must be None or a positive integer, got {self.expected_channels!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {self.num_workers!r}")


# ---------------------------------------------------------------- images of one shape, batched
#
# Steps 2-5 run on a stack of images of one shape and dtype at a time (a load group, see
# _load_group): a few vectorized passes over the stack instead of a dozen small calls per image,
# which on 68 px crops cost more than the arithmetic itself.


def _histogram_wins(dtype: np.dtype, pixels: int) -> bool:
    return dtype in (np.uint8, np.uint16) and pixels > _SELECTION_MAX_PIXELS


def plane_percentiles(planes: np.ndarray, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """The low-th and high-th percentiles (np.percentile's linear method) of each row of an
    (N, n) array of N flattened planes, as two float64 arrays of N values.

    Three ways to the same order statistics, picked by measured cost:
    - uint8 / uint16 planes of more than _SELECTION_MAX_PIXELS pixels: a histogram per plane;
    - otherwise, when both percentiles lie within _TOPK_MAX_RANK values of the ends (the
      default 0.1 / 99.9 up to ~60,000 pixels): torch.topk of the few smallest and largest values
      of every plane at once, on a float copy that holds every value exactly (float32 for
      8/16-bit integers and float32, float64 for 32-bit integers and float64);
    - else np.partition along the rows, in the native dtype.
    """
    count, n = planes.shape
    (k_low, k_low_next, w_low), (k_high, k_high_next, w_high) = percentile_bracket(n, low), percentile_bracket(n, high)
    if _histogram_wins(planes.dtype, n):
        pairs = [histogram_percentiles(level_counts(plane), low, high) for plane in planes]
        values = np.array(pairs, np.float64).reshape(count, 2)
        return values[:, 0], values[:, 1]
    exact = _EXACT_FLOAT.get(planes.dtype)
    if exact is not None and k_low_next < _TOPK_MAX_RANK and n - k_high <= _TOPK_MAX_RANK:
        x = torch.from_numpy(planes.astype(exact, copy=False))
        smallest = torch.topk(x, k_low_next + 1, dim=1, largest=False, sorted=True).values.double().numpy()
        # largest[:, j] is the (n - 1 - j)-th smallest value
        largest = torch.topk(x, n - k_high, dim=1, largest=True, sorted=True).values.double().numpy()
        order = {k_low: smallest[:, k_low], k_low_next: smallest[:, k_low_next],
                 k_high: largest[:, n - 1 - k_high], k_high_next: largest[:, n - 1 - k_high_next]}
    else:
        ranks = sorted({k_low, k_low_next, k_high, k_high_next})
        partitioned = np.partition(planes, ranks, axis=1)
        order = {k: partitioned[:, k].astype(np.float64) for k in ranks}
    lower = order[k_low] + w_low * (order[k_low_next] - order[k_low])
    upper = order[k_high] + w_high * (order[k_high_next] - order[k_high])
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
    (step 2 of the module docstring), (B, C, H, W), and a boolean mask (B, C) of the channels
    with contrast (all True without normalization). Pixels must be finite (_check_finite); an
    image whose channels all lack contrast comes back all zeros, with no channel active."""
    count, channels = images.shape[:2]
    # The subtraction runs in float32 for data that fits it (8/16-bit integers, float32) and in
    # float64 for wider data, where a large offset with a tiny span would not survive float32;
    # its result, within the span, then fits float32. The copy is worked on in place: fresh
    # buffers of this size cost page faults on every call.
    work = np.result_type(images.dtype, np.float32)
    x = images.astype(work, order="C")
    if normalize:
        # the float copy serves the percentiles too, unless they come from native integers
        exact = images.dtype in _EXACT_FLOAT and not _histogram_wins(images.dtype, images[0, 0].size)
        source = x if exact else images
        lower, upper = plane_percentiles(source.reshape(count * channels, -1), low, high)
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
    # Channel by channel: a reduction over a short middle axis measured 3-5x slower.
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


def pad_planes(planes: torch.Tensor, min_size: int) -> torch.Tensor:
    """(B, C, H, W) zero-padded, centred, to at least min_size on each side."""
    height, width = planes.shape[2:]
    if height >= min_size and width >= min_size:
        return planes
    out_h, out_w = max(height, min_size), max(width, min_size)
    top, left = (out_h - height) // 2, (out_w - width) // 2
    return F.pad(planes, (left, out_w - width - left, top, out_h - height - top))


# ---------------------------------------------------------------- jobs and batches


@dataclass(frozen=True)
class _Job:
    position: int  # row number in the input table
    idx: str
    paths: tuple[str, ...]
    expected: int | None  # channel count to check while reading


@dataclass
class _Loaded:
    position: int
    inputs: np.ndarray  # (C', H, W) float32 grey images fed to the backbone; C' = 1 in merge mode


@dataclass
class _Failed:
    position: int
    idx: str
    reason: str
    detail: str


def _check_table(table: pd.DataFrame) -> None:
    missing = [c for c in ("idx", "channel_paths") if c not in table.columns]
    if missing:
        raise SchemaError(f"extract_features: table lacks column(s) {missing}")
    duplicated = table["idx"].duplicated()
    if duplicated.any():
        raise SchemaError(f"extract_features: duplicate idx {table.loc[duplicated, 'idx'].iloc[0]!r}")


def _channel_names(table: pd.DataFrame) -> list[str]:
    """The table's one list of channel names ([] if it names none); concat mode needs one."""
    if "channels" not in table.columns:
        return []
    values = {v for v in table["channels"].tolist() if isinstance(v, str) and v}
    if len(values) > 1:
        first, second = sorted(values)[:2]
        raise SchemaError(
            f"extract_features: concat mode needs one channel list per table, found {first!r} and {second!r}"
        )
    return values.pop().split("|") if values else []


def _jobs(table: pd.DataFrame, expected: Callable[[str], int | None]) -> Iterator[_Job]:
    channels = table["channels"].tolist() if "channels" in table.columns else [""] * len(table)
    for position, (idx, paths, names) in enumerate(
        zip(table["idx"].tolist(), table["channel_paths"].tolist(), channels)
    ):
        if isinstance(paths, (str, bytes)) or not isinstance(paths, Iterable) or len(paths) == 0:
            raise SchemaError(f"extract_features: idx {idx!r}: channel_paths must be a non-empty list, got {paths!r}")
        yield _Job(position, str(idx), tuple(str(p) for p in paths), expected(names if isinstance(names, str) else ""))


def _read(job: _Job) -> np.ndarray | _Failed:
    """One image as (C, H, W) in its native dtype (a view when the channels came from separate
    files), or why it cannot be used."""
    try:
        image = read_channels(job.paths, job.expected)
        _check_finite(image)
    except ImageReadError as error:
        return _Failed(job.position, job.idx, error.reason, error.detail)
    except FeatureInputError as error:
        return _Failed(job.position, job.idx, error.reason, f"{', '.join(job.paths)}: {error.detail}")
    return image.transpose(2, 0, 1)


def _load_group(jobs: list[_Job], options: ExtractionOptions, min_size: int) -> list[_Loaded | _Failed]:
    """Read a group of images and turn each into the backbone's grey inputs (steps 1-5), or say
    why it cannot; images of one shape and dtype go through steps 2-5 as one stack."""
    results: list[_Loaded | _Failed] = []
    stacks: dict[tuple, list[tuple[_Job, np.ndarray]]] = {}
    for job in jobs:
        image = _read(job)
        if isinstance(image, _Failed):
            results.append(image)
        else:
            stacks.setdefault((image.shape, image.dtype), []).append((job, image))
    for members in stacks.values():
        images = np.stack([image for _, image in members])
        planes, active = unit_channels(images, normalize=options.normalize, low=options.low, high=options.high)
        if options.channel_mode == "merge":
            planes = merge_channels(planes, active)
        if options.resize is not None:
            planes = resize_planes(planes, options.resize)
        inputs = pad_planes(planes, min_size).numpy()
        for (job, _), image_inputs, image_active in zip(members, inputs, active):
            if image_active.any():
                results.append(_Loaded(job.position, image_inputs))
            else:
                detail = f"all {len(image_active)} channel(s) uniform (p{options.low} == p{options.high})"
                results.append(_Failed(job.position, job.idx, "uniform", f"{', '.join(job.paths)}: {detail}"))
    results.sort(key=lambda result: result.position)
    return results


class _OrderedPool:
    """Tasks run by ``workers`` threads named ``name`` (inline when 0), their results handed
    back in submission order. Every pool thread runs torch on one intra-op thread.

    Threads rather than DataLoader processes: decoders, file reads, numpy and torch kernels
    release the GIL, and on this project's 2-core machines worker processes measured 10-15 %
    slower (one torch thread, 68 px crops): pickling results through a pipe costs more than
    the GIL hand-overs it avoids."""

    def __init__(self, workers: int, name: str):
        self.pending: deque = deque()
        self.threads = torch.get_num_threads()
        self.executor = (
            ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(1,))
            if workers
            else None
        )

    def __enter__(self) -> "_OrderedPool":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            # set_num_threads in a pool thread also sets the count later threads start with
            torch.set_num_threads(self.threads)

    def submit(self, function: Callable, *args) -> None:
        if self.executor is None:
            self.pending.append(function(*args))
        else:
            self.pending.append(self.executor.submit(function, *args))

    def results(self, keep: int) -> Iterator:
        """Results in submission order, waiting for each, until at most ``keep`` tasks are
        pending (tasks submitted meanwhile count too)."""
        while len(self.pending) > keep:
            result = self.pending.popleft()
            yield result if self.executor is None else result.result()


# ---------------------------------------------------------------- the model side


def cpu_slice_images(height: int, width: int) -> int:
    """Images per forward pass on the CPU for inputs of height x width (_CPU_SLICE_PIXELS)."""
    return max(1, _CPU_SLICE_PIXELS // (height * width))


def _resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _amp_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if precision == "bf16":
            raise ValueError(f"precision bf16 requested but {device} does not support bfloat16")
        return None
    return torch.bfloat16


# Inference copies of backbones (models.InferenceBackbone) with the weights they were made
# from: benchmarks and tests extract many small tables with one model, and folding costs
# 0.1-0.3 s. A copy is reused while the source holds the same tensor objects at the same
# addresses and versions (in-place updates such as an optimizer step bump a tensor's version).
_INFERENCE_COPIES: "weakref.WeakKeyDictionary[Backbone, tuple]" = weakref.WeakKeyDictionary()


def _tensors(backbone: Backbone) -> list[torch.Tensor]:
    return list(itertools.chain(backbone.parameters(), backbone.buffers()))


def _weights_state(backbone: Backbone) -> list[tuple]:
    return [(weakref.ref(t), t.data_ptr(), t._version) for t in _tensors(backbone)]


def _same_weights(backbone: Backbone, state: list[tuple]) -> bool:
    tensors = _tensors(backbone)
    return len(tensors) == len(state) and all(
        ref() is t and t.data_ptr() == pointer and t._version == version
        for t, (ref, pointer, version) in zip(tensors, state)
    )


def inference_copy(backbone: Backbone, device: torch.device, memory_format: torch.memory_format) -> InferenceBackbone:
    """The backbone's BatchNorm-folded eval copy on ``device`` in ``memory_format``, reused
    from an earlier call while the backbone's weights are unchanged."""
    cached = _INFERENCE_COPIES.get(backbone)
    if cached is not None:
        key, state, model = cached
        if key == (device, memory_format) and _same_weights(backbone, state):
            return model
    model = InferenceBackbone(backbone).to(device, memory_format=memory_format)
    _INFERENCE_COPIES[backbone] = ((device, memory_format), _weights_state(backbone), model)
    return model


class _Runner:
    """Runs batches of grey images through the backbone's inference copy (BatchNorms folded,
    see models.InferenceBackbone): (B, C', H, W) -> (B, C' * D) float32."""

    def __init__(self, backbone: Backbone, options: ExtractionOptions):
        if options.input_norm == "imagenet" and backbone.in_channels != 3:
            raise ValueError(
                f"input_norm 'imagenet' needs a backbone with 3 input channels, got {backbone.in_channels}"
            )
        self.device = _resolve_device(options.device)
        self.amp_dtype = _amp_dtype(self.device, options.precision)
        self.channels_last = (
            self.device.type == "cuda" or self.amp_dtype is not None or backbone.name not in _NCHW_FP32_ON_CPU
        )
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = inference_copy(backbone, self.device, layout)
        self.input_norm = options.input_norm
        # CPU: one batch per torch thread, each on one intra-op thread (see the module docstring)
        self.lanes = 1 if self.device.type == "cuda" else torch.get_num_threads()
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(shape)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(shape)

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        batch, per_image = inputs.shape[:2]
        x = torch.from_numpy(inputs).reshape(batch * per_image, 1, *inputs.shape[2:])
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode():
            if self.model.in_channels > 1:
                x = x.expand(-1, self.model.in_channels, -1, -1)
            if self.input_norm == "imagenet":
                x = (x - self.mean) / self.std
            x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            step = cpu_slice_images(*x.shape[2:]) if self.device.type == "cpu" else len(x)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                features = torch.cat([self.model(x[start : start + step]) for start in range(0, len(x), step)])
            features = features.float().reshape(batch, -1)
            return features.cpu().numpy()


# ---------------------------------------------------------------- the stream of batches


@dataclass
class _Stream:
    """Feature batches of a table plus what the run learns along the way."""

    failures: list[_Failed]
    feature_names: list[str] | None = None  # known once the first batch has run


def _feature_names(mode: str, channel_names: list[str], per_image: int, feature_dim: int) -> list[str]:
    if mode == "merge":
        return [f"{FEATURE_PREFIX}{k}" for k in range(feature_dim)]
    names = channel_names or [f"c{c}" for c in range(per_image)]
    return [f"{FEATURE_PREFIX}{name}_{k}" for name in names for k in range(feature_dim)]


def _first_channel_count(jobs: list[_Job]) -> int | None:
    """The channel count of the table's first readable image (None if none is readable)."""
    for job in jobs:
        try:
            return read_channels(job.paths).shape[2]
        except ImageReadError:
            continue
    return None


def _batches(
    table: pd.DataFrame, backbone: Backbone, options: ExtractionOptions, stream: _Stream
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions, features) per backbone batch; failures go to ``stream.failures``."""
    _check_table(table)
    concat = options.channel_mode == "concat"
    channel_names = _channel_names(table) if concat else []
    if concat and channel_names and options.expected_channels not in (None, len(channel_names)):
        raise SchemaError(
            f"extract_features: expected_channels={options.expected_channels} but the table names "
            f"{len(channel_names)} channels {channel_names}"
        )
    table_count = options.expected_channels or len(channel_names) or None

    def expected(names: str) -> int | None:
        # concat needs the one count of the table; merge checks each row against its own names
        if concat:
            return table_count
        return options.expected_channels or (len(names.split("|")) if names else None)

    jobs = list(_jobs(table, expected))  # checks every row before any work
    if concat and table_count is None:
        # Without channel names a concat run takes the count of its first readable image.
        table_count = _first_channel_count(jobs)
        jobs = [dataclasses.replace(job, expected=table_count) for job in jobs]
    per_image = table_count if concat else 1  # backbone inputs per image
    per_batch = max(1, options.batch_size // (per_image or 1))
    runner = _Runner(backbone, options)
    in_lanes = runner.lanes > 1

    def run(items: list[_Loaded]) -> tuple[np.ndarray, np.ndarray]:
        positions = np.fromiter((item.position for item in items), np.int64, len(items))
        return positions, runner(np.stack([item.inputs for item in items]))

    def load(group: list[_Job]) -> tuple[list, list[_Loaded | _Failed]]:
        """A group's (feature batches, images left to batch): in a lane the group's full
        batches of one shape run at once; the rest goes to the shape buckets."""
        results = _load_group(group, options, backbone.min_input_size)
        if not in_lanes:
            return [], results
        by_shape: dict[tuple, list[_Loaded]] = {}
        for item in results:
            if isinstance(item, _Loaded):
                by_shape.setdefault(item.inputs.shape, []).append(item)
        full = [items for items in by_shape.values() if len(items) == per_batch]
        done = {item.position for items in full for item in items}
        return [run(items) for items in full], [item for item in results if item.position not in done]

    def features_of(result: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if stream.feature_names is None:
            stream.feature_names = _feature_names(options.channel_mode, channel_names, per_image, backbone.feature_dim)
        return result

    def ran(items: list[_Loaded]) -> tuple[list, list]:
        return [run(items)], []

    # A load group holds the images of one backbone batch: its memory is that of a batch.
    groups = [jobs[start : start + per_batch] for start in range(0, len(jobs), per_batch)]
    workers = runner.lanes if in_lanes else options.num_workers
    buckets = _Buckets(per_batch)
    with (
        # lanes: torch on one intra-op thread each, and Python switching threads more often
        _setting(torch.get_num_threads, torch.set_num_threads, 1 if in_lanes else None),
        _setting(sys.getswitchinterval, sys.setswitchinterval, _LANE_SWITCH_SECONDS if in_lanes else None),
        _OrderedPool(workers, "features-worker") as pool,
    ):

        def dispatch(batch: list[_Loaded]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            """A bucketed batch runs in the next free lane (its features come with the
            lane's results), or here without lanes."""
            if in_lanes:
                pool.submit(ran, batch)
            else:
                yield features_of(run(batch))

        def collect(keep: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            """Features of finished tasks; their images left to batch fill the shape buckets."""
            for batches, rest in pool.results(keep):
                yield from map(features_of, batches)
                for item in rest:
                    if isinstance(item, _Failed):
                        stream.failures.append(item)
                    elif ready := buckets.add(item):
                        yield from dispatch(ready)

        for group in groups:
            pool.submit(load, group)
            yield from collect(keep=workers)
        yield from collect(keep=0)
        for batch in buckets.drain():
            yield from dispatch(batch)
        yield from collect(keep=0)


@contextlib.contextmanager
def _setting(get: Callable[[], object], set_to: Callable[[object], None], value: object) -> Iterator[None]:
    """A process-wide setting (read by ``get``, written by ``set_to``) at ``value`` for the
    block, restored afterwards; None leaves it unchanged."""
    if value is None:
        yield
        return
    previous = get()
    set_to(value)
    try:
        yield
    finally:
        set_to(previous)


class _Buckets:
    """Loaded images grouped by input shape, handed out as batches of one shape.

    A bucket is handed out when it holds a batch. Images of many different shapes (crops of
    varying size) could otherwise pile up in part-filled buckets: past ``_BUFFERED_BATCHES``
    batches' worth of buffered images, the fullest bucket is handed out early, so memory
    stays bounded by a few batches whatever the table holds.
    """

    def __init__(self, per_batch: int):
        self.per_batch = per_batch
        self.by_shape: dict[tuple[int, ...], list[_Loaded]] = {}
        self.buffered = 0

    def add(self, item: _Loaded) -> list[_Loaded] | None:
        shape = item.inputs.shape
        self.by_shape.setdefault(shape, []).append(item)
        self.buffered += 1
        if len(self.by_shape[shape]) >= self.per_batch:
            return self._pop(shape)
        if self.buffered > _BUFFERED_BATCHES * self.per_batch:
            return self._pop(max(self.by_shape, key=lambda s: len(self.by_shape[s])))
        return None

    def drain(self) -> Iterator[list[_Loaded]]:
        while self.by_shape:
            yield self._pop(next(iter(self.by_shape)))

    def _pop(self, shape: tuple[int, ...]) -> list[_Loaded]:
        batch = self.by_shape.pop(shape)
        self.buffered -= len(batch)
        return batch


# ---------------------------------------------------------------- tables


def metadata_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The Metadata_ columns of a profile table for every row of ``table``: text as str,
    concentration as float64; missing canonical columns become "" or NaN, as schema.conform
    fills them."""
    columns = {}
    for column in METADATA_COLUMNS:
        if column in _FLOAT_METADATA:
            values = pd.to_numeric(table[column]).to_numpy(np.float64) if column in table.columns else np.nan
        elif column in table.columns:
            text = table[column].to_numpy(object)
            values = np.where(pd.isna(text), "", text).astype(str).astype(object)
        else:
            values = ""
        columns[METADATA_PREFIX + column] = values
    return pd.DataFrame(columns, index=pd.RangeIndex(len(table)))


def _profile_frame(meta: pd.DataFrame, positions: np.ndarray, features: np.ndarray, names: list[str]) -> pd.DataFrame:
    rows = meta.iloc[positions].reset_index(drop=True)
    return pd.concat([rows, pd.DataFrame(features, columns=names, copy=False)], axis=1)


def _failure_frame(failures: list[_Failed]) -> pd.DataFrame:
    ordered = sorted(failures, key=lambda f: f.position)
    frame = pd.DataFrame(
        [(f.idx, STAGE, f.reason, f.detail) for f in ordered], columns=list(QUARANTINE_FIELDS)
    )
    return frame.astype(object)


def extract_features(
    table: pd.DataFrame,
    backbone: Backbone,
    *,
    channel_mode: ChannelMode = "concat",
    normalize: bool = True,
    low: float = 0.1,
    high: float = 99.9,
    resize: int | None = None,
    batch_size: int = 32,
    device: str | torch.device = "auto",
    precision: str = "auto",
    input_norm: str | None = None,
    expected_channels: int | None = None,
    num_workers: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Features of every image of ``table`` (see the module docstring), in memory.

    Returns (profiles, failures): profiles has METADATA_COLUMNS as ``Metadata_<column>`` and
    then the float32 feature columns, one row per image that gave features, in table order;
    failures has columns idx, stage ("extract_features"), reason, detail, one row per image
    that did not (reasons: imageio's READ_REASONS, "uniform", "non_finite"). A table whose
    every image fails gives profiles without feature columns.
    """
    options = ExtractionOptions(
        channel_mode, normalize, low, high, resize, batch_size, device, precision, input_norm,
        expected_channels, num_workers,
    )
    stream = _Stream(failures=[])
    parts = list(_batches(table, backbone, options, stream))
    meta = metadata_frame(table)
    names = stream.feature_names or []
    positions = np.concatenate([p for p, _ in parts]) if parts else np.zeros(0, np.int64)
    features = np.concatenate([f for _, f in parts]) if parts else np.zeros((0, len(names)), np.float32)
    order = np.argsort(positions, kind="stable")
    return _profile_frame(meta, positions[order], features[order], names), _failure_frame(stream.failures)


class _ProfileWriter:
    """Profile rows appended to one Parquet file in row groups; renamed into place on close."""

    def __init__(self, path: str | os.PathLike):
        self._atomic = atomic_path(path)
        self._tmp = self._atomic.__enter__()
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def write(self, frame: pd.DataFrame) -> None:
        self._pending.append(_arrow_profiles(frame))
        self._pending_rows += len(frame)
        if self._pending_rows >= _ROWS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        batch = pa.concat_tables(self._pending)
        if self._writer is None:
            metadata = [n for n in batch.schema.names if n.startswith(METADATA_PREFIX)]
            # Dictionaries pay off on repeated metadata strings, never on float features.
            self._writer = pq.ParquetWriter(self._tmp, batch.schema, compression="zstd", use_dictionary=metadata)
        self._writer.write_table(batch, row_group_size=len(batch))
        self._pending, self._pending_rows = [], 0

    def close(self, empty: pd.DataFrame) -> None:
        """Finish the file; ``empty`` (a zero-row profile frame) gives the schema if nothing was written."""
        if self._writer is None and not self._pending:
            self._pending.append(_arrow_profiles(empty))
        self._flush()
        self._writer.close()
        self._atomic.__exit__(None, None, None)

    def abort(self, error: BaseException) -> None:
        if self._writer is not None:
            self._writer.close()
        self._atomic.__exit__(type(error), error, None)


def _arrow_profiles(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(frame, preserve_index=False)


def write_profiles(profiles: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a profile table to Parquet atomically (float32 features stay float32)."""
    writer = _ProfileWriter(path)
    try:
        for start in range(0, len(profiles), _ROWS_PER_GROUP):
            writer.write(profiles.iloc[start : start + _ROWS_PER_GROUP])
    except BaseException as error:
        writer.abort(error)
        raise
    writer.close(profiles.iloc[:0])


def extract_features_to_parquet(
    table: pd.DataFrame, backbone: Backbone, path: str | os.PathLike, **options
) -> pd.DataFrame:
    """extract_features streamed to a Parquet profile file; returns the failures.

    Memory is bounded by a row group (2048 profiles) and a few batches, whatever the table's
    size. Rows appear in the order their batches finish (grouped by image shape), not in
    table order; Metadata_idx identifies them. Options are those of extract_features.
    """
    run_options = ExtractionOptions(**options)
    stream = _Stream(failures=[])
    meta = metadata_frame(table)
    writer = _ProfileWriter(path)
    try:
        for positions, features in _batches(table, backbone, run_options, stream):
            writer.write(_profile_frame(meta, positions, features, stream.feature_names))
    except BaseException as error:
        writer.abort(error)
        raise
    names = stream.feature_names or []
    writer.close(_profile_frame(meta, np.zeros(0, np.int64), np.zeros((0, len(names)), np.float32), names))
    return _failure_frame(stream.failures)


# ---------------------------------------------------------------- baselines


def random_init_backbone(name: str, in_channels: int = 1, seed: int = 0) -> Backbone:
    """A backbone with torchvision's random init drawn from ``seed``: the same seed gives the
    same weights, and the global torch RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_backbone(name, in_channels=in_channels)


def _split_columns(profiles: pd.DataFrame) -> tuple[list[str], list[str]]:
    metadata = [c for c in profiles.columns if str(c).startswith(METADATA_PREFIX)]
    features = [c for c in profiles.columns if not str(c).startswith(METADATA_PREFIX)]
    return metadata, features


def zscore(features: np.ndarray, block: int = 256) -> np.ndarray:
    """Columns z-scored with their mean and population standard deviation (StandardScaler),
    computed in float64 one block of columns at a time; constant columns become 0. float32."""
    out = np.empty(features.shape, np.float32)
    for start in range(0, features.shape[1], block):
        values = features[:, start : start + block].astype(np.float64)
        mean = values.mean(axis=0)
        std = values.std(axis=0)
        centred = values - mean
        # A column of equal values can show a std of the mean's rounding error (~1e-15 relative);
        # one float32 step among 10^6 rows still gives ~1e-10.
        constant = std <= 1e-12 * np.abs(mean)
        out[:, start : start + block] = np.where(constant, 0.0, centred / np.where(constant, 1.0, std))
    return out


def fuse_profiles(
    a: pd.DataFrame, b: pd.DataFrame, *, suffixes: tuple[str, str] = ("a", "b")
) -> pd.DataFrame:
    """The fusion baseline: two profile tables of the same images, each feature block z-scored
    over all rows, concatenated side by side (a's features, then b's).

    Rows are aligned on Metadata_idx (b reordered to a's order); the id sets must be equal and
    unique. Metadata columns are a's. Feature columns become ``<column>_<suffix>``.
    """
    key = METADATA_PREFIX + "idx"
    if len(suffixes) != 2 or suffixes[0] == suffixes[1]:
        raise ValueError(f"suffixes must be two different strings, got {suffixes!r}")
    for label, frame in zip(suffixes, (a, b)):
        if key not in frame.columns:
            raise SchemaError(f"fuse_profiles: profiles {label!r} lack column {key}")
        if frame[key].duplicated().any():
            repeated = frame.loc[frame[key].duplicated(), key].iloc[0]
            raise SchemaError(f"fuse_profiles: profiles {label!r} repeat {key} {repeated!r}")
    only_a = set(a[key]) - set(b[key])
    only_b = set(b[key]) - set(a[key])
    if only_a or only_b:
        example = sorted(only_a or only_b)[0]
        raise SchemaError(
            f"fuse_profiles: the tables hold different images ({len(only_a)} only in {suffixes[0]!r}, "
            f"{len(only_b)} only in {suffixes[1]!r}, e.g. {example!r})"
        )
    metadata, features_a = _split_columns(a)
    _, features_b = _split_columns(b)
    b_aligned = b.set_index(key).loc[a[key].to_numpy()]
    blocks = [
        pd.DataFrame(zscore(a[features_a].to_numpy()), columns=[f"{c}_{suffixes[0]}" for c in features_a]),
        pd.DataFrame(zscore(b_aligned[features_b].to_numpy()), columns=[f"{c}_{suffixes[1]}" for c in features_b]),
    ]
    return pd.concat([a[metadata].reset_index(drop=True)] + blocks, axis=1)
