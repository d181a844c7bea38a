"""Standardize stage: percentiles equal np.percentile's, outputs match an independent float64
reference, bad images are quarantined with the right reason and counts reconcile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tifffile
from cell_images import DATA
from PIL import Image

from cytopretrain.core import tables
from cytopretrain.core.errors import SchemaError, StandardizeError
from cytopretrain.core.imageio import read_channels
from cytopretrain.core.schema import conform
from cytopretrain.curation.standardize import OUTPUT_SCHEMA, QUARANTINE_REASONS, standardize_chunk, standardize_image

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real test data not found at {DATA}")

RNG = np.random.default_rng(11)


def reference(image: np.ndarray, mode: str, low: float = 0.1, high: float = 99.9) -> np.ndarray:
    """CytoImageNet's recipe in plain float64 numpy: np.percentile, clip, rescale, average."""
    image = image[:, :, None] if image.ndim == 2 else image
    units, informative = [], []
    for c in range(image.shape[2]):
        x = image[:, :, c].astype(np.float64)
        p_low, p_high = np.percentile(x, [low, high])
        informative.append(p_high > p_low)
        units.append(np.clip((x - p_low) / (p_high - p_low), 0, 1) if p_high > p_low else np.zeros_like(x))
    stack = np.stack(units, axis=-1)
    scaled = stack[:, :, informative].mean(axis=2) if mode == "merge" else stack
    return np.floor(scaled * 255 + 0.5)


def assert_close_to_reference(out: np.ndarray, image: np.ndarray, mode: str) -> None:
    """At most one grey level off, on few pixels: float32 values at exact half-level ties (common
    with integer data) may round either way; a systematic error would hit far more than 1 %."""
    difference = np.abs(out.astype(np.float64) - reference(image, mode))
    assert difference.max() <= 1
    assert np.count_nonzero(difference) <= max(2, difference.size // 100)


def microscopy_like(shape: tuple[int, int], dtype: str, rng: np.random.Generator = RNG) -> np.ndarray:
    """Dim background with a few bright spots and shot noise."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    signal = np.zeros(shape)
    for _ in range(6):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        signal += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(3, 8) ** 2))
    # 8-bit data gets a range it does not saturate; wider data a 16-bit-like range
    values = rng.poisson(20 + 200 * signal) if dtype in ("uint8", "int8") else rng.poisson(200 + 3000 * signal)
    if np.dtype(dtype).kind == "f":
        return (values / 65535).astype(dtype)
    return np.clip(values, 0, np.iinfo(dtype).max).astype(dtype)


# ------------------------------------------------------------------ percentiles


# ------------------------------------------------------------------ standardize_image


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int32", "uint32", "float32", "float64"])
@pytest.mark.parametrize("mode", ["merge", "keep"])
def test_matches_float64_reference(dtype, mode):
    image = np.stack([microscopy_like((60, 80), dtype) for _ in range(3)], axis=-1)
    if dtype == "int16":
        image = image - np.int16(1000)  # negative values take the offset histogram path
    if dtype == "uint32":
        image[0, 0, 0] = 4_000_000_000  # range too wide for a histogram: selection path
    out, stats = standardize_image(image, mode=mode)
    assert out.dtype == np.uint8
    assert out.shape == ((60, 80) if mode == "merge" else (60, 80, 3))
    assert_close_to_reference(out, image, mode)
    expected = [np.percentile(image[:, :, c], [0.1, 99.9]) for c in range(3)]
    np.testing.assert_allclose(np.c_[stats["p_low"], stats["p_high"]], expected, rtol=1e-6)


def test_large_offset_with_tiny_span_keeps_precision():
    image = 1e6 + microscopy_like((40, 50), "float64") * 1e-3
    for mode in ("merge", "keep"):
        assert_close_to_reference(standardize_image(image, mode=mode)[0], image, mode)


def test_keep_mode_uses_full_range_and_percentile_options():
    image = np.stack([microscopy_like((80, 80), "uint16") for _ in range(2)], axis=-1)
    out, _ = standardize_image(image, mode="keep")
    assert (out.min(axis=(0, 1)) == 0).all() and (out.max(axis=(0, 1)) == 255).all()
    wide, _ = standardize_image(image, low=0, high=100, mode="keep")
    difference = np.abs(wide.astype(float) - reference(image, "keep", 0, 100))
    assert difference.max() <= 1


def test_uniform_channel_is_zeroed_and_left_out_of_the_merge():
    informative = np.stack([microscopy_like((50, 60), "uint16") for _ in range(2)], axis=-1)
    blank = np.full((50, 60, 1), 700, np.uint16)
    image = np.concatenate([informative[:, :, :1], blank, informative[:, :, 1:]], axis=2)
    kept, stats = standardize_image(image, mode="keep")
    assert stats["uniform_channels"] == [1]
    assert not kept[:, :, 1].any()
    np.testing.assert_array_equal(kept[:, :, [0, 2]], standardize_image(informative, mode="keep")[0])
    merged, _ = standardize_image(image, mode="merge")
    np.testing.assert_array_equal(merged, standardize_image(informative, mode="merge")[0])


def test_uniform_and_non_finite_images_are_rejected():
    with pytest.raises(StandardizeError) as caught:
        standardize_image(np.zeros((20, 20, 3), np.uint16))
    assert caught.value.reason == "uniform"
    # One bright pixel in 100 lies outside the 5-95 % percentile range: still uniform.
    nearly = np.zeros((10, 10), np.uint8)
    nearly[0, 0] = 255
    with pytest.raises(StandardizeError, match="uniform"):
        standardize_image(nearly, low=5, high=95)
    for bad in (np.nan, np.inf, -np.inf):
        image = microscopy_like((20, 20), "float32")[:, :, None].repeat(2, axis=2)
        image[3, 4, 1] = bad
        with pytest.raises(StandardizeError) as caught:
            standardize_image(image)
        assert caught.value.reason == "non_finite" and "channel 1" in caught.value.detail


def test_binary_masks_are_rejected_even_when_channels_differ():
    rng = np.random.default_rng(3)
    # Three different masks: merged, they would blend into up to four grey levels.
    masks = (rng.random((40, 50, 3)) > 0.5).astype(np.uint8) * np.array([255, 1, 9], np.uint8)
    with pytest.raises(StandardizeError) as caught:
        standardize_image(masks)
    assert caught.value.reason == "binary"
    as_float = masks.astype(np.float32) / 7
    with pytest.raises(StandardizeError, match="two values"):
        standardize_image(as_float, mode="keep")
    # One real channel beside a mask is a micrograph with a mask channel: kept.
    mixed = np.concatenate([masks[:, :, :1], microscopy_like((40, 50), "uint8")[:, :, None]], axis=2)
    kept, _ = standardize_image(mixed, mode="keep")
    assert kept.shape == (40, 50, 2)


def test_bad_options_raise():
    image = microscopy_like((10, 10), "uint8")
    for kwargs in ({"low": 50, "high": 50}, {"low": -1}, {"high": 101}, {"mode": "concat"}):
        with pytest.raises(ValueError):
            standardize_image(image, **kwargs)


@needs_data
def test_real_sources_use_the_full_8_bit_range():
    first = sorted((DATA / "rxrx1").glob("train/*/Plate1/*_s1_w1.png"))[0]
    gfp = sorted((DATA / "yeast_toy" / "images").glob("*/*_gfp.tif"))[0]
    blue = sorted(DATA.glob("hpa_toy/*/*_blue.tif"))[0]
    sources = {
        "rxrx1 uint8 png": [first.with_name(first.name.replace("_w1", f"_w{c}")) for c in range(1, 7)],
        "yeast float32 tif": [gfp, gfp.with_name(gfp.name.replace("_gfp", "_rfp"))],
        "hpa float32 tif": [blue.with_name(blue.name.replace("blue", s)) for s in ("blue", "green", "red")],
        "bbbc021 uint16 npy": [sorted((DATA / "bbbc021_cells").glob("*/*.npy"))[0]],
    }
    for name, paths in sources.items():
        image = read_channels(paths)
        kept, stats = standardize_image(image, mode="keep")
        assert not stats["uniform_channels"], name
        assert (kept.min(axis=(0, 1)) == 0).all() and (kept.max(axis=(0, 1)) == 255).all(), name
        assert_close_to_reference(kept, image, "keep")
        merged, _ = standardize_image(image, mode="merge")
        assert_close_to_reference(merged, image, "merge")
        assert np.unique(merged).size > 64, name  # a small float range is stretched, not flattened


# ------------------------------------------------------------------ standardize_chunk


def write_tiff(path: Path, image: np.ndarray) -> str:
    tifffile.imwrite(path, image)
    return str(path)


@pytest.fixture
def chunk_table(tmp_path) -> tuple[pd.DataFrame, dict[str, str]]:
    """Good and bad rows; returns the table and the expected reason per idx ("" = kept)."""
    rows, expected = [], {}

    def add(idx: str, paths: list[str], channels: str, reason: str, name: str = "synthetic") -> None:
        rows.append({"idx": idx, "channel_paths": paths, "channels": channels, "name": name})
        expected[idx] = reason

    good = [write_tiff(tmp_path / f"good{c}.tif", microscopy_like((48, 64), "uint16")) for c in range(3)]
    add("good-tiff", good, "dapi|tubulin|actin", "")
    add("good-single", [good[0]], "dapi", "")
    float_path = write_tiff(tmp_path / "float.tif", microscopy_like((48, 64), "float32"))
    add("good-float", [float_path], "", "")

    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(Path(good[1]).read_bytes()[:3000])
    add("truncated", [good[0], str(truncated)], "a|b", "unreadable")
    (tmp_path / "zero.tif").write_bytes(b"")
    add("zero-bytes", [str(tmp_path / "zero.tif")], "a", "empty_file")
    add("missing", [good[0], str(tmp_path / "absent.tif")], "a|b", "missing_file")
    add("black", [write_tiff(tmp_path / "black.tif", np.zeros((48, 64), np.uint16))], "a", "uniform")
    nan_image = microscopy_like((48, 64), "float32")
    nan_image[5, 5] = np.nan
    add("nan", [write_tiff(tmp_path / "nan.tif", nan_image)], "a", "non_finite")
    inf_image = microscopy_like((48, 64), "float32")
    inf_image[0, 1] = np.inf
    add("inf", [float_path, write_tiff(tmp_path / "inf.tif", inf_image)], "a|b", "non_finite")
    add("names-vs-paths", good[:2], "dapi|tubulin|actin", "wrong_channel_count")
    add("config-count", good[:2], "", "wrong_channel_count", name="three_channel_source")
    other = write_tiff(tmp_path / "other_shape.tif", microscopy_like((40, 64), "uint16"))
    add("shapes", [good[0], other], "a|b", "shape_mismatch")
    (tmp_path / "a.gif").write_bytes(b"GIF89a....")
    add("gif", [str(tmp_path / "a.gif")], "a", "unsupported_format")
    png = tmp_path / "rgb.png"
    Image.fromarray(microscopy_like((48, 64), "uint8")[:, :, None].repeat(3, axis=2)).save(png)
    add("good-png", [str(png), good[1]], "bf|tub", "")
    return pd.DataFrame(rows), expected


def test_chunk_quarantines_each_bad_image_with_its_reason(tmp_path, chunk_table):
    meta, expected = chunk_table
    out = tmp_path / "out" / "standardized.parquet"
    decisions = standardize_chunk(meta, out, expected_channels={"three_channel_source": 3}, rows_per_group=2)

    assert list(decisions.columns) == ["idx", "stage", "status", "reason", "detail"]
    assert decisions["idx"].tolist() == meta["idx"].tolist()  # each row once, in order
    assert (decisions["stage"] == "standardize").all()
    assert dict(zip(decisions["idx"], decisions["reason"])) == expected
    kept = decisions[decisions["status"] == "kept"]
    quarantined = decisions[decisions["status"] == "quarantined"]
    assert len(kept) + len(quarantined) == len(meta)
    assert (quarantined["detail"].str.len() > 0).all()
    assert set(quarantined["reason"]) <= set(QUARANTINE_REASONS)
    truncated_detail = quarantined.set_index("idx").loc["truncated", "detail"]
    assert "truncated.tif" in truncated_detail

    table = pq.read_table(out)
    assert table.schema.equals(OUTPUT_SCHEMA)
    assert table.column("idx").to_pylist() == kept["idx"].tolist()
    assert pq.ParquetFile(out).metadata.num_row_groups == -(-len(kept) // 2)  # bounded row groups
    by_idx = meta.set_index("idx")
    for row in table.to_pylist():
        paths = by_idx.loc[row["idx"], "channel_paths"]
        image = read_channels(paths)
        expected_pixels, stats = standardize_image(image, mode="merge")
        decoded = tables.decode_pixels(row["pixels"], row["height"], row["width"], row["n_channels"])
        np.testing.assert_array_equal(decoded[:, :, 0], expected_pixels)
        np.testing.assert_array_equal(row["p_low"], np.float32(stats["p_low"]))
        np.testing.assert_array_equal(row["p_high"], np.float32(stats["p_high"]))
        assert (row["source_height"], row["source_width"]) == image.shape[:2]
        assert row["source_dtype"] == str(image.dtype)


def test_chunk_threads_and_keep_mode(tmp_path, chunk_table):
    meta, _ = chunk_table
    one = standardize_chunk(meta, tmp_path / "one.parquet", mode="keep")
    two = standardize_chunk(meta, tmp_path / "two.parquet", mode="keep", threads=2, rows_per_group=3)
    pd.testing.assert_frame_equal(one, two)
    assert pq.read_table(tmp_path / "one.parquet").equals(pq.read_table(tmp_path / "two.parquet"))
    rows = {r["idx"]: r for r in pq.read_table(tmp_path / "one.parquet").to_pylist()}
    assert rows["good-tiff"]["n_channels"] == 3 and rows["good-single"]["n_channels"] == 1


def test_chunk_accepts_a_canonical_table_read_back_from_parquet(tmp_path):
    paths = [write_tiff(tmp_path / f"c{c}.tif", microscopy_like((32, 32), "uint16")) for c in range(2)]
    frame = conform(
        pd.DataFrame(
            {
                "idx": ["src-0"],
                "channel_paths": [paths],
                "channels": ["a|b"],
                "microscopy": ["fluorescence"],
                "name": ["src"],
            }
        ),
        "test",
    )
    tables.write_table(frame, tmp_path / "meta.parquet")
    meta = tables.read_table(tmp_path / "meta.parquet")  # channel_paths come back as numpy arrays
    decisions = standardize_chunk(meta, tmp_path / "out.parquet", expected_channels={"src": 2})
    assert decisions["status"].tolist() == ["kept"]


def test_chunk_rejects_bad_tables(tmp_path, chunk_table):
    meta, _ = chunk_table
    with pytest.raises(SchemaError, match="channels"):
        standardize_chunk(meta.drop(columns="channels"), tmp_path / "a.parquet")
    with pytest.raises(SchemaError, match="name"):
        standardize_chunk(meta.drop(columns="name"), tmp_path / "b.parquet", expected_channels={"x": 1})
    with pytest.raises(SchemaError, match="duplicate"):
        standardize_chunk(pd.concat([meta, meta.iloc[:1]]), tmp_path / "c.parquet")
    broken = meta.copy()
    broken.at[2, "channel_paths"] = []
    with pytest.raises(SchemaError, match=broken.at[2, "idx"]):
        standardize_chunk(broken, tmp_path / "d.parquet")
    assert not [p for p in tmp_path.iterdir() if ".parquet" in p.name]  # nothing half-written


def test_empty_chunk_writes_an_empty_table(tmp_path):
    meta = pd.DataFrame({"idx": [], "channel_paths": [], "channels": []})
    decisions = standardize_chunk(meta, tmp_path / "empty.parquet")
    assert decisions.empty and list(decisions.columns) == ["idx", "stage", "status", "reason", "detail"]
    table = pq.read_table(tmp_path / "empty.parquet")
    assert table.num_rows == 0 and table.schema.equals(OUTPUT_SCHEMA)


@needs_data
def test_chunk_on_real_rxrx1_sites(tmp_path):
    firsts = sorted((DATA / "rxrx1").glob("*/*/Plate*/*_w1.png"))[:6]
    meta = pd.DataFrame(
        {
            "idx": [f"rx-{i}" for i in range(len(firsts))],
            "channel_paths": [[str(f.with_name(f.name.replace("_w1", f"_w{c}"))) for c in range(1, 7)] for f in firsts],
            "channels": "w1|w2|w3|w4|w5|w6",
        }
    )
    decisions = standardize_chunk(meta, tmp_path / "rx.parquet", threads=2)
    # Site 2 of each plate has only w1-w4 on disk: its missing channel files are quarantined.
    complete = [all(Path(p).is_file() for p in paths) for paths in meta["channel_paths"]]
    assert any(complete) and not all(complete)
    assert (decisions["status"] == "kept").tolist() == complete
    assert set(decisions.loc[~np.array(complete), "reason"]) <= {"missing_file"}
    table = pq.read_table(tmp_path / "rx.parquet")
    assert table.num_rows == sum(complete)
    for row in table.to_pylist():
        image = read_channels(meta.set_index("idx").loc[row["idx"], "channel_paths"])
        decoded = tables.decode_pixels(row["pixels"], row["height"], row["width"], row["n_channels"])
        assert_close_to_reference(decoded[:, :, 0], image, "merge")


@pytest.mark.skipif(not DATA.is_dir(), reason="real data absent")
def test_stacks_and_tiny_images_get_their_own_reasons(tmp_path):
    """Real yeast planes: a 3 x 3 and a 1 x 1 crop are too_small (the 1 x 1 used to be
    `uniform`, the 3 x 3 kept); a ZYX stack of three planes is a `stack` for a source without
    z_projection and its maximum projection for a source with `max`; a 31-pixel side is under
    the default minimum."""
    paths = sorted((DATA / "yeast_toy" / "images").glob("*/*_gfp.tif"))[:3]
    planes = np.stack([tifffile.imread(p) for p in paths])
    stack = tmp_path / "stack_gfp.ome.tif"
    tifffile.imwrite(stack, planes, metadata={"axes": "ZYX"}, ome=True)
    rows = [
        ("tiny", [write_tiff(tmp_path / "tiny.tif", planes[0, 30:33, 30:33])], "own"),
        ("dot", [write_tiff(tmp_path / "dot.tif", planes[0, 30:31, 30:31])], "own"),
        ("narrow", [write_tiff(tmp_path / "narrow.tif", planes[0, :31, :])], "own"),
        ("side-32", [write_tiff(tmp_path / "side32.tif", planes[0, :32, :])], "own"),
        ("stack", [str(stack)], "own"),
        ("projected", [str(stack)], "confocal"),
    ]
    meta = pd.DataFrame(rows, columns=["idx", "channel_paths", "name"]).assign(channels="gfp")
    out = tmp_path / "out.parquet"
    decisions = standardize_chunk(meta, out, z_projections={"confocal": "max"})
    assert dict(zip(decisions["idx"], decisions["reason"])) == {
        "tiny": "too_small",
        "dot": "too_small",
        "narrow": "too_small",
        "side-32": "",
        "stack": "stack",
        "projected": "",
    }
    details = decisions.set_index("idx")["detail"]
    assert "3 x 3 pixels" in details["tiny"] and "tiny.tif" in details["tiny"]
    assert "3 planes along Z" in details["stack"] and "z_projection" in details["stack"]
    assert {"too_small", "stack"} <= set(QUARANTINE_REASONS)
    kept = {row["idx"]: row for row in pq.read_table(out).to_pylist()}
    expected, _ = standardize_image(planes.max(axis=0))
    row = kept["projected"]
    np.testing.assert_array_equal(tables.decode_pixels(row["pixels"], 64, 64, 1)[:, :, 0], expected)


def test_default_min_side_is_the_smallest_side_every_backbone_accepts():
    from cytopretrain.curation.standardize import DEFAULT_MIN_SIDE
    from cytopretrain.learning.models import _MIN_INPUT_SIZE

    assert DEFAULT_MIN_SIDE == max(_MIN_INPUT_SIZE.values())
