"""Write the training set: QC-passed crops, split and shuffled, into fixed-size shards.

Inputs are crop Parquet files (one row per crop: ``crop_id, idx, label, category, crop, scaling,
x_min, x_max, y_min, y_max`` and the pixel columns of :mod:`cytopretrain.core.tables`), the kept
labels (``label, category``) and the canonical metadata table (:mod:`cytopretrain.core.schema`),
joined to every crop on ``idx``.

Output folder layout::

    out_dir/labels.tsv       class_index, label, category, n_train, n_validation,
                             n_train_images, n_validation_images (crops / parent images per split)
    out_dir/excluded.tsv     quarantine rows (idx, stage, reason, detail): one per crop whose
                             label is not kept (reason ``label_dropped``, crop id in detail)
    out_dir/index.tsv        split, shard, format, n_samples, first_crop_id, last_crop_id,
                             sha256, bytes (shard = path relative to out_dir)
    out_dir/<split>/shard-<nnnnn>.<parquet|tfrecord>   split = train | validation

Input crops = shard samples + excluded rows. Class indices follow the kept labels sorted by
label name (code-point order); every kept label gets one, even when no crop carries it (its
counts are then 0). Metadata columns outside the canonical schema are ignored.

Shard schema, one row (Parquet) or one ``tf.train.Example`` (TFRecord) per crop:

=====================  =================  =============================================
Parquet column         TFRecord feature   meaning
=====================  =================  =============================================
crop_id (string)       crop_id (bytes)    unique crop id
idx (string)           idx (bytes)        parent image id, joins the metadata
class_index (int32)    label (int64)      index into labels.tsv (labels sorted by name)
label (string)         label/text         weak label
category (string)      category           metadata column the label came from
crop (bool)            crop (int64 0/1)   the sample is a crop of a larger image
scaling (float32)      scaling (float)    crop side / image side
x_min, x_max, y_min,   same (int64)       crop window in the parent image, pixels
y_max (int32)
pixels (binary)        image/encoded      Parquet: raw uint8 bytes, C order (H, W, C).
                       image/raw          TFRecord: PNG (1 channel grayscale, 3 RGB) under
                       image/format       image/encoded with image/format b"png"; other
                                          channel counts raw bytes under image/raw with
                                          image/format b"raw"
height, width (int32)  image/height,      image shape
n_channels (int16)     image/width,
                       image/channels
database ... split     same names         every canonical metadata column except idx
(schema.py types)                         (strings -> bytes, concentration -> float32,
                                          channel_paths list<string> -> bytes list)
=====================  =================  =============================================

``channel_paths`` is kept (list of the source channel files: provenance). A missing
``concentration`` is NaN in both formats (never null). TFRecord stores
floats as float32 (TensorFlow has no float64 feature), so ``concentration`` read back from a
TFRecord shard is the float32 rounding of the metadata value; Parquet keeps float64.
:func:`iter_shard` yields the Parquet column names and Python values for both formats.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cytopretrain.core.errors import SchemaError
from cytopretrain.core.schema import CANONICAL_FIELDS, CANONICAL_SCHEMA
from cytopretrain.core.tables import (
    PIXEL_FIELDS,
    ParquetStreamWriter,
    decode_pixels,
    file_sha256,
    iter_parquet_rows,
    read_table,
    write_table,
)
from cytopretrain.curation.crops import CROP_FIELDS, CROP_SCHEMA  # the columns read from every crop file
from cytopretrain.curation.tfrecord import TFRecordWriter, decode_example, decode_image, image_features, read_records

STAGE = "write_shards"
SPLITS = ("train", "validation")
FORMATS = {"parquet": ".parquet", "tfrecord": ".tfrecord"}
SHARD_ROWS_PER_GROUP = 64

LIGHT_COLUMNS = ["crop_id", "idx", "label", "category"]

_CROP_WINDOW = ("crop", "scaling", "x_min", "x_max", "y_min", "y_max")
SHARD_FIELDS: dict[str, pa.DataType] = {
    "crop_id": pa.string(),
    "idx": pa.string(),
    "class_index": pa.int32(),
    "label": pa.string(),
    "category": pa.string(),
    **{name: CROP_FIELDS[name] for name in _CROP_WINDOW},
    **PIXEL_FIELDS,
    **{name: kind for name, kind in CANONICAL_FIELDS.items() if name != "idx"},
}
SHARD_SCHEMA = pa.schema(list(SHARD_FIELDS.items()))
METADATA_COLUMNS = [n for n in CANONICAL_FIELDS if n != "idx"]

# TFRecord names of the shard columns that are renamed or carried by the image features.
_TF_RENAMED = {"class_index": "label", "label": "label/text"}
_IMAGE_COLUMNS = tuple(PIXEL_FIELDS)


def _tf_kind(kind: pa.DataType) -> str:
    if kind == pa.string():
        return "text"
    if pa.types.is_list(kind):
        return "texts"
    return "float" if pa.types.is_floating(kind) else "int"


# How each non-image shard column is stored in a TFRecord example (once, not per row).
_TF_KINDS = {name: _tf_kind(kind) for name, kind in SHARD_FIELDS.items() if name not in _IMAGE_COLUMNS}

INDEX_COLUMNS = [
    "split",
    "shard",
    "format",
    "n_samples",
    "first_crop_id",
    "last_crop_id",
    "sha256",
    "bytes",
]
LABEL_TABLE_COLUMNS = [
    "class_index",
    "label",
    "category",
    "n_train",
    "n_validation",
    "n_train_images",
    "n_validation_images",
]


# --------------------------------------------------------------------------- split


def _validation_counts(n: np.ndarray, fraction: float) -> np.ndarray:
    """round(fraction * n), half up; at least 1 and at most n - 1 when n >= 2 so both splits
    see every label with two or more groups; 0 for single-group labels or fraction 0."""
    k = np.floor(n * fraction + 0.5).astype(np.int64)
    clipped = np.clip(k, 1, np.maximum(n - 1, 1))
    return np.where((n >= 2) & (fraction > 0), clipped, 0)


def stratified_split(
    labels: Sequence | pd.Series | np.ndarray,
    *,
    fraction: float = 0.1,
    seed: int = 0,
    group: Sequence | pd.Series | np.ndarray | None = None,
) -> np.ndarray:
    """Boolean ``is_validation`` per sample, stratified by label.

    With ``group`` (e.g. the parent image ``idx`` of each crop) whole groups are assigned, so
    no group is in both splits; every group must carry one label. Per label with n groups
    (samples without ``group``), round(fraction * n) groups (half up) go to validation, at
    least 1 and at most n - 1 when n >= 2, none when n == 1. The result depends only on the
    seed and the set of (group, label) pairs, not on the order of the samples.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    label_values = pd.Series(np.asarray(labels, dtype=object))
    if label_values.isna().any():
        raise ValueError("stratified_split: labels contain missing values")
    groups = np.arange(len(label_values)) if group is None else np.asarray(group, dtype=object)
    if len(groups) != len(label_values):
        raise ValueError(f"stratified_split: {len(groups)} groups for {len(label_values)} labels")
    samples = pd.DataFrame({"group": groups, "label": label_values})
    per_group = samples.drop_duplicates().sort_values(["label", "group"], kind="stable")
    mixed = per_group["group"].duplicated()
    if mixed.any():
        raise ValueError(f"stratified_split: group {per_group.loc[mixed, 'group'].iloc[0]!r} has more than one label")
    rng = np.random.default_rng(seed)
    per_group["key"] = rng.random(len(per_group))
    by_label = per_group.groupby("label", sort=False)
    rank = by_label["key"].rank(method="first").to_numpy() - 1
    n = by_label["group"].transform("size").to_numpy()
    validation_groups = per_group.loc[rank < _validation_counts(n, fraction), "group"]
    return samples["group"].isin(validation_groups).to_numpy()


# --------------------------------------------------------------------------- planning


def _read_light_columns(crop_files: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """crop_id, idx, label, category and the file number of every crop; checks every file's
    columns up front so a bad file fails before any shard is written."""
    frames = []
    for number, path in enumerate(crop_files):
        names = pq.read_schema(path).names
        missing = [c for c in CROP_FIELDS if c not in names]
        if missing:
            raise SchemaError(f"{path}: crop file lacks column(s) {missing}")
        frame = pq.read_table(path, columns=LIGHT_COLUMNS).to_pandas()
        if frame[LIGHT_COLUMNS].isna().any().any():
            raise SchemaError(f"{path}: null values in {LIGHT_COLUMNS}")
        frame["file"] = number
        frames.append(frame)
    if not frames:
        raise ValueError("write_shards: no crop files given")
    crops = pd.concat(frames, ignore_index=True)
    dup = crops["crop_id"].duplicated(keep=False)
    if dup.any():
        first = crops.loc[dup, "crop_id"].iloc[0]
        files = [str(crop_files[i]) for i in crops.loc[crops["crop_id"] == first, "file"]]
        raise SchemaError(f"duplicate crop_id {first!r} in {files}")
    return crops


def _check_kept_labels(kept_labels: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in ("label", "category") if c not in kept_labels.columns]
    if missing:
        raise SchemaError(f"kept labels: missing column(s) {missing}")
    kept = kept_labels[["label", "category"]].astype(str).sort_values("label", kind="stable")
    dup = kept["label"].duplicated()
    if dup.any():
        raise SchemaError(f"kept labels: label {kept.loc[dup, 'label'].iloc[0]!r} listed twice")
    if kept.empty:
        raise ValueError("kept labels: the table is empty")
    return kept.reset_index(drop=True)


def _check_categories(kept_crops: pd.DataFrame, kept: pd.DataFrame, crop_files: Sequence) -> None:
    expected = kept_crops["label"].map(dict(zip(kept["label"], kept["category"])))
    wrong = kept_crops["category"] != expected
    if wrong.any():
        row = kept_crops[wrong].iloc[0]
        raise SchemaError(
            f"{crop_files[row['file']]}: crop {row['crop_id']!r} has label {row['label']!r} "
            f"in category {row['category']!r}, kept labels say {expected[wrong].iloc[0]!r}"
        )


def _metadata_table(metadata: pd.DataFrame, kept_crops: pd.DataFrame, crop_files: Sequence) -> pa.Table:
    """Canonical metadata of the parent images of the kept crops, as Arrow."""
    missing = [c for c in CANONICAL_FIELDS if c not in metadata.columns]
    if missing:
        raise SchemaError(f"metadata: missing canonical column(s) {missing}")
    dup = metadata["idx"].duplicated()
    if dup.any():
        raise SchemaError(f"metadata: duplicate idx {metadata.loc[dup, 'idx'].iloc[0]!r}")
    absent = ~kept_crops["idx"].isin(metadata["idx"])
    if absent.any():
        row = kept_crops[absent].iloc[0]
        raise SchemaError(
            f"{crop_files[row['file']]}: crop {row['crop_id']!r} has idx {row['idx']!r} "
            f"absent from the metadata ({int(absent.sum())} crop(s) in all)"
        )
    used = metadata.loc[metadata["idx"].isin(kept_crops["idx"]), list(CANONICAL_FIELDS)]
    try:
        table = pa.Table.from_pandas(used, schema=CANONICAL_SCHEMA, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise SchemaError(f"metadata does not follow the canonical schema: {error}") from None
    # Arrow turns NaN into null; TFRecord has no null, so both formats store NaN.
    for number, field in enumerate(table.schema):
        column = table.column(number)
        if pa.types.is_floating(field.type):
            table = table.set_column(number, field, pc.fill_null(column, float("nan")))
        elif column.null_count:
            raise SchemaError(f"metadata: column {field.name!r} has missing values")
    return table


def _label_table(kept: pd.DataFrame, kept_crops: pd.DataFrame, is_validation: np.ndarray) -> pd.DataFrame:
    table = kept.copy()
    table.insert(0, "class_index", np.arange(len(kept), dtype=np.int64))
    for split, mask in (("train", ~is_validation), ("validation", is_validation)):
        part = kept_crops[mask]
        crops = part.groupby("label").size()
        images = part.groupby("label")["idx"].nunique()
        table[f"n_{split}"] = table["label"].map(crops).fillna(0).astype(np.int64)
        table[f"n_{split}_images"] = table["label"].map(images).fillna(0).astype(np.int64)
    return table[LABEL_TABLE_COLUMNS]


def _excluded_table(dropped: pd.DataFrame, crop_files: Sequence) -> pd.DataFrame:
    detail = [
        f"crop {c} in {crop_files[f]}: label {lab!r} is not a kept label"
        for c, f, lab in zip(dropped["crop_id"], dropped["file"], dropped["label"])
    ]
    return pd.DataFrame(
        {
            "idx": dropped["idx"].to_numpy(),
            "stage": STAGE,
            "reason": "label_dropped",
            "detail": detail,
        },
        columns=["idx", "stage", "reason", "detail"],
    )


# --------------------------------------------------------------------------- writing


class _ShuffleBuffer:
    """Bounded shuffle: once full, each new row evicts a uniformly chosen buffered row."""

    def __init__(self, capacity: int, rng: np.random.Generator):
        self.capacity = capacity
        self.rng = rng
        self.rows: list[dict] = []

    def push(self, row: dict) -> dict | None:
        if len(self.rows) < self.capacity:
            self.rows.append(row)
            return None
        slot = int(self.rng.integers(self.capacity))
        evicted, self.rows[slot] = self.rows[slot], row
        return evicted

    def drain(self) -> Iterator[dict]:
        rows, self.rows = self.rows, []
        for position in self.rng.permutation(len(rows)):
            yield rows[position]


def sample_to_features(sample: dict) -> dict[str, tuple[list, str]]:
    """TFRecord features of one shard row (see the module's schema table), as the TFRecord
    writer's (values, kind) pairs, typed from the shard schema."""
    image = decode_pixels(sample["pixels"], sample["height"], sample["width"], sample["n_channels"])
    features = image_features(image)
    for name, kind in _TF_KINDS.items():
        value = sample[name]
        if value is None:
            raise SchemaError(f"crop {sample['crop_id']!r}: {name} is null")
        if kind == "text":
            typed = ([value.encode("utf-8")], "byte")
        elif kind == "texts":
            typed = ([v.encode("utf-8") for v in value], "byte")
        elif kind == "float":
            typed = ([float(value)], "float")
        else:
            typed = ([int(value)], "int")
        features[_TF_RENAMED.get(name, name)] = typed
    return features


def features_to_sample(features: dict) -> dict:
    """Inverse of :func:`sample_to_features` on decoded features: a shard row."""
    image = decode_image(features)
    sample: dict = {}
    for name, kind in SHARD_FIELDS.items():
        if name in _IMAGE_COLUMNS:
            continue
        key = _TF_RENAMED.get(name, name)
        if key not in features:
            raise SchemaError(f"TFRecord example lacks feature {key!r}")
        values = features[key]
        if pa.types.is_list(kind):
            sample[name] = [v.decode("utf-8") for v in values]
            continue
        if len(values) != 1:
            raise SchemaError(f"feature {key!r}: expected one value, got {len(values)}")
        value = values[0]
        if kind == pa.string():
            sample[name] = value.decode("utf-8")
        elif kind == pa.bool_():
            sample[name] = bool(value)
        elif pa.types.is_integer(kind):
            sample[name] = int(value)
        else:
            sample[name] = float(value)
    height, width, channels = image.shape
    sample.update(pixels=image.tobytes(), height=height, width=width, n_channels=channels)
    return {name: sample[name] for name in SHARD_FIELDS}


class _ShardSink:
    """Writes one split's rows into consecutive shards of ``samples_per_shard`` rows."""

    def __init__(self, out_dir: Path, split: str, fmt: str, samples_per_shard: int):
        self.out_dir, self.split, self.fmt = out_dir, split, fmt
        self.samples_per_shard = samples_per_shard
        self.entries: list[dict] = []
        self._writer: ParquetStreamWriter | TFRecordWriter | None = None
        self._count = 0
        self._first = self._last = ""

    def _shard_path(self) -> Path:
        return self.out_dir / self.split / f"shard-{len(self.entries):05d}{FORMATS[self.fmt]}"

    def write(self, row: dict) -> None:
        if self._writer is None:
            path = self._shard_path()
            self._writer = (
                ParquetStreamWriter(path, SHARD_SCHEMA, rows_per_group=SHARD_ROWS_PER_GROUP)
                if self.fmt == "parquet"
                else TFRecordWriter(path)
            )
            self._first = row["crop_id"]
        self._writer.write(row if self.fmt == "parquet" else sample_to_features(row))
        self._count += 1
        self._last = row["crop_id"]
        if self._count == self.samples_per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        path = self._writer.path
        self._writer.close()
        self._writer = None
        self.entries.append(
            {
                "split": self.split,
                "shard": path.relative_to(self.out_dir).as_posix(),
                "format": self.fmt,
                "n_samples": self._count,
                "first_crop_id": self._first,
                "last_crop_id": self._last,
                "sha256": file_sha256(path),
                "bytes": path.stat().st_size,
            }
        )
        self._count = 0

    def close(self) -> list[dict]:
        if self._writer is not None:
            self._finish_shard()
        return self.entries

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


def _remove_old_outputs(out_dir: Path) -> None:
    """Shards of an earlier run would outlive a smaller new run, and its index would point to
    removed shards should this run fail; out_dir belongs to this stage."""
    (out_dir / "index.tsv").unlink(missing_ok=True)
    for split in SPLITS:
        for suffix in FORMATS.values():
            for stale in (out_dir / split).glob(f"shard-*{suffix}"):
                stale.unlink()


def _kept_rows(
    table: pa.Table,
    label_index: pd.Index,
    metadata: pa.Table,
    metadata_index: pd.Index,
    validation: np.ndarray,
) -> dict[str, list[dict]]:
    """Shard rows of one row group's kept crops, by split (vectorized join and labelling)."""
    class_index = label_index.get_indexer(table["label"].to_numpy(zero_copy_only=False))
    keep = class_index >= 0
    table = table.filter(pa.array(keep))
    position = metadata_index.get_indexer(table["idx"].to_numpy(zero_copy_only=False))
    joined = metadata.take(pa.array(position))
    columns = {name: table[name] for name in CROP_FIELDS}
    columns["class_index"] = pa.array(class_index[keep], type=pa.int32())
    columns.update({name: joined[name] for name in METADATA_COLUMNS})
    rows = pa.Table.from_arrays([columns[n] for n in SHARD_FIELDS], schema=SHARD_SCHEMA)
    is_validation = validation[position]
    return {
        "train": rows.filter(pa.array(~is_validation)).to_pylist(),
        "validation": rows.filter(pa.array(is_validation)).to_pylist(),
    }


def _read_row_group(path: str | os.PathLike, group: int) -> pa.Table:
    table = pq.ParquetFile(path).read_row_group(group, columns=list(CROP_FIELDS))
    try:
        table = table.cast(CROP_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise SchemaError(f"{path}: crop columns do not cast to the crop schema: {error}") from None
    nulls = [name for name in table.column_names if table[name].null_count]
    if nulls:
        raise SchemaError(f"{path}: row group {group} has missing values in {nulls}")
    return table


def _stream_to_shards(
    batches: Iterator[dict[str, list[dict]]],
    buffers: dict[str, _ShuffleBuffer],
    sinks: dict[str, _ShardSink],
) -> list[dict]:
    """Pass every row through its split's shuffle buffer into its sink; the index entries."""
    try:
        for by_split in batches:
            for split, rows in by_split.items():
                for row in rows:
                    evicted = buffers[split].push(row)
                    if evicted is not None:
                        sinks[split].write(evicted)
        entries = []
        for split, sink in sinks.items():
            for row in buffers[split].drain():
                sink.write(row)
            entries += sink.close()
        return entries
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise


def write_shards(
    crop_files: Sequence[str | os.PathLike],
    kept_labels: pd.DataFrame,
    metadata: pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 1024,
    fmt: str = "parquet",
    validation_fraction: float = 0.1,
    seed: int = 0,
    shuffle_buffer: int | None = None,
) -> pd.DataFrame:
    """Split the kept crops by parent image (stratified by label), shuffle and write shards.

    Memory holds one input row group plus, per split, a shuffle buffer of ``shuffle_buffer``
    rows (default ``samples_per_shard``); input row groups are visited in a seeded random order
    across all files, so a shard mixes files. Same inputs and seed give byte-identical shards.
    Returns the shard index (also written to ``out_dir/index.tsv``); see the module docstring
    for the other outputs.
    """
    if fmt not in FORMATS:
        raise ValueError(f"shard format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    buffer_size = samples_per_shard if shuffle_buffer is None else shuffle_buffer
    if buffer_size < 1:
        raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
    out_dir = Path(out_dir)
    crop_files = [Path(p) for p in crop_files]

    crops = _read_light_columns(crop_files)
    kept = _check_kept_labels(kept_labels)
    is_kept = crops["label"].isin(kept["label"]).to_numpy()
    kept_crops = crops[is_kept]
    if kept_crops.empty:
        raise ValueError(f"write_shards: none of the {len(crops)} crops has a kept label")
    _check_categories(kept_crops, kept, crop_files)
    metadata_table = _metadata_table(metadata, kept_crops, crop_files)
    is_validation = stratified_split(
        kept_crops["label"], fraction=validation_fraction, seed=seed, group=kept_crops["idx"]
    )
    validation_idx = set(kept_crops.loc[is_validation, "idx"])
    metadata_index = pd.Index(metadata_table["idx"].to_numpy(zero_copy_only=False))
    validation = metadata_index.isin(validation_idx)

    seeds = np.random.SeedSequence(seed).spawn(1 + len(SPLITS))
    row_groups = [(path, group) for path in crop_files for group in range(pq.ParquetFile(path).num_row_groups)]
    order = np.random.default_rng(seeds[0]).permutation(len(row_groups))
    buffers = {s: _ShuffleBuffer(buffer_size, np.random.default_rng(q)) for s, q in zip(SPLITS, seeds[1:])}
    _remove_old_outputs(out_dir)
    sinks = {split: _ShardSink(out_dir, split, fmt, samples_per_shard) for split in SPLITS}
    label_index = pd.Index(kept["label"])
    batches = (
        _kept_rows(_read_row_group(*row_groups[i]), label_index, metadata_table, metadata_index, validation)
        for i in order
    )
    entries = _stream_to_shards(batches, buffers, sinks)

    index = pd.DataFrame(entries, columns=INDEX_COLUMNS)
    if index["n_samples"].sum() != len(kept_crops):
        raise RuntimeError(
            f"write_shards: wrote {index['n_samples'].sum()} samples, planned {len(kept_crops)}; "
            "did a crop file change during the run?"
        )
    write_table(_label_table(kept, kept_crops, is_validation), out_dir / "labels.tsv")
    write_table(_excluded_table(crops[~is_kept], crop_files), out_dir / "excluded.tsv")
    write_table(index, out_dir / "index.tsv")
    return index


# --------------------------------------------------------------------------- reading


def iter_shard(path: str | os.PathLike) -> Iterator[dict]:
    """Rows of one shard (Parquet or TFRecord, by suffix) as dicts of the Parquet schema."""
    path = Path(path)
    if path.suffix == FORMATS["parquet"]:
        yield from iter_parquet_rows(path)
    elif path.suffix == FORMATS["tfrecord"]:
        for record in read_records(path):
            yield features_to_sample(decode_example(record))
    else:
        raise ValueError(f"{path}: not a shard (expected {sorted(FORMATS.values())})")


def load_index(out_dir: str | os.PathLike) -> pd.DataFrame:
    """The shard index written by :func:`write_shards`, with integer counts."""
    index = read_table(Path(out_dir) / "index.tsv")
    return index.astype({"n_samples": np.int64, "bytes": np.int64})


def load_labels(out_dir: str | os.PathLike) -> pd.DataFrame:
    """labels.tsv written by :func:`write_shards`, with integer class indices and counts."""
    labels = read_table(Path(out_dir) / "labels.tsv")
    counts = [c for c in LABEL_TABLE_COLUMNS if c not in ("label", "category")]
    return labels.astype({c: np.int64 for c in counts})
