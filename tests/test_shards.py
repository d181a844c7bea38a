"""Tests of the write_shards stage: split, shard layout, Parquet and TFRecord round trips.

Crop files are built from real single-cell images (yeast_toy TIFFs, bbbc021_cells arrays)
normalized to uint8 here; TFRecord shards are cross-checked with the independent PyPI
``tfrecord`` package and protobuf.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tfrecord as pypi_tfrecord
import tifffile
from cell_images import BBBC_CELLS, DATA, YEAST, to_uint8
from PIL import Image
from tfrecord import example_pb2
from tfrecord.writer import TFRecordWriter as PyPIWriter

from cytopretrain.core.errors import SchemaError, TFRecordError
from cytopretrain.core.schema import CANONICAL_FIELDS, conform
from cytopretrain.core.tables import ParquetStreamWriter, encode_pixels, write_table
from cytopretrain.curation import shards
from cytopretrain.curation import tfrecord as tfr
from cytopretrain.curation.crops import CROP_SCHEMA

# Images per yeast protein: 10 * 0.25 = 2.5 and 6 * 0.25 = 1.5 exercise rounding half up.
YEAST_IMAGES = {"AAC1": 12, "AAC3": 10, "AAH1": 7, "AAP1": 6, "AAR2": 2}
BBBC_IMAGES = 15  # per MOA
DROPPED_LABEL = "aah1"
FRACTION = 0.25
PER_SHARD = 16


def crop_windows(image: np.ndarray, n_crops: int) -> list[tuple[np.ndarray, dict]]:
    """The whole image, then quadrants, each with its window columns."""
    h, w = image.shape[:2]
    windows = [(0, w, 0, h), (0, w // 2, 0, h // 2), (w // 2, w, h // 2, h), (w // 2, w, 0, h // 2)]
    out = []
    for x0, x1, y0, y1 in windows[:n_crops]:
        cols = {
            "crop": (x1 - x0) < w,
            "scaling": (x1 - x0) / w,
            "x_min": x0,
            "x_max": x1,
            "y_min": y0,
            "y_max": y1,
        }
        out.append((np.ascontiguousarray(image[y0:y1, x0:x1]), cols))
    return out


def real_images() -> list[dict]:
    """Parent images: idx, label, category, uint8 pixels and canonical metadata."""
    images = []
    for protein, count in YEAST_IMAGES.items():
        for gfp in sorted((YEAST / protein).glob("*_gfp.tif"))[:count]:
            rfp = gfp.with_name(gfp.name.replace("_gfp.tif", "_rfp.tif"))
            channels = [tifffile.imread(gfp), tifffile.imread(rfp)]
            n = len(images)
            pixels = to_uint8(channels[: 1 + n % 2])  # alternate 1-channel and 2-channel images
            images.append(
                {
                    "pixels": pixels,
                    "label": protein.lower(),
                    "category": "gene",
                    "meta": {
                        "name": "yeast_toy",
                        "dir_name": "yeast",
                        "path": str(gfp.parent),
                        "filename": gfp.name,
                        "organism": "saccharomyces cerevisiae",
                        "gene": f"{protein.lower()} targeted",
                        "microscopy": "fluorescence",
                        "channels": "gfp|rfp",
                        "channel_paths": [str(gfp), str(rfp)],
                    },
                }
            )
    cells = pd.read_csv(BBBC_CELLS / "cells.csv").sort_values("file")
    for moa, rows in cells.groupby("moa"):
        for row in rows.head(BBBC_IMAGES).itertuples():
            array = np.load(BBBC_CELLS / row.file)
            images.append(
                {
                    "pixels": to_uint8([array[..., c] for c in range(3)]),
                    "label": moa.lower(),
                    "category": "phenotype",
                    "meta": {
                        "name": "bbbc021",
                        "dir_name": "bbbc021",
                        "path": str(BBBC_CELLS / moa),
                        "filename": Path(row.file).name,
                        "organism": "homo sapiens",
                        "cell_type": "mcf7",
                        "compound": row.compound.lower(),
                        "microscopy": "fluorescence",
                        "channels": "dapi|tubulin|actin",
                        "channel_paths": [str(BBBC_CELLS / row.file)] * 3,
                        "plate": row.plate,
                        "well": row.well,
                        "concentration": row.concentration,
                    },
                }
            )
    for n, image in enumerate(images):
        image["idx"] = f"{image['meta']['dir_name']}-{n}"
    return images


def write_crop_files(images: list[dict], folder: Path, n_files: int = 3) -> tuple[list[Path], dict]:
    """Crop Parquet files (label-sorted, so unshuffled output would be visibly grouped)."""
    crops = {}
    for n, image in enumerate(sorted(images, key=lambda im: im["label"])):
        for j, (pixels, window) in enumerate(crop_windows(image["pixels"], 1 + n % 3)):
            crop_id = f"{image['idx']}-crop{j}"
            crops[crop_id] = {
                "crop_id": crop_id,
                "idx": image["idx"],
                "label": image["label"],
                "category": image["category"],
                **window,
                **encode_pixels(pixels),
            }
    ids = list(crops)
    paths = []
    for part, chunk in enumerate(np.array_split(np.arange(len(ids)), n_files)):
        path = folder / f"crops-{part}.parquet"
        with ParquetStreamWriter(path, CROP_SCHEMA, rows_per_group=16) as writer:
            for i in chunk:
                writer.write(crops[ids[i]])
        paths.append(path)
    return paths, crops


def metadata_table(images: list[dict]) -> pd.DataFrame:
    rows = [{"idx": im["idx"], "database": "test", **im["meta"]} for im in images]
    rows.append({"idx": "unused-0", "microscopy": "brightfield", "channel_paths": ["/nowhere.tif"]})
    return conform(pd.DataFrame(rows), "test metadata")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    if not (YEAST.is_dir() and BBBC_CELLS.is_dir()):
        pytest.skip(f"real test data not found under {DATA} (yeast_toy, bbbc021_cells)")
    folder = tmp_path_factory.mktemp("crops")
    images = real_images()
    files, crops = write_crop_files(images, folder)
    labels = sorted({im["label"] for im in images})
    categories = {im["label"]: im["category"] for im in images}
    kept = pd.DataFrame({"label": [lab for lab in labels if lab != DROPPED_LABEL]})
    kept["category"] = kept["label"].map(categories)
    return {
        "files": files,
        "crops": crops,
        "metadata": metadata_table(images),
        "kept": kept.sample(frac=1, random_state=1),
        "folder": folder,
    }


def run(dataset, out_dir: Path, **options) -> pd.DataFrame:
    settings = {"samples_per_shard": PER_SHARD, "validation_fraction": FRACTION, "seed": 3}
    settings.update(options)
    return shards.write_shards(dataset["files"], dataset["kept"], dataset["metadata"], out_dir, **settings)


@pytest.fixture(scope="module")
def shard_sets(dataset, tmp_path_factory):
    """Writes the shards of one format on first request; returns index, samples by crop_id."""
    cache = {}

    def get(fmt: str) -> dict:
        if fmt not in cache:
            out_dir = tmp_path_factory.mktemp(f"shards-{fmt}")
            index = run(dataset, out_dir, fmt=fmt)
            samples = {}
            for row in index.itertuples():
                for sample in shards.iter_shard(out_dir / row.shard):
                    samples.setdefault(sample["crop_id"], []).append((row.split, row.shard, sample))
            cache[fmt] = {"fmt": fmt, "out_dir": out_dir, "index": index, "samples": samples}
        return cache[fmt]

    return get


@pytest.fixture(params=["parquet", "tfrecord"])
def written(request, shard_sets):
    return shard_sets(request.param)


def expected_validation_images(n: int, fraction: float) -> int:
    if n < 2 or fraction == 0:
        return 0
    return max(1, min(n - 1, math.floor(n * fraction + 0.5)))


# --------------------------------------------------------------------------- split


def test_split_is_stratified_by_group_and_order_independent():
    rng = np.random.default_rng(7)
    group_labels = {f"img-{g}": f"label-{rng.integers(6)}" for g in range(300)}
    groups = np.array([g for g in group_labels for _ in range(rng.integers(1, 4))])
    labels = np.array([group_labels[g] for g in groups])

    is_val = shards.stratified_split(labels, fraction=0.15, seed=11, group=groups)

    assert not set(groups[is_val]) & set(groups[~is_val])
    per_label = collections.Counter(group_labels.values())
    val_groups = set(groups[is_val])
    for label, n in per_label.items():
        n_val = sum(1 for g in val_groups if group_labels[g] == label)
        assert n_val == expected_validation_images(n, 0.15), label
    order = rng.permutation(len(groups))
    shuffled = shards.stratified_split(labels[order], fraction=0.15, seed=11, group=groups[order])
    assert set(groups[order][shuffled]) == val_groups
    other = shards.stratified_split(labels, fraction=0.15, seed=12, group=groups)
    assert set(groups[other]) != val_groups


def test_split_without_groups_small_labels_and_zero_fraction():
    labels = np.array(["a"] * 20 + ["b"] * 3 + ["c"] * 2 + ["d"])
    is_val = shards.stratified_split(labels, fraction=0.1, seed=0)
    counts = {lab: int(is_val[labels == lab].sum()) for lab in "abcd"}
    assert counts == {lab: expected_validation_images(int((labels == lab).sum()), 0.1) for lab in "abcd"}
    assert counts["d"] == 0 and counts["c"] == 1  # 1 image: train only; 2 images: one each side
    assert not shards.stratified_split(labels, fraction=0.0, seed=0).any()


def test_split_rejects_bad_input():
    with pytest.raises(ValueError, match="more than one label"):
        shards.stratified_split(["a", "b"], group=["img", "img"])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        shards.stratified_split(["a", "b"], fraction=1.0)
    with pytest.raises(ValueError, match="missing"):
        shards.stratified_split(["a", None])


# --------------------------------------------------------------------------- layout


def test_every_crop_is_in_one_shard_or_excluded(dataset, written):
    out_dir, index, samples = written["out_dir"], written["index"], written["samples"]
    excluded = pd.read_csv(out_dir / "excluded.tsv", sep="\t", keep_default_na=False)
    dropped = {c for c, row in dataset["crops"].items() if row["label"] == DROPPED_LABEL}

    assert all(len(places) == 1 for places in samples.values())
    assert set(samples) | dropped == set(dataset["crops"])
    assert not set(samples) & dropped
    assert len(excluded) == len(dropped) > 0
    assert set(excluded["reason"]) == {"label_dropped"}
    assert set(excluded["stage"]) == {"write_shards"}
    assert collections.Counter(excluded["idx"]) == collections.Counter(dataset["crops"][c]["idx"] for c in dropped)
    assert all(any(c in d for c in dropped) for d in excluded["detail"])
    assert index["n_samples"].sum() + len(excluded) == len(dataset["crops"])


def test_shard_sizes_index_and_files(written):
    out_dir, index, fmt = written["out_dir"], written["index"], written["fmt"]
    assert index.equals(shards.load_index(out_dir))
    assert set(index["split"]) == {"train", "validation"}
    assert set(index["format"]) == {fmt}
    for split, part in index.groupby("split"):
        sizes = part["n_samples"].tolist()
        assert all(n == PER_SHARD for n in sizes[:-1]) and 1 <= sizes[-1] <= PER_SHARD
        assert part["shard"].tolist() == [f"{split}/shard-{i:05d}.{fmt}" for i in range(len(part))]
    on_disk = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.glob(f"*/shard-*.{fmt}"))
    assert on_disk == sorted(index["shard"])
    for row in index.itertuples():
        data = (out_dir / row.shard).read_bytes()
        assert row.bytes == len(data) and row.sha256 == hashlib.sha256(data).hexdigest()
        ids = [s["crop_id"] for s in shards.iter_shard(out_dir / row.shard)]
        assert len(ids) == row.n_samples and (ids[0], ids[-1]) == (
            row.first_crop_id,
            row.last_crop_id,
        )
    assert not list(out_dir.rglob("*.part"))


def test_split_has_no_leakage_and_is_stratified(dataset, written):
    samples = written["samples"]
    split_of_idx = collections.defaultdict(set)
    for places in samples.values():
        split, _, sample = places[0]
        split_of_idx[sample["idx"]].add(split)
    assert all(len(s) == 1 for s in split_of_idx.values())
    images_per_label = collections.defaultdict(set)
    for crop in dataset["crops"].values():
        if crop["label"] != DROPPED_LABEL:
            images_per_label[crop["label"]].add(crop["idx"])
    for label, images in images_per_label.items():
        n_val = sum("validation" in split_of_idx[i] for i in images)
        assert n_val == expected_validation_images(len(images), FRACTION), label


def test_labels_table_matches_shards(dataset, written):
    labels = shards.load_labels(written["out_dir"])
    kept = sorted(dataset["kept"]["label"])
    assert labels["label"].tolist() == kept
    assert labels["class_index"].tolist() == list(range(len(kept)))
    categories = dict(zip(dataset["kept"]["label"], dataset["kept"]["category"]))
    assert labels["category"].tolist() == [categories[lab] for lab in kept]
    counted = collections.Counter()
    images = collections.defaultdict(set)
    for places in written["samples"].values():
        split, _, sample = places[0]
        counted[(sample["label"], split)] += 1
        images[(sample["label"], split)].add(sample["idx"])
        assert sample["class_index"] == kept.index(sample["label"])
    for row in labels.itertuples():
        for split in ("train", "validation"):
            assert getattr(row, f"n_{split}") == counted[(row.label, split)]
            assert getattr(row, f"n_{split}_images") == len(images[(row.label, split)])


def test_pixels_and_metadata_round_trip(dataset, written):
    meta = dataset["metadata"].set_index("idx")
    float32 = written["fmt"] == "tfrecord"  # TFRecord floats are float32
    columns = set(CROP_SCHEMA.names) | {"class_index"} | set(CANONICAL_FIELDS)
    for crop_id, [(_, _, sample)] in written["samples"].items():
        assert set(sample) == columns
        source = dataset["crops"][crop_id]
        for name in (
            "idx",
            "label",
            "category",
            "crop",
            "x_min",
            "x_max",
            "y_min",
            "y_max",
            "pixels",
            "height",
            "width",
            "n_channels",
        ):
            assert sample[name] == source[name], (crop_id, name)
        assert sample["scaling"] == float(np.float32(source["scaling"]))
        parent = meta.loc[source["idx"]]
        for name in meta.columns:
            value, expected = sample[name], parent[name]
            if name == "concentration":
                expected = float(np.float32(expected)) if float32 else expected
                assert value == expected or (math.isnan(value) and math.isnan(expected)), crop_id
            else:
                assert value == (list(expected) if name == "channel_paths" else expected), (
                    crop_id,
                    name,
                )


def test_samples_are_shuffled(written):
    first = [s for s in shards.iter_shard(written["out_dir"] / written["index"]["shard"].iloc[0])]
    assert len({s["label"] for s in first}) > 1  # input files are sorted by label


# --------------------------------------------------------------------------- TFRecord


def pypi_frames(path: Path) -> list[tuple[bytes, bytes, bytes, bytes]]:
    """(length bytes, length crc, data, data crc) of every record, parsed here."""
    blob, frames, pos = path.read_bytes(), [], 0
    while pos < len(blob):
        (length,) = struct.unpack("<Q", blob[pos : pos + 8])
        frames.append(
            (
                blob[pos : pos + 8],
                blob[pos + 8 : pos + 12],
                blob[pos + 12 : pos + 12 + length],
                blob[pos + 12 + length : pos + 16 + length],
            )
        )
        pos += 16 + length
    return frames


def test_tfrecord_shards_read_by_independent_reader(dataset, shard_sets):
    written = shard_sets("tfrecord")
    out_dir, kept = written["out_dir"], sorted(dataset["kept"]["label"])
    meta = dataset["metadata"].set_index("idx")
    n_seen = 0
    for shard in written["index"]["shard"]:
        path = out_dir / shard
        for length, length_crc, data, data_crc in pypi_frames(path):
            assert PyPIWriter.masked_crc(length) == length_crc
            assert PyPIWriter.masked_crc(data) == data_crc
        for example in pypi_tfrecord.tfrecord_loader(str(path), None):
            n_seen += 1
            source = dataset["crops"][example["crop_id"].decode()]
            pixels = np.frombuffer(source["pixels"], np.uint8).reshape(
                source["height"], source["width"], source["n_channels"]
            )
            assert example["image/height"].tolist() == [source["height"]]
            assert example["image/width"].tolist() == [source["width"]]
            assert example["image/channels"].tolist() == [source["n_channels"]]
            if source["n_channels"] in (1, 3):
                assert example["image/format"] == b"png"
                png = Image.open(io.BytesIO(example["image/encoded"]))
                assert png.mode == ("L" if source["n_channels"] == 1 else "RGB")
                assert np.array_equal(np.asarray(png).reshape(pixels.shape), pixels)
            else:
                assert example["image/format"] == b"raw" and "image/encoded" not in example
                assert example["image/raw"] == source["pixels"]
            assert example["label"].tolist() == [kept.index(source["label"])]
            assert example["label/text"] == source["label"].encode()
            assert example["category"] == source["category"].encode()
            assert example["idx"] == source["idx"].encode()
            assert example["crop"].tolist() == [int(source["crop"])]
            assert example["scaling"].tolist() == [np.float32(source["scaling"])]
            for name in ("x_min", "x_max", "y_min", "y_max"):
                assert example[name].tolist() == [source[name]]
            parent = meta.loc[source["idx"]]
            paths = example["channel_paths"]
            paths = [paths] if isinstance(paths, bytes) else list(paths)
            assert [p.decode() for p in paths] == list(parent["channel_paths"])
            np.testing.assert_array_equal(example["concentration"], np.float32([parent["concentration"]]))
            for name in meta.columns.drop(["channel_paths", "concentration"]):
                assert example[name] == parent[name].encode(), name
    assert n_seen == written["index"]["n_samples"].sum()


def test_written_examples_parse_as_protobuf_and_read_back_both_ways(tmp_path):
    """Our writer's records parse with TensorFlow's Example proto to the values given, and our
    reader decodes records of the package's own writer."""
    features = {
        "neg": -3,
        "ints": np.array([0, 1, -(2**63), 2**63 - 1]),
        "flag": True,
        "floats": [0.5, -2.25, float("nan")],
        "text": "µm|dapi",
        "blobs": [b"", b"\x00\xff"],
        "empty_floats": np.array([], dtype=np.float32),
    }
    ours = tmp_path / "ours.tfrecord"
    with tfr.TFRecordWriter(ours) as writer:
        writer.write(tfr.typed_features(features))
    (record,) = list(tfr.read_records(ours, verify_crc=True))
    parsed = example_pb2.Example()
    parsed.ParseFromString(record)
    feature = parsed.features.feature
    assert list(feature["neg"].int64_list.value) == [-3]
    assert list(feature["ints"].int64_list.value) == [0, 1, -(2**63), 2**63 - 1]
    assert list(feature["flag"].int64_list.value) == [1]
    assert np.array_equal(
        np.float32(feature["floats"].float_list.value),
        np.float32([0.5, -2.25, np.nan]),
        equal_nan=True,
    )
    assert list(feature["text"].bytes_list.value) == ["µm|dapi".encode()]
    assert list(feature["blobs"].bytes_list.value) == [b"", b"\x00\xff"]
    assert feature["empty_floats"].WhichOneof("kind") == "float_list"
    decoded = tfr.decode_example(record)
    assert decoded["ints"].tolist() == [0, 1, -(2**63), 2**63 - 1] and decoded["blobs"] == [b"", b"\x00\xff"]

    path = tmp_path / "pypi.tfrecord"
    writer = PyPIWriter(str(path))
    writer.write({"a": ([-7, 9], "int"), "b": ([1.5], "float"), "c": ([b"x", b"yz"], "byte")})
    writer.write({"a": (0, "int"), "b": (-0.0, "float"), "c": (b"", "byte")})
    writer.close()
    records = [tfr.decode_example(r) for r in tfr.read_records(path, verify_crc=True)]
    assert records[0]["a"].tolist() == [-7, 9] and records[0]["b"].tolist() == [1.5]
    assert records[0]["c"] == [b"x", b"yz"]
    assert records[1]["a"].tolist() == [0] and records[1]["c"] == [b""]


def test_values_without_a_tfrecord_type_are_refused_by_name():
    with pytest.raises(TypeError, match="'e'"):
        tfr.feature_values("e", [])
    with pytest.raises(TypeError, match="'m'"):
        tfr.feature_values("m", [1, 2.5])
    with pytest.raises(TypeError, match="'big'"):
        tfr.feature_values("big", 2**63)
    with pytest.raises(TypeError, match="'grid'"):
        tfr.feature_values("grid", np.zeros((2, 2)))
    assert tfr.feature_values("s", np.array(["a", "b"])) == ([b"a", b"b"], "byte")


def test_corrupted_crc_is_detected(tmp_path):
    path = tmp_path / "good.tfrecord"
    with tfr.TFRecordWriter(path) as writer:
        for i in range(3):
            writer.write(tfr.image_features(np.full((5, 4, 1), i, np.uint8)))
    assert len(list(tfr.read_records(path))) == 3
    blob = bytearray(path.read_bytes())
    first_length = struct.unpack("<Q", blob[:8])[0]
    second = 16 + first_length

    data_flip = bytearray(blob)
    data_flip[second + 12 + 5] ^= 0x01  # a byte inside record 1's data
    (tmp_path / "data.tfrecord").write_bytes(data_flip)
    with pytest.raises(TFRecordError, match=r"data.tfrecord: record 1 .*data CRC"):
        list(tfr.read_records(tmp_path / "data.tfrecord"))
    assert len(list(tfr.read_records(tmp_path / "data.tfrecord", verify_crc=False))) == 3

    crc_flip = bytearray(blob)
    crc_flip[8] ^= 0x80  # record 0's length CRC
    (tmp_path / "length.tfrecord").write_bytes(crc_flip)
    with pytest.raises(TFRecordError, match="record 0 .*length CRC"):
        list(tfr.read_records(tmp_path / "length.tfrecord"))

    (tmp_path / "short.tfrecord").write_bytes(blob[:-3])
    with pytest.raises(TFRecordError, match="record 2 .*truncated"):
        list(tfr.read_records(tmp_path / "short.tfrecord"))


def test_atomic_writer_leaves_nothing_on_error(tmp_path):
    path = tmp_path / "x.tfrecord"
    with pytest.raises(TypeError):
        with tfr.TFRecordWriter(path) as writer:
            writer.write(tfr.typed_features({"ok": 1}))
            writer.write(tfr.typed_features({"bad": object()}))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- runs


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
    first = run(dataset, tmp_path / "a", fmt="tfrecord")
    again = run(dataset, tmp_path / "b", fmt="tfrecord")
    other = run(dataset, tmp_path / "c", fmt="tfrecord", seed=4)
    assert first.equals(again)
    assert (tmp_path / "a" / "labels.tsv").read_bytes() == (tmp_path / "b" / "labels.tsv").read_bytes()
    assert set(first["sha256"]).isdisjoint(other["sha256"])


def test_rerun_removes_stale_shards(dataset, tmp_path):
    run(dataset, tmp_path, fmt="parquet", samples_per_shard=4)
    index = run(dataset, tmp_path, fmt="parquet", samples_per_shard=1000)
    assert len(index) == 2
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("*/shard-*")) == sorted(index["shard"])


def test_bad_inputs_name_the_problem(dataset, tmp_path):
    files, kept, meta = dataset["files"], dataset["kept"], dataset["metadata"]
    with pytest.raises(ValueError, match="format"):
        shards.write_shards(files, kept, meta, tmp_path, fmt="zip")

    broken = tmp_path / "no-scaling.parquet"
    write_table(pd.read_parquet(files[0]).drop(columns="scaling"), broken)
    with pytest.raises(SchemaError, match=r"no-scaling.parquet.*scaling"):
        shards.write_shards([broken], kept, meta, tmp_path / "out")

    with pytest.raises(SchemaError, match="duplicate crop_id"):
        shards.write_shards([files[0], files[0]], kept, meta, tmp_path / "out")

    second = pd.read_parquet(files[1], columns=["idx", "label"])
    crop = second[second["label"] != DROPPED_LABEL].iloc[0]
    with pytest.raises(SchemaError, match=rf"crops-1.parquet.*{crop['idx']}.*absent from the metadata"):
        shards.write_shards(files, kept, meta[meta["idx"] != crop["idx"]], tmp_path / "out")

    wrong = kept.assign(category=np.where(kept["label"] == crop["label"], "organism", kept["category"]))
    with pytest.raises(SchemaError, match=rf"{crop['label']}.*category"):
        shards.write_shards(files, wrong, meta, tmp_path / "out")

    with pytest.raises(ValueError, match="none of the"):
        shards.write_shards(files, pd.DataFrame({"label": ["x"], "category": ["gene"]}), meta, tmp_path / "out")
    assert not (tmp_path / "out" / "index.tsv").exists()
