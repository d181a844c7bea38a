"""Tests of cytopretrain.curation.crops: crop rules, crop planning, renormalization, chunk upsampling."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cell_images import DATA
from PIL import Image

from cytopretrain.core.tables import PIXEL_FIELDS, ParquetStreamWriter, decode_pixels, encode_pixels, read_table
from cytopretrain.curation.crops import (
    CROP_SCHEMA,
    DEFAULT_RULES,
    DEFAULT_SCALES,
    WHOLE_NO_SCALE,
    WHOLE_SINGLE,
    WHOLE_SMALL,
    crops_per_image,
    plan_crops,
    renormalize,
    upsample_chunk,
)

RXRX1 = DATA / "rxrx1"

STANDARDIZED_SCHEMA = pa.schema(
    [
        ("idx", pa.string()),
        *PIXEL_FIELDS.items(),
        ("p_low", pa.list_(pa.float32())),
        ("p_high", pa.list_(pa.float32())),
        ("source_dtype", pa.string()),
        ("source_height", pa.int32()),
        ("source_width", pa.int32()),
    ]
)


def rxrx1_images(n: int, site: str = "s1", channels: tuple[str, ...] = ("w1",)) -> list[np.ndarray]:
    """The first ``n`` real RxRx1 fields (sorted by path), channels stacked as (H, W, C)."""
    if not RXRX1.is_dir():
        pytest.skip(f"real data folder {RXRX1} is absent")
    firsts = sorted(RXRX1.glob(f"train/*/Plate*/*_{site}_{channels[0]}.png"))[:n]
    images = []
    for first in firsts:
        planes = [np.asarray(Image.open(str(first).replace(f"_{channels[0]}.png", f"_{c}.png"))) for c in channels]
        images.append(np.stack(planes, axis=2))
    assert len(images) == n, f"expected {n} RxRx1 fields under {RXRX1}"
    return images


def write_standardized(path: Path, images: dict[str, np.ndarray]) -> Path:
    """A standardized chunk as the standardize stage writes it."""
    with ParquetStreamWriter(path, STANDARDIZED_SCHEMA, rows_per_group=3) as writer:
        for idx, image in images.items():
            pixels = encode_pixels(image)
            c = pixels["n_channels"]
            writer.write(
                {
                    "idx": idx,
                    **pixels,
                    "p_low": [0.0] * c,
                    "p_high": [255.0] * c,
                    "source_dtype": "uint8",
                    "source_height": image.shape[0],
                    "source_width": image.shape[1],
                }
            )
    return path


def reference_renormalize(crop: np.ndarray, low: float, high: float) -> np.ndarray:
    """Straightforward per-channel version built on np.percentile."""
    out = np.zeros_like(crop)
    for c in range(crop.shape[2]):
        channel = crop[:, :, c].astype(np.float64)
        lo, hi = np.percentile(channel, [low, high])
        if hi > lo:
            out[:, :, c] = np.floor(np.clip((channel - lo) / (hi - lo), 0, 1) * 255 + 0.5).astype(np.uint8)
    return out


# --- crops_per_image -------------------------------------------------------------------


def first_matching_rule(size: int, rules) -> int:
    for threshold, count in rules:
        if threshold <= size:
            return count
    raise AssertionError("no rule")


def test_crops_per_image_boundaries_follow_the_rule_text():
    sizes = sorted({s for t, _ in DEFAULT_RULES for s in (t, t - 1) if s >= 0} | {5000})
    expected = [first_matching_rule(s, DEFAULT_RULES) for s in sizes]
    assert [crops_per_image(s) for s in sizes] == expected
    assert crops_per_image(np.array(sizes)).tolist() == expected
    # The published mapping: 1000 → 1, 550..999 → 2, 400..549 → 3, below 400 → 4.
    assert dict(zip(sizes, expected))[999] == 2 and dict(zip(sizes, expected))[399] == 4


def test_crops_per_image_custom_rules_and_errors():
    rules = ((50, 1), (10, 3))
    assert crops_per_image(np.array([10, 49, 50, 1000]), rules).tolist() == [3, 3, 1, 1]
    with pytest.raises(ValueError, match="below every"):
        crops_per_image(9, rules)
    with pytest.raises(ValueError, match="below every"):
        crops_per_image(-1)
    with pytest.raises(ValueError, match="decreasing"):
        crops_per_image(5, ((0, 4), (400, 3)))
    with pytest.raises(ValueError, match="1..4"):
        crops_per_image(5, ((0, 5),))
    with pytest.raises(TypeError):
        crops_per_image(np.array([1.5]))


# --- plan_crops ------------------------------------------------------------------------


def quadrant_of(box, height: int, width: int) -> int:
    """Quadrant holding the box entirely, or -1 if it straddles a boundary."""
    half_h, half_w = height // 2, width // 2
    rows = 0 if box.y_max <= half_h else (1 if box.y_min >= half_h else -1)
    cols = 0 if box.x_max <= half_w else (1 if box.x_min >= half_w else -1)
    return -1 if -1 in (rows, cols) else 2 * rows + cols


def test_plan_crops_properties_over_many_seeds_and_sizes():
    sizes_rng = np.random.default_rng(2024)
    seen_scales = set()
    n_cropped = 0
    for trial in range(600):
        height, width = (int(v) for v in sizes_rng.integers(40, 2400, size=2))
        n_crops = int(sizes_rng.integers(1, 5))
        boxes = plan_crops(height, width, n_crops, np.random.default_rng(trial))
        short = min(height, width)
        if n_crops == 1 or short < 140:
            assert len(boxes) == 1
            box = boxes[0]
            assert (box.x_min, box.x_max, box.y_min, box.y_max) == (0, width, 0, height)
            assert box.scaling == 1.0 and not box.crop
            assert box.whole_reason == (WHOLE_SINGLE if n_crops == 1 else WHOLE_SMALL)
            continue
        n_cropped += 1
        assert len(boxes) == n_crops
        quadrants = [quadrant_of(b, height, width) for b in boxes]
        assert -1 not in quadrants and len(set(quadrants)) == n_crops
        for box in boxes:
            side = box.x_max - box.x_min
            assert box.crop and side == box.y_max - box.y_min >= 70
            assert 0 <= box.x_min and box.x_max <= width and 0 <= box.y_min and box.y_max <= height
            assert box.scaling in DEFAULT_SCALES and side == math.floor(box.scaling * short)
            seen_scales.add(box.scaling)
    assert n_cropped > 200
    assert seen_scales == set(DEFAULT_SCALES)


def test_plan_crops_uses_every_quadrant_scale_and_position():
    height = width = 2400  # every scale allowed: 1200, 600, 300, 150 px
    quadrants, scales, offsets = set(), set(), set()
    for seed in range(200):
        for box in plan_crops(height, width, 2, np.random.default_rng(seed)):
            quadrants.add(quadrant_of(box, height, width))
            scales.add(box.scaling)
            offsets.add((box.x_min % (width // 2), box.y_min % (height // 2)))
    assert quadrants == {0, 1, 2, 3}
    assert scales == set(DEFAULT_SCALES)
    assert len(offsets) > 300  # positions vary inside the quadrant


def test_plan_crops_at_the_size_limits():
    boxes = plan_crops(140, 300, 4, np.random.default_rng(0))
    assert [b.x_max - b.x_min for b in boxes] == [70] * 4 and {b.scaling for b in boxes} == {0.5}
    assert plan_crops(139, 300, 4, np.random.default_rng(0))[0].whole_reason == WHOLE_SMALL
    # A permissive image-size limit with no scale giving 70 px falls back to the whole image.
    (box,) = plan_crops(120, 120, 3, np.random.default_rng(0), min_image_side=100)
    assert (box.crop, box.whole_reason, box.x_max, box.y_max) == (False, WHOLE_NO_SCALE, 120, 120)


def test_plan_crops_is_deterministic_from_the_generator():
    first = plan_crops(1000, 800, 4, np.random.default_rng(7))
    assert first == plan_crops(1000, 800, 4, np.random.default_rng(7))
    others = [plan_crops(1000, 800, 4, np.random.default_rng(s)) for s in range(8, 14)]
    assert any(o != first for o in others)


def test_plan_crops_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="n_crops"):
        plan_crops(500, 500, 5, rng)
    with pytest.raises(ValueError, match="n_crops"):
        plan_crops(500, 500, 0, rng)
    with pytest.raises(ValueError, match="1x1"):
        plan_crops(0, 500, 2, rng)
    with pytest.raises(ValueError, match="scales"):
        plan_crops(500, 500, 2, rng, scales=(1.5,))


# --- renormalize -----------------------------------------------------------------------


def test_renormalize_matches_np_percentile_reference_on_real_images():
    images = rxrx1_images(4, channels=("w1", "w2", "w3"))
    rng = np.random.default_rng(3)
    for image in images:
        for side in (70, 128, 256, 512):
            y, x = (int(v) for v in rng.integers(0, 512 - side + 1, size=2))
            crop = image[y : y + side, x : x + side]
            out = renormalize(crop)
            assert out.dtype == np.uint8 and out.shape == crop.shape
            np.testing.assert_array_equal(out, reference_renormalize(crop, 0.1, 99.9))
            np.testing.assert_array_equal(renormalize(crop, 2, 98), reference_renormalize(crop, 2, 98))
        assert renormalize(image).max() == 255
    gray = images[0][:100, :100, 0]
    np.testing.assert_array_equal(renormalize(gray), reference_renormalize(gray[:, :, None], 0.1, 99.9)[:, :, 0])


def test_renormalize_uniform_channel_becomes_zeros_and_bad_input_fails():
    crop = np.zeros((80, 80, 2), dtype=np.uint8)
    crop[:, :, 0] = 117
    crop[:, :, 1] = np.arange(80, dtype=np.uint8)[None, :]
    out = renormalize(crop)
    assert not out[:, :, 0].any()
    assert out[:, :, 1].min() == 0 and out[:, :, 1].max() == 255
    with pytest.raises(TypeError):
        renormalize(crop.astype(np.uint16))
    with pytest.raises(ValueError):
        renormalize(crop, 50, 10)


# --- upsample_chunk --------------------------------------------------------------------


@pytest.fixture
def chunk(tmp_path):
    """Six real RxRx1 fields, one small synthetic image and one unselected field."""
    real = rxrx1_images(7)
    images = {f"rxrx1-{i}": image for i, image in enumerate(real[:6])}
    images["synthetic-small"] = np.random.default_rng(0).integers(0, 256, (100, 120, 1), dtype=np.uint8)
    images["rxrx1-unselected"] = real[6]
    labels = ["big", "mid", "few", "tiny", "tiny", "few", "tiny"]
    selection = pd.DataFrame(
        {
            "idx": [k for k in images if k != "rxrx1-unselected"],
            "label": labels,
            "category": ["cell_type"] * len(labels),
        }
    )
    class_sizes = {"big": 1500, "mid": 600, "few": 450, "tiny": 12}
    path = write_standardized(tmp_path / "std.parquet", images)
    return path, images, selection, class_sizes


def test_upsample_chunk_writes_the_planned_crops(chunk, tmp_path):
    path, images, selection, class_sizes = chunk
    out = tmp_path / "crops.parquet"
    report = upsample_chunk(path, selection, class_sizes, out, seed=11)
    assert pq.read_schema(out).equals(CROP_SCHEMA)
    crops = read_table(out)

    # One report row per image of the chunk; the unselected one is counted, not cropped.
    assert sorted(report["idx"]) == sorted(images)
    unselected = report.set_index("idx").loc["rxrx1-unselected"]
    assert not unselected["selected"] and unselected["n_crops_written"] == 0
    assert "rxrx1-unselected" not in set(crops["idx"])

    labels = selection.set_index("idx")["label"]
    for row in report[report["selected"]].itertuples():
        assert row.n_crops_planned == first_matching_rule(class_sizes[labels[row.idx]], DEFAULT_RULES)
        expected_written = 1 if images[row.idx].shape[0] < 140 else row.n_crops_planned
        assert row.n_crops_written == expected_written
    assert len(crops) == report["n_crops_written"].sum()
    assert (
        crops.groupby("idx").size().to_dict()
        == report[report["selected"]].set_index("idx")["n_crops_written"].to_dict()
    )
    assert crops["crop_id"].is_unique

    for row in crops.itertuples():
        source = images[row.idx]
        pixels = decode_pixels(row.pixels, row.height, row.width, row.n_channels)
        assert row.label == labels[row.idx] and row.category == "cell_type"
        window = source[row.y_min : row.y_max, row.x_min : row.x_max]
        if row.crop:
            assert row.crop_id.startswith(f"{row.idx}-c")
            np.testing.assert_array_equal(pixels, reference_renormalize(window, 0.1, 99.9))
        else:
            assert row.crop_id == row.idx and row.scaling == 1.0
            np.testing.assert_array_equal(pixels, source)


def upsample_chunk_path(path, selection, class_sizes, out, seed=11) -> Path:
    upsample_chunk(path, selection, class_sizes, out, seed=seed)
    return out


def test_upsample_chunk_does_not_depend_on_chunking_or_order(chunk, tmp_path):
    path, images, selection, class_sizes = chunk
    whole = read_table(upsample_chunk_path(path, selection, class_sizes, tmp_path / "all.parquet"))
    keys = list(images)[::-1]
    part_a = write_standardized(tmp_path / "a.parquet", {k: images[k] for k in keys[:3]})
    part_b = write_standardized(tmp_path / "b.parquet", {k: images[k] for k in keys[3:]})
    split = pd.concat(
        [
            read_table(upsample_chunk_path(part, selection, class_sizes, tmp_path / f"out-{part.name}"))
            for part in (part_b, part_a)
        ]
    )
    ordered = [frame.sort_values("crop_id").reset_index(drop=True) for frame in (whole, split)]
    pd.testing.assert_frame_equal(*ordered)
    other_seed = read_table(upsample_chunk_path(path, selection, class_sizes, tmp_path / "s.parquet", seed=12))
    assert not other_seed[["x_min", "y_min"]].equals(whole[["x_min", "y_min"]])


def test_upsample_chunk_rejects_bad_inputs(chunk, tmp_path):
    path, images, selection, class_sizes = chunk
    out = tmp_path / "crops.parquet"
    with pytest.raises(ValueError, match="no size for label"):
        upsample_chunk(path, selection, {"big": 1500}, out, seed=0)
    with pytest.raises(ValueError, match="more than once"):
        upsample_chunk(path, pd.concat([selection, selection.head(1)]), class_sizes, out, seed=0)
    with pytest.raises(ValueError, match="missing column"):
        upsample_chunk(path, selection.drop(columns="category"), class_sizes, out, seed=0)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"idx": ["a"], "pixels": [b"\x00"]}), bad)
    with pytest.raises(ValueError, match=r"bad\.parquet.*height"):
        upsample_chunk(bad, selection, class_sizes, out, seed=0)
    duplicated = tmp_path / "dup.parquet"
    first = next(iter(images))
    write_standardized(duplicated, {first: images[first]})
    table = pq.read_table(duplicated)
    pq.write_table(pa.concat_tables([table, table]), duplicated)
    with pytest.raises(ValueError, match="appears twice"):
        upsample_chunk(duplicated, selection, class_sizes, out, seed=0)
    assert not out.exists()  # a failed run leaves no partial output
