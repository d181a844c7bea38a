"""Stream training batches from the shards written by :func:`cytopretrain.curation.shards.write_shards`.

One epoch of one rank, step by step (everything is seeded by ``(seed, epoch)``):

1. **Shards to ranks.** The split's shards (``index.tsv``) are permuted; rank ``r`` of
   ``world_size`` takes positions ``r, r + world_size, ...`` of that order, so ranks hold
   disjoint shards and every shard visits every rank over the epochs.
2. **Sample sequence.** The rank's shards, in that order, form one sequence of samples which
   starts at a random offset (rotated), so batch boundaries move between epochs.
3. **Batches.** With ``drop_last`` (training) the rank yields :func:`epoch_length` batches of
   ``batch_size``, the same count on every rank (DDP needs it); the tail of the sequence is
   left out. Without it (validation) it yields every sample, the last batch may be short.
4. **Lanes.** The sequence is cut into L contiguous ranges (lanes) holding whole batches;
   global batch ``b`` is batch ``b // L`` of lane ``b % L``. Each lane passes its samples
   through its own bounded shuffle buffer (``shuffle_buffer`` samples, evict a random slot
   per new sample, as ``write_shards`` does), simulated on sample numbers only, so a batch
   draws from a window of about ``shuffle_buffer`` consecutive samples of its lane.
   L = ``lanes`` (default 12), reduced to one lane per ``shuffle_buffer`` samples of the
   epoch: a small epoch is a single lane, shuffled as a whole.
5. **Parts.** With ``part=(i, k)`` the stream yields only part ``i`` of ``k`` equal slices of
   every batch (its samples ``i * batch_size / k`` up to ``(i + 1) * batch_size / k``), and
   only those are decoded. Data-parallel training gives rank ``i`` of ``k`` part ``i`` of a
   stream of global batches (``rank=0, world_size=1``), so the ranks together see exactly
   the batches one process sees, whatever the number of ranks.
6. **Workers.** DataLoader worker ``w`` of ``W`` produces the batches ``b = skip + w + k W``
   and the DataLoader's round-robin over workers puts them back in order.

Guarantees:

- **Batch composition and order depend only on** ``(shards, split, seed, epoch, batch_size,
  rank, world_size, part, drop_last, lanes, shuffle_buffer)``, **not on** ``num_workers``: the
  shuffle is defined on lanes, whose number does not depend on the workers, and workers only
  split the work. When ``num_workers`` divides L each shard row is read by one worker; with
  other counts (and with one lane) workers share lanes: the same batches, but a worker reads
  (not decodes) the rows of the other workers' batches in its lanes.
- **Resume** (``skip_batches=k``) yields exactly batches ``k, k + 1, ...`` of the
  uninterrupted epoch. The shuffle is computed on sample numbers, so skipped samples are
  neither decoded nor transformed, and Parquet row groups holding only skipped samples are
  not read (TFRecord shards are scanned record by record; skipped records are not decoded).
- **Memory** per lane is bounded by the shuffle buffer (plus one Parquet row group), held at
  the output size as uint8.

Every sample becomes a float32 (C, image_size, image_size) tensor in [0, 1] (pixel / 255):

- **Size.** A side longer than ``image_size`` is randomly cropped; if the shorter side is
  smaller, the image is first enlarged (bilinear, aspect ratio kept) until it equals
  ``image_size``. Enlarging rather than padding: a zero border would be an artefact that
  brightfield images never show and a model could learn. The crop offsets come from a hash
  of ``(seed, epoch, crop_id)``, so a sample gets the same crop whichever worker, lane or
  position carries it.
- **Channels.** ``in_channels=1``: the mean of the shard's channels (merged grey); a 1-channel
  shard sample with ``in_channels > 1`` is repeated over the channels; equal counts pass
  unchanged; any other combination is an error naming the shard and crop.

Samples are dicts ``{"image": Tensor, "label": int (class_index of labels.tsv), "crop_id": str}``.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cytopretrain.core.tables import decode_pixels
from cytopretrain.curation.shards import FORMATS, features_to_sample, load_index
from cytopretrain.curation.tfrecord import decode_example, read_records

LANES = 12
SHUFFLE_BUFFER = 512
READ_COLUMNS = ["crop_id", "class_index", "pixels", "height", "width", "n_channels"]


@dataclass(frozen=True)
class Segment:
    """Rows ``start:stop`` of one shard file, placed at ``offset`` in a lane's sample range."""

    path: Path
    start: int
    stop: int
    offset: int


# --------------------------------------------------------------------------- epoch plan


def split_shards(shards_dir: str | os.PathLike, split: str) -> pd.DataFrame:
    """Rows of index.tsv for ``split`` with at least one sample (index order)."""
    shards_dir = Path(shards_dir)
    if not (shards_dir / "index.tsv").is_file():
        raise FileNotFoundError(f"{shards_dir / 'index.tsv'}: shard index not found")
    index = load_index(shards_dir)
    rows = index[(index["split"] == split) & (index["n_samples"] > 0)].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"{shards_dir / 'index.tsv'}: no {split!r} shards with samples")
    for shard in rows["shard"]:
        if Path(shard).suffix not in FORMATS.values():
            raise ValueError(f"{shards_dir / 'index.tsv'}: {shard!r} is not a shard file")
    return rows


def epoch_length(shards_dir: str | os.PathLike, split: str, batch_size: int, world_size: int = 1) -> int:
    """Batches per epoch and rank with ``drop_last`` (training): the count every rank can fill.

    A rank holds at least ``n_shards // world_size`` shards, so at least the samples of that
    many smallest shards, whatever the epoch's shard order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sizes = np.sort(split_shards(shards_dir, split)["n_samples"].to_numpy())
    per_rank = len(sizes) // world_size
    if per_rank == 0:
        raise ValueError(
            f"{shards_dir}: split {split!r} has {len(sizes)} shard(s), fewer than "
            f"world_size={world_size}; write smaller shards"
        )
    return int(sizes[:per_rank].sum()) // batch_size


def epoch_rng(seed: int, epoch: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, *keys])


def bounded_shuffle(n: int, capacity: int, rng: np.random.Generator) -> np.ndarray:
    """Output order of items 0..n-1 through a shuffle buffer of ``capacity`` items.

    The buffer fills with the first ``capacity`` items; each later item evicts a uniformly
    chosen slot into the output; the rest leaves in random order. An item leaves at most
    ``capacity`` positions before it is read, which bounds the reader's memory.
    """
    capacity = max(1, min(capacity, n))
    buffer = list(range(capacity))
    slots = rng.integers(capacity, size=n - capacity).tolist()
    out = []
    for item, slot in zip(range(capacity, n), slots):
        out.append(buffer[slot])
        buffer[slot] = item
    out += [buffer[i] for i in rng.permutation(capacity)]
    return np.asarray(out, dtype=np.int64)


def lane_batch_counts(n_batches: int, lanes: int) -> np.ndarray:
    """Batches per lane when global batch b goes to lane b % lanes."""
    return np.array([len(range(lane, n_batches, lanes)) for lane in range(lanes)], dtype=np.int64)


# --------------------------------------------------------------------------- per sample


def sample_offsets(seed: int, epoch: int, crop_id: str) -> tuple[int, int]:
    """Two 64-bit numbers from (seed, epoch, crop_id): the sample's own random draws."""
    digest = hashlib.blake2b(f"{seed}\0{epoch}\0{crop_id}".encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def fit_to_size(image: np.ndarray, size: int, draws: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (C, size, size): enlarge if the short side is small, then crop.

    Enlarging is Pillow's bilinear resize per channel: single-threaded, unlike torch's
    interpolate, whose thread pool slows down badly when the machine is busy.
    """
    height, width = image.shape[:2]
    if min(height, width) < size:
        scale = size / min(height, width)
        height, width = max(size, round(height * scale)), max(size, round(width * scale))
        image = np.stack(
            [
                np.asarray(Image.fromarray(image[:, :, c]).resize((width, height), Image.BILINEAR))
                for c in range(image.shape[2])
            ],
            axis=-1,
        )
    top = draws[0] % (height - size + 1)
    left = draws[1] % (width - size + 1)
    return image[top : top + size, left : left + size].transpose(2, 0, 1).copy()


def to_model_channels(pixels: np.ndarray, in_channels: int) -> torch.Tensor:
    """uint8 (C, H, W) -> float32 (in_channels, H, W) in [0, 1] (see the module docstring).

    numpy, not torch, so that no intra-op thread pool runs per sample."""
    image = pixels.astype(np.float32) / 255
    channels = image.shape[0]
    if channels != in_channels:
        if in_channels == 1:
            image = image.mean(axis=0, keepdims=True)
        else:
            image = np.repeat(image, in_channels, axis=0)
    return torch.from_numpy(image)


# --------------------------------------------------------------------------- stream


class ShardStream(IterableDataset):
    """Samples of one rank's epoch of a split, batch by batch (see the module docstring).

    ``len()`` is the number of samples yielded from ``skip_batches`` on, over all workers;
    ``n_batches`` the rank's batches in the whole epoch.
    """

    def __init__(
        self,
        shards_dir: str | os.PathLike,
        split: str,
        *,
        batch_size: int,
        image_size: int,
        in_channels: int,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        part: tuple[int, int] = (0, 1),
        skip_batches: int = 0,
        drop_last: bool = True,
        lanes: int = LANES,
        shuffle_buffer: int = SHUFFLE_BUFFER,
    ) -> None:
        super().__init__()
        part_index, parts = part
        if not 0 <= part_index < parts or batch_size % parts or (parts > 1 and not drop_last):
            raise ValueError(
                f"part={part} needs 0 <= index < count, a batch_size ({batch_size}) divisible by "
                "the count, and drop_last (equal parts)"
            )
        _check_positive(
            batch_size=batch_size,
            image_size=image_size,
            in_channels=in_channels,
            world_size=world_size,
            lanes=lanes,
            shuffle_buffer=shuffle_buffer,
        )
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.shards_dir = Path(shards_dir)
        self.split = split
        self.batch_size = batch_size
        self.image_size = image_size
        self.in_channels = in_channels
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.part_index, self.part_size = part_index, batch_size // parts
        self.shuffle_buffer = shuffle_buffer

        shards = split_shards(shards_dir, split)
        order = epoch_rng(seed, epoch).permutation(len(shards))
        mine = shards.iloc[order[rank::world_size]]
        n_samples = int(mine["n_samples"].sum())
        if drop_last:
            self.n_batches = epoch_length(shards_dir, split, batch_size, world_size)
            self.last_batch_size = batch_size
        else:
            self.n_batches = math.ceil(n_samples / batch_size)
            self.last_batch_size = n_samples - (self.n_batches - 1) * batch_size
        if not 0 <= skip_batches <= self.n_batches:
            raise ValueError(f"skip_batches must be in [0, {self.n_batches}], got {skip_batches}")
        self.skip_batches = skip_batches
        # A lane shorter than the buffer would shuffle less than the buffer allows.
        self.lanes = max(1, min(lanes, self.n_batches * batch_size // shuffle_buffer))
        rotation = int(epoch_rng(seed, epoch, 1, rank).integers(max(1, n_samples)))
        pieces = _rotated_pieces([self.shards_dir / s for s in mine["shard"]], mine["n_samples"].tolist(), rotation)
        self.lane_sizes = self._lane_sizes()
        self.lane_segments = _cut(pieces, self.lane_sizes)

    def _lane_sizes(self) -> np.ndarray:
        sizes = lane_batch_counts(self.n_batches, self.lanes) * self.batch_size
        if self.n_batches:
            sizes[(self.n_batches - 1) % self.lanes] -= self.batch_size - self.last_batch_size
        return sizes

    def batch_length(self, batch: int) -> int:
        """Samples this stream yields for ``batch`` (its part of it)."""
        if self.part_size < self.batch_size:
            return self.part_size
        return self.last_batch_size if batch == self.n_batches - 1 else self.batch_size

    def __len__(self) -> int:
        return sum(self.batch_length(b) for b in range(self.skip_batches, self.n_batches))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        batches = range(self.skip_batches + worker, self.n_batches, n_workers)
        wanted: dict[int, list[int]] = {}
        for batch in batches:
            wanted.setdefault(batch % self.lanes, []).append(batch // self.lanes)
        readers = {lane: self._lane_batches(lane, rounds) for lane, rounds in wanted.items()}
        for batch in batches:
            yield from next(readers[batch % self.lanes])

    def _lane_batches(self, lane: int, rounds: list[int]) -> Iterator[list[dict]]:
        """The samples of the lane's batches ``rounds`` (ascending), one list per batch."""
        size = int(self.lane_sizes[lane])
        rng = epoch_rng(self.seed, self.epoch, 2, self.rank, lane)
        order = bounded_shuffle(size, self.shuffle_buffer, rng)
        first = self.part_index * self.part_size
        chunks = [order[r * self.batch_size :][first : first + self.part_size] for r in rounds]
        needed = np.sort(np.concatenate(chunks))
        rows = self._read(self.lane_segments[lane], needed)
        pending: dict[int, dict] = {}
        for chunk in chunks:
            batch = []
            for position in chunk.tolist():
                while position not in pending:
                    read_position, sample = next(rows)
                    pending[read_position] = sample
                batch.append(self._finish(pending.pop(position)))
            yield batch

    def _read(self, segments: list[Segment], positions: np.ndarray) -> Iterator[tuple[int, dict]]:
        """(lane position, sample) for the sorted ``positions``, in that order."""
        for segment in segments:
            lo, hi = np.searchsorted(positions, [segment.offset, segment.offset + segment.stop - segment.start])
            rows = positions[lo:hi] - segment.offset + segment.start
            for row, record in zip(rows.tolist(), _read_rows(segment.path, rows)):
                yield row - segment.start + segment.offset, self._prepare(record, segment.path)

    def _prepare(self, record: dict, path: Path) -> dict:
        """Decode, check the channels and cut to size; kept as uint8 until the batch is due."""
        channels = int(record["n_channels"])
        if channels != self.in_channels and 1 not in (channels, self.in_channels):
            raise ValueError(
                f"{path}: crop {record['crop_id']!r} has {channels} channels; "
                f"in_channels={self.in_channels} needs 1 or {channels}"
            )
        image = decode_pixels(record["pixels"], record["height"], record["width"], channels)
        draws = sample_offsets(self.seed, self.epoch, record["crop_id"])
        return {
            "pixels": fit_to_size(image, self.image_size, draws),
            "label": int(record["class_index"]),
            "crop_id": record["crop_id"],
        }

    def _finish(self, sample: dict) -> dict:
        return {
            "image": to_model_channels(sample["pixels"], self.in_channels),
            "label": sample["label"],
            "crop_id": sample["crop_id"],
        }


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _rotated_pieces(paths: list[Path], counts: list[int], rotation: int) -> list[tuple[Path, int, int]]:
    """(path, start, stop) row ranges of the shards' concatenation, started at ``rotation``."""
    pieces = [(path, 0, n) for path, n in zip(paths, counts)]
    for number, (path, _, n) in enumerate(pieces):
        if rotation < n:
            tail = [(path, 0, rotation)] if rotation else []
            return [(path, rotation, n), *pieces[number + 1 :], *pieces[:number], *tail]
        rotation -= n
    return pieces  # no samples: nothing to rotate


def _cut(pieces: list[tuple[Path, int, int]], sizes: np.ndarray) -> list[list[Segment]]:
    """Consecutive ranges of ``sizes`` samples from the row ranges ``pieces``, as Segments."""
    lanes: list[list[Segment]] = []
    queue = list(pieces)
    for size in sizes.tolist():
        segments, filled = [], 0
        while filled < size:
            path, start, stop = queue.pop(0)
            take = min(stop - start, size - filled)
            segments.append(Segment(path, start, start + take, filled))
            if start + take < stop:
                queue.insert(0, (path, start + take, stop))
            filled += take
        lanes.append(segments)
    return lanes


def _read_rows(path: Path, rows: np.ndarray) -> Iterator[dict]:
    """Records ``rows`` (ascending) of a shard: Parquet reads only the row groups needed."""
    if not len(rows):
        return
    if path.suffix == FORMATS["parquet"]:
        yield from _read_parquet_rows(path, rows)
    else:
        yield from _read_tfrecord_rows(path, rows)


def _read_parquet_rows(path: Path, rows: np.ndarray) -> Iterator[dict]:
    with pq.ParquetFile(path) as handle:
        sizes = [handle.metadata.row_group(g).num_rows for g in range(handle.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        if rows[-1] >= starts[-1]:
            raise ValueError(f"{path}: has {starts[-1]} rows, index.tsv promises more ({rows[-1] + 1})")
        groups = np.searchsorted(starts, rows, side="right") - 1
        for group in np.unique(groups).tolist():
            local = rows[groups == group] - starts[group]
            table = handle.read_row_group(group, columns=READ_COLUMNS)
            yield from table.take(pa.array(local)).to_pylist()


def _read_tfrecord_rows(path: Path, rows: np.ndarray) -> Iterator[dict]:
    """TFRecord has no row index: records are scanned, only the wanted ones decoded."""
    wanted = iter(rows.tolist())
    target = next(wanted)
    count = 0
    for count, record in enumerate(read_records(path), start=1):
        if count - 1 == target:
            yield features_to_sample(decode_example(record))
            target = next(wanted, None)
            if target is None:
                return
    raise ValueError(f"{path}: has {count} records, index.tsv promises more ({target + 1})")


def collate(samples: list[dict]) -> dict:
    """Batch of samples: image (B, C, S, S), label (B,) int64, crop_id list.

    Stacked with numpy: torch.stack runs on the intra-op thread pool, which competes with the
    training step for the same cores (benchmarks/README.md, "bench_training")."""
    return {
        "image": torch.from_numpy(np.stack([s["image"].numpy() for s in samples])),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "crop_id": [s["crop_id"] for s in samples],
    }


def make_loader(
    shards_dir: str | os.PathLike,
    split: str,
    *,
    batch_size: int,
    image_size: int,
    in_channels: int,
    seed: int,
    epoch: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    part: tuple[int, int] = (0, 1),
    skip_batches: int = 0,
    drop_last: bool | None = None,
    lanes: int = LANES,
    shuffle_buffer: int = SHUFFLE_BUFFER,
) -> DataLoader:
    """A DataLoader over :class:`ShardStream` yielding collated batches
    ``{"image": (B, C, S, S) float32, "label": (B,) int64, "crop_id": list[str]}``.

    ``drop_last`` defaults to True for ``train`` (``epoch_length`` batches, all of
    ``batch_size``) and False otherwise. Pinned memory when CUDA is available; no persistent
    workers (each epoch and each resume is a new loader). The DataLoader gets its own seeded
    generator so that creating it never draws from torch's global random state.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    stream = ShardStream(
        shards_dir,
        split,
        batch_size=batch_size,
        image_size=image_size,
        in_channels=in_channels,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        part=part,
        skip_batches=skip_batches,
        drop_last=split == "train" if drop_last is None else drop_last,
        lanes=lanes,
        shuffle_buffer=shuffle_buffer,
    )
    return DataLoader(
        stream,
        batch_size=stream.part_size,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
    )
