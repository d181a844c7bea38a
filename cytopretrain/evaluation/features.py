"""Feature extraction: a backbone's global-average-pooled features for every image of a table.

Input is a canonical table (core.schema) of a benchmark source, one row per image; output is a
profile table (evaluation.profile_tables): ``Metadata_`` columns followed by float32 feature columns.
Images that cannot give features go to a failure table (idx, stage, reason, detail):
profiles + failures = table rows.

Per image, evaluation.preprocess reads the channels and maps them to the backbone's grey
inputs (CytoImageNet's four extraction methods are ``channel_mode`` x ``normalize``); each grey
image is then repeated over the backbone's ``in_channels``, and ``input_norm="imagenet"``
subtracts the ImageNet mean and divides by its standard deviation per RGB channel (for
ImageNet weights; needs a 3-channel backbone). ``merge`` gives D features per image
(``f_<k>``), ``concat`` gives D per channel, concatenated in channel order (``f_<channel>_<k>``,
names from the table's ``channels`` column, or c0, c1, ... when it is empty).

Batching. At native resolution images of one (H, W) are batched together: rows are read in
load groups of one batch's worth and sorted into one bucket per shape; a bucket is run through
the backbone when it holds a batch, every partial bucket at the end, and the fullest bucket
early when more than four batches' worth of images wait in part-filled buckets (tables of many
different shapes), so memory stays bounded by a few batches. ``batch_size`` counts backbone
inputs (grey images), so a ``concat`` batch holds batch_size // C images. Without channel
names a ``concat`` run takes the channel count of its first readable image.

Loading. ``num_workers`` threads read and preprocess the load groups ahead of the model
(core.parallel.ordered_map; 0 = in the calling thread); decoders and numpy release the GIL.
Beside a GPU 2-8 keep it fed; on the CPU the model uses torch's intra-op threads.

Devices and precision follow core.devices (auto: bf16 autocast on a GPU that supports it, fp32
on the CPU). The model and batches use the channels_last layout, except densenet121 in fp32 on
the CPU (benchmarks/README.md, "layout"). Features are float32 in every case.

The model. The run uses an inference copy of the backbone (learning.models.InferenceBackbone):
eval mode, each BatchNorm that follows a convolution folded into it, on the run's device and in
its layout, under torch.inference_mode. Its features equal the backbone's eval-mode forward up
to float rounding. The backbone itself is left as it was (mode, device, layout, hooks).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch

from cytopretrain.core.devices import PRECISIONS, autocast_dtype, resolve_device
from cytopretrain.core.errors import ImageReadError, SchemaError
from cytopretrain.core.imageio import ZProjection, read_channels
from cytopretrain.core.parallel import ordered_map
from cytopretrain.core.schema import QUARANTINE_FIELDS
from cytopretrain.evaluation.preprocess import CHANNEL_MODES, Failed, Job, Loaded, load_group
from cytopretrain.evaluation.profile_tables import (
    ProfileWriter,
    feature_columns,
    feature_names,
    metadata_frame,
    profile_frame,
)
from cytopretrain.learning.models import Backbone, InferenceBackbone, build_backbone

STAGE = "extract_features"
INPUT_NORMS = (None, "imagenet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Backbones that run fp32 on the CPU faster in NCHW than in channels_last.
_NCHW_FP32_ON_CPU = ("densenet121",)
# Batches' worth of images that may wait in part-filled shape buckets (see _Buckets).
_BUFFERED_BATCHES = 4

ChannelMode = Literal["concat", "merge"]


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
    z_projection: str | None = None  # the benchmark source's option (core.imageio.ZProjection)

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
        ZProjection.parse(self.z_projection)


# ---------------------------------------------------------------- the table's jobs


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


def _jobs(table: pd.DataFrame, expected: Callable[[str], int | None]) -> Iterator[Job]:
    channels = table["channels"].tolist() if "channels" in table.columns else [""] * len(table)
    for position, (idx, paths, names) in enumerate(
        zip(table["idx"].tolist(), table["channel_paths"].tolist(), channels)
    ):
        if isinstance(paths, (str, bytes)) or not isinstance(paths, Iterable) or len(paths) == 0:
            raise SchemaError(f"extract_features: idx {idx!r}: channel_paths must be a non-empty list, got {paths!r}")
        yield Job(position, str(idx), tuple(str(p) for p in paths), expected(names if isinstance(names, str) else ""))


def _first_channel_count(jobs: list[Job]) -> int | None:
    """The channel count of the table's first readable image (None if none is readable)."""
    for job in jobs:
        try:
            return read_channels(job.paths, z_projection=job.z_projection).shape[2]
        except ImageReadError:
            continue
    return None


# ---------------------------------------------------------------- the model side


class _Runner:
    """Runs batches of grey images through the backbone's inference copy (BatchNorms folded,
    see learning.models.InferenceBackbone): (B, C', H, W) -> (B, C' * D) float32."""

    def __init__(self, backbone: Backbone, options: ExtractionOptions):
        if options.input_norm == "imagenet" and backbone.in_channels != 3:
            raise ValueError(
                f"input_norm 'imagenet' needs a backbone with 3 input channels, got {backbone.in_channels}"
            )
        self.device = resolve_device(options.device)
        self.amp_dtype = autocast_dtype(self.device, options.precision)
        channels_last = (
            self.device.type == "cuda" or self.amp_dtype is not None or backbone.name not in _NCHW_FP32_ON_CPU
        )
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.model = InferenceBackbone(backbone).to(self.device, memory_format=self.layout)
        self.input_norm = options.input_norm
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
            x = x.contiguous(memory_format=self.layout)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                features = self.model(x)
            return features.float().reshape(batch, -1).cpu().numpy()


class _Buckets:
    """Loaded images grouped by input shape, handed out as batches of one shape.

    A bucket is handed out when it holds a batch. Images of many different shapes (crops of
    varying size) could otherwise pile up in part-filled buckets: past ``_BUFFERED_BATCHES``
    batches' worth of buffered images, the fullest bucket is handed out early, so memory
    stays bounded by a few batches whatever the table holds.
    """

    def __init__(self, per_batch: int):
        self.per_batch = per_batch
        self.by_shape: dict[tuple[int, ...], list[Loaded]] = {}
        self.buffered = 0

    def add(self, item: Loaded) -> list[Loaded] | None:
        shape = item.inputs.shape
        self.by_shape.setdefault(shape, []).append(item)
        self.buffered += 1
        if len(self.by_shape[shape]) >= self.per_batch:
            return self._pop(shape)
        if self.buffered > _BUFFERED_BATCHES * self.per_batch:
            return self._pop(max(self.by_shape, key=lambda s: len(self.by_shape[s])))
        return None

    def drain(self) -> Iterator[list[Loaded]]:
        while self.by_shape:
            yield self._pop(next(iter(self.by_shape)))

    def _pop(self, shape: tuple[int, ...]) -> list[Loaded]:
        batch = self.by_shape.pop(shape)
        self.buffered -= len(batch)
        return batch


# ---------------------------------------------------------------- the stream of batches


@dataclass
class _Stream:
    """Feature batches of a table plus what the run learns along the way."""

    failures: list[Failed]
    feature_names: list[str] | None = None  # known once the first batch has run


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

    # checks every row before any work
    jobs = [dataclasses.replace(job, z_projection=options.z_projection) for job in _jobs(table, expected)]
    if concat and table_count is None:
        table_count = _first_channel_count(jobs)
        jobs = [dataclasses.replace(job, expected=table_count) for job in jobs]
    per_image = table_count if concat else 1  # backbone inputs per image
    per_batch = max(1, options.batch_size // (per_image or 1))
    runner = _Runner(backbone, options)

    def run(items: list[Loaded]) -> tuple[np.ndarray, np.ndarray]:
        if stream.feature_names is None:
            stream.feature_names = feature_names(options.channel_mode, channel_names, per_image, backbone.feature_dim)
        positions = np.fromiter((item.position for item in items), np.int64, len(items))
        return positions, runner(np.stack([item.inputs for item in items]))

    load = functools.partial(
        load_group,
        channel_mode=options.channel_mode,
        normalize=options.normalize,
        low=options.low,
        high=options.high,
        resize=options.resize,
        min_size=backbone.min_input_size,
        multiple=backbone.input_multiple,
    )
    # A load group holds the images of one backbone batch: its memory is that of a batch.
    groups = [jobs[start : start + per_batch] for start in range(0, len(jobs), per_batch)]
    buckets = _Buckets(per_batch)
    torch_threads = torch.get_num_threads()
    try:
        # loader threads run torch on one intra-op thread each, beside the model's threads
        loaded = ordered_map(
            load, groups, options.num_workers, name="features-loader", initializer=torch.set_num_threads, initargs=(1,)
        )
        for _, results in loaded:
            for item in results:
                if isinstance(item, Failed):
                    stream.failures.append(item)
                elif ready := buckets.add(item):
                    yield run(ready)
    finally:
        # set_num_threads in a pool thread also sets the count that later threads start with
        torch.set_num_threads(torch_threads)
    for batch in buckets.drain():
        yield run(batch)


def _failure_frame(failures: list[Failed]) -> pd.DataFrame:
    ordered = sorted(failures, key=lambda f: f.position)
    frame = pd.DataFrame([(f.idx, STAGE, f.reason, f.detail) for f in ordered], columns=list(QUARANTINE_FIELDS))
    return frame.astype(object)


def extract_features(table: pd.DataFrame, backbone: Backbone, **options) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Features of every image of ``table`` (see the module docstring), in memory; ``options``
    are the fields of ExtractionOptions.

    Returns (profiles, failures): profiles has the ``Metadata_`` columns and then the float32
    feature columns, one row per image that gave features, in table order; failures has
    columns idx, stage ("extract_features"), reason, detail, one row per image that did not
    (reasons: core.imageio's READ_REASONS, "uniform", "non_finite"). A table whose every image
    fails gives profiles without feature columns.
    """
    stream = _Stream(failures=[])
    parts = list(_batches(table, backbone, ExtractionOptions(**options), stream))
    names = stream.feature_names or []
    positions = np.concatenate([p for p, _ in parts]) if parts else np.zeros(0, np.int64)
    features = np.concatenate([f for _, f in parts]) if parts else np.zeros((0, len(names)), np.float32)
    order = np.argsort(positions, kind="stable")
    return profile_frame(metadata_frame(table), positions[order], features[order], names), _failure_frame(
        stream.failures
    )


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
    writer = ProfileWriter(path)
    try:
        for positions, features in _batches(table, backbone, run_options, stream):
            writer.write(profile_frame(meta, positions, features, stream.feature_names))
    except BaseException as error:
        writer.abort(error)
        raise
    names = stream.feature_names or []
    writer.close(profile_frame(meta, np.zeros(0, np.int64), np.zeros((0, len(names)), np.float32), names))
    return _failure_frame(stream.failures)


def own_clusters(table: pd.DataFrame, method, **options) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A clustering method's own cluster of every image of ``table`` (``assigns_clusters``,
    learning.pretext.DEC): the pooled features of its backbone on the merged channels (merge
    mode whatever ``channel_mode`` says: it trained on merged grey crops), through its latent
    layer and soft assignment. ``options`` are those of extract_features. Returns
    (Metadata_idx, cluster, confidence) per image with features, and the failures."""
    profiles, failures = extract_features(table, method.backbone, **{**options, "channel_mode": "merge"})
    features = torch.tensor(profiles[feature_columns(profiles)].to_numpy(np.float32))
    cluster = confidence = torch.zeros(0)
    if len(profiles):
        with torch.inference_mode():
            cluster, confidence = method.assign(method.to_latent(features))
    frame = pd.DataFrame(
        {"Metadata_idx": profiles["Metadata_idx"], "cluster": cluster.numpy(), "confidence": confidence.numpy()}
    )
    return frame, failures


def random_init_backbone(name: str, in_channels: int = 1, seed: int = 0, pool: str | None = None) -> Backbone:
    """A backbone with torchvision's random init drawn from ``seed``: the same seed gives the
    same weights, and the global torch RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_backbone(name, in_channels=in_channels, pool=pool)
