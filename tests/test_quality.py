"""Tests of cytopretrain.curation.quality: the post-upsampling filters, chunk QC and label dropping."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cell_images import DATA
from PIL import Image

from cytopretrain.core.tables import ParquetStreamWriter, decode_pixels, encode_pixels, read_table
from cytopretrain.curation.crops import CROP_SCHEMA, plan_crops, renormalize
from cytopretrain.curation.quality import (
    DECISION_COLUMNS,
    SMALL_LABEL_REASON,
    QCThresholds,
    check_image,
    drop_small_labels,
    inspect_image,
    qc_chunk,
)

RXRX1 = DATA / "rxrx1"
SHAPE = (100, 100)


def rxrx1_files() -> list[Path]:
    if not RXRX1.is_dir():
        pytest.skip(f"real data folder {RXRX1} is absent")
    files = sorted(RXRX1.glob("**/*.png"))
    assert files, f"no PNG under {RXRX1}"
    return files


def image_from_fractions(fractions: dict[int, float], seed: int = 0) -> np.ndarray:
    """A shuffled 100×100 image holding each value on the given fraction of its pixels."""
    n = SHAPE[0] * SHAPE[1]
    counts = {v: int(round(f * n)) for v, f in fractions.items()}
    values = np.concatenate([np.full(c, v, dtype=np.uint8) for v, c in counts.items()])
    assert values.size == n
    return np.random.default_rng(seed).permutation(values).reshape(SHAPE)


def constructed_images() -> dict[str, np.ndarray]:
    """One image per filter, each built to have exactly that filter's defect."""
    rng = np.random.default_rng(1)
    sparse = rng.integers(1, 256, SHAPE).astype(np.uint8)
    sparse[rng.random(SHAPE) < 0.8] = 0
    return {
        "uniform": np.full(SHAPE, 37, dtype=np.uint8),
        "binary": image_from_fractions({0: 0.5, 255: 0.5}),
        "dim": sparse,
        "too_dark": image_from_fractions({0: 0.2, 1: 0.75, 2: 0.05}),
        "too_bright": image_from_fractions({253: 0.1, 254: 0.1, 255: 0.8}),
    }


# --- check_image -----------------------------------------------------------------------


def test_each_filter_is_triggered_by_its_constructed_image():
    images = constructed_images()
    # Check the constructions independently of the module, with numpy statistics.
    assert np.percentile(images["uniform"], 0.1) == np.percentile(images["uniform"], 99.9)
    assert len(np.unique(images["binary"])) == 2
    assert np.percentile(images["dim"], 75) == 0 and len(np.unique(images["dim"])) > 2
    assert images["too_dark"].mean() <= 1 and np.percentile(images["too_dark"], 75) > 0
    assert images["too_bright"].mean() >= 254 and len(np.unique(images["too_bright"])) == 3
    for reason, image in images.items():
        assert check_image(image) == reason
        assert check_image(image[:, :, None]) == reason  # (H, W, 1) alike
    fine = np.random.default_rng(2).integers(0, 256, SHAPE).astype(np.uint8)
    assert check_image(fine) == ""


def test_checks_run_in_the_documented_order():
    # Constant 0: uniform, binary, dim and too_dark all hold; uniform is recorded.
    assert check_image(np.zeros(SHAPE, dtype=np.uint8)) == "uniform"
    # Two values 0/1: binary, dim and too dark; binary comes first.
    assert check_image(image_from_fractions({0: 0.8, 1: 0.2})) == "binary"
    # Fewer than 0.1 % of pixels differ: the percentiles still coincide → uniform.
    nearly = np.full(SHAPE, 200, dtype=np.uint8)
    nearly.flat[:5] = [0, 10, 20, 30, 40]
    assert check_image(nearly) == "uniform"
    reason, detail = inspect_image(image_from_fractions({0: 0.2, 1: 0.75, 2: 0.05}))
    assert reason == "too_dark" and "0.850" in detail


def test_thresholds_are_parameters():
    images = constructed_images()
    assert check_image(images["too_dark"], QCThresholds(dark_mean=0.5)) == ""
    assert check_image(images["too_bright"], {"bright_mean": 255}) == ""
    assert check_image(images["binary"], {"binary_max_values": 1}) == ""
    assert check_image(images["dim"], {"dim_percentile": 85}) == ""
    config_section = {"low_percentile": 0.1, "high_percentile": 99.9, "min_images_per_label": 500}
    assert check_image(images["uniform"], config_section) == "uniform"
    with pytest.raises(ValueError, match="dark_max"):
        check_image(images["uniform"], {"dark_max": 3})
    with pytest.raises(TypeError):
        check_image(images["uniform"].astype(np.float32))
    assert check_image(np.zeros((0, 5), dtype=np.uint8)) == "empty"


def test_real_microscopy_passes():
    """Raw RxRx1 fields and crops pass; renormalized crops fail only when their raw
    75th percentile is already at the 0.1th (background-only crop, then clipped to 0)."""
    n_checked = 0
    for i, path in enumerate(rxrx1_files()):
        field = np.asarray(Image.open(path))
        assert check_image(field) == "", path
        for box in plan_crops(*field.shape, 4, np.random.default_rng(i)):
            raw = field[box.y_min : box.y_max, box.x_min : box.x_max]
            assert check_image(raw) == "", (path, box)
            p_low, p_dim = np.percentile(raw, [0.1, 75])
            assert check_image(renormalize(raw)) == ("dim" if p_dim <= p_low else ""), (path, box)
            n_checked += 1
    assert n_checked >= 700


# --- qc_chunk --------------------------------------------------------------------------


def crop_row(crop_id: str, label: str, image: np.ndarray) -> dict:
    idx = crop_id.split("-c")[0]
    return {
        "crop_id": crop_id,
        "idx": idx,
        "label": label,
        "category": "compound",
        "crop": crop_id != idx,
        "scaling": 0.25 if crop_id != idx else 1.0,
        "x_min": 0,
        "x_max": image.shape[1],
        "y_min": 0,
        "y_max": image.shape[0],
        **encode_pixels(image),
    }


@pytest.fixture
def crops_file(tmp_path):
    """Real RxRx1 crops (label "real") plus one constructed defect per filter (label "bad")
    and one row whose bytes do not match its shape."""
    rows, expected = [], {}
    for i, path in enumerate(rxrx1_files()[:10]):
        field = np.asarray(Image.open(path))
        for k, box in enumerate(plan_crops(*field.shape, 2, np.random.default_rng(i))):
            crop = renormalize(field[box.y_min : box.y_max, box.x_min : box.x_max])
            rows.append(crop_row(f"real{i}-c{k}", "real", crop))
            p_low, p_dim = np.percentile(crop, [0.1, 75])
            expected[rows[-1]["crop_id"]] = "dim" if p_dim <= p_low else ""
    for reason, image in constructed_images().items():
        rows.append(crop_row(f"bad-{reason}", "bad", image))
        expected[f"bad-{reason}"] = reason
    broken = crop_row("broken", "bad", np.ones((80, 80), dtype=np.uint8))
    broken["pixels"] = broken["pixels"][:-1]
    rows.append(broken)
    expected["broken"] = "unreadable"
    path = tmp_path / "crops.parquet"
    with ParquetStreamWriter(path, CROP_SCHEMA, rows_per_group=7) as writer:
        for row in rows:
            writer.write(row)
    return path, rows, expected


def test_qc_chunk_counts_reconcile_and_kept_pixels_are_unchanged(crops_file, tmp_path):
    path, rows, expected = crops_file
    out = tmp_path / "kept.parquet"
    decisions = qc_chunk(path, out, thresholds={"min_images_per_label": 500})
    assert list(decisions.columns) == DECISION_COLUMNS
    assert len(decisions) == len(rows)
    assert set(decisions["stage"]) == {"quality_control"}
    by_id = decisions.set_index("crop_id")
    assert by_id["reason"].to_dict() == expected
    quarantined = by_id["status"] == "quarantined"
    assert (quarantined == (by_id["reason"] != "")).all()
    assert by_id.loc["broken", "detail"].startswith("crop broken:")

    assert pq.read_schema(out).equals(pq.read_schema(path))
    kept = read_table(out)
    assert len(kept) == (~quarantined).sum() == len(rows) - quarantined.sum()
    assert sorted(kept["crop_id"]) == sorted(by_id.index[~quarantined])
    source = {row["crop_id"]: row for row in rows}
    for row in kept.itertuples():
        original = source[row.crop_id]
        np.testing.assert_array_equal(
            decode_pixels(row.pixels, row.height, row.width, row.n_channels),
            decode_pixels(original["pixels"], original["height"], original["width"], original["n_channels"]),
        )
        assert (row.idx, row.label, row.scaling) == (original["idx"], original["label"], original["scaling"])


def test_qc_chunk_rejects_a_table_without_pixels(tmp_path):
    bad = tmp_path / "nopix.parquet"
    pq.write_table(pa.table({"crop_id": ["a"], "idx": ["a"], "label": ["x"], "category": ["compound"]}), bad)
    with pytest.raises(ValueError, match=r"nopix\.parquet.*pixels"):
        qc_chunk(bad, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


# --- drop_small_labels -----------------------------------------------------------------


def random_decisions(seed: int, min_images: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    # Sizes chosen around the limit: exactly at it, one under, far above, all quarantined.
    plan = {"at": (min_images, 0), "under": (min_images - 1, 3), "above": (3 * min_images, 40), "gone": (0, 9)}
    for label, (n_kept, n_bad) in plan.items():
        statuses = ["kept"] * n_kept + ["quarantined"] * n_bad
        for i, status in enumerate(rng.permutation(statuses)):
            rows.append(
                {
                    "crop_id": f"{label}{i}",
                    "idx": f"{label}{i}",
                    "label": label,
                    "category": "gene",
                    "stage": "quality_control",
                    "status": status,
                    "reason": "" if status == "kept" else "dim",
                    "detail": "",
                }
            )
    return pd.DataFrame(rows)


def test_drop_small_labels_counts():
    min_images = 500
    decisions = random_decisions(5, min_images)
    kept, dropped = drop_small_labels(decisions, min_images=min_images)
    counted = Counter(decisions.loc[decisions["status"] == "kept", "label"])
    expected_kept = {label for label in decisions["label"].unique() if counted[label] >= min_images}
    assert set(kept["label"]) == expected_kept == {"at", "above"}
    assert set(dropped["label"]) == set(decisions["label"]) - expected_kept
    for table in (kept, dropped):
        assert table.set_index("label")["n_kept"].to_dict() == {label: counted[label] for label in table["label"]}
        assert set(table["category"]) == {"gene"}
    assert set(dropped["reason"]) == {SMALL_LABEL_REASON}
    # A list of per-chunk tables gives the same answer as their concatenation.
    chunks = [decisions.iloc[i::3] for i in range(3)]
    for got, want in zip(drop_small_labels(chunks, min_images=min_images), (kept, dropped)):
        pd.testing.assert_frame_equal(got, want)


def test_drop_small_labels_rejects_ambiguous_or_incomplete_tables():
    decisions = random_decisions(6, 5)
    decisions.loc[0, "category"] = "compound"
    with pytest.raises(ValueError, match="several categories"):
        drop_small_labels(decisions, min_images=5)
    with pytest.raises(ValueError, match="status"):
        drop_small_labels(decisions.drop(columns="status"), min_images=5)
