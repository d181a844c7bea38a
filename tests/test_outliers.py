"""Outlier QC (cytopretrain.evaluation.outliers): text ground truth per crop window, and the autoencoder's
scores of real BBBC021 cell crops written as shards."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from cell_images import BBBC_CELLS, to_uint8
from PIL import Image

from cytopretrain.core.schema import conform
from cytopretrain.core.tables import ParquetStreamWriter, encode_pixels
from cytopretrain.curation import shards
from cytopretrain.curation.crops import CROP_SCHEMA
from cytopretrain.evaluation.outliers import encode_crops, score_crops, shows_text, text_boxes
from cytopretrain.learning.models import build_backbone
from cytopretrain.learning.pretext import build_method

torch.set_num_threads(2)


def test_text_boxes_follow_the_ground_truth_paths():
    metadata = pd.DataFrame(
        {
            "idx": ["a-1", "a-2", "b-7"],
            "channel_paths": [
                ["/data/a/plate1/x_w1.tif", "/data/a/plate1/x_w2.tif"],
                ["/data/a/plate1/y_w1.tif"],
                ["/data/b/images/x_w1.tif"],
            ],
        }
    )
    truth = pd.DataFrame(
        {
            "layout": ["a", "a", "b"],
            "path": ["plate1/x_w2.tif", "plate1/y_w1.tif", "images/x_w1.tif"],
            "defect": ["text", "blank", "text"],
            "x_min": [10, None, 0],
            "y_min": [20, None, 5],
            "x_max": [60, None, 30],
            "y_max": [45, None, 9],
        }
    )
    assert text_boxes(metadata, truth) == {"a-1": (10, 20, 60, 45), "b-7": (0, 5, 30, 9)}


def test_a_crop_shows_text_when_its_window_overlaps_the_box():
    boxes = {"a-1": (10, 20, 60, 45)}  # x_min, y_min, x_max, y_max, half-open
    crops = pd.DataFrame(
        [
            ("a-1", 0, 64, 0, 64, True),  # holds the box
            ("a-1", 59, 100, 44, 90, True),  # shares the box's last pixel
            ("a-1", 60, 100, 0, 64, False),  # starts where the box ends (half-open)
            ("a-1", 0, 64, 45, 100, False),  # below it
            ("a-1", 0, 10, 0, 64, False),  # ends where it starts
            ("a-2", 0, 64, 0, 64, False),  # another image
        ],
        columns=["idx", "x_min", "x_max", "y_min", "y_max", "expected"],
    )
    assert shows_text(crops, boxes).tolist() == crops["expected"].tolist()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    if not BBBC_CELLS.is_dir():
        pytest.skip(f"real test data not found: {BBBC_CELLS}")
    folder = tmp_path_factory.mktemp("outlier-shards")
    cells = pd.read_csv(BBBC_CELLS / "cells.csv").sort_values("file").head(24)
    rows = []
    for number, row in enumerate(cells.itertuples()):
        array = np.load(BBBC_CELLS / row.file)
        pixels = to_uint8([array[..., c] for c in range(3)])
        if number == 5:
            pixels[:] = 0  # an all-black crop: nothing to rebuild relative to
        h, w = pixels.shape[:2]
        rows.append(
            {
                "crop_id": f"cell-{number}-c0",
                "idx": f"cell-{number}",
                "label": row.moa.lower(),
                "category": "phenotype",
                "crop": False,
                "scaling": 1.0,
                "x_min": 0,
                "x_max": w,
                "y_min": 0,
                "y_max": h,
                **encode_pixels(pixels),
            }
        )
    with ParquetStreamWriter(folder / "crops.parquet", CROP_SCHEMA, rows_per_group=8) as writer:
        for row in rows:
            writer.write(row)
    labels = sorted({row["label"] for row in rows})
    metadata = conform(
        pd.DataFrame(
            {"idx": [r["idx"] for r in rows], "microscopy": "fluorescence", "channel_paths": [["x"]] * len(rows)}
        ),
        "test metadata",
    )
    shards.write_shards(
        [folder / "crops.parquet"],
        pd.DataFrame({"label": labels, "category": "phenotype"}),
        metadata,
        folder / "shards",
        samples_per_shard=10,
        validation_fraction=0.0,
        seed=1,
    )
    return folder / "shards", {row["crop_id"]: row for row in rows}


def test_reconstruction_error_is_relative_to_the_crop(shard_dir):
    directory, rows = shard_dir
    torch.manual_seed(0)
    method = build_method("autoencoder", build_backbone("resnet18", in_channels=1), latent_dim=8, image_size=32).eval()
    card = {"image_size": 32, "in_channels": 1}
    encoded = encode_crops(method, card, directory, batch_size=7)
    assert sorted(encoded["Metadata_crop_id"]) == sorted(rows)
    assert [c for c in encoded.columns if c.startswith("z_")] == [f"z_{k}" for k in range(8)]
    for crop_id in ("cell-0-c0", "cell-11-c0"):
        row = rows[crop_id]
        pixels = np.frombuffer(row["pixels"], np.uint8).reshape(row["height"], row["width"], row["n_channels"])
        planes = [
            np.asarray(Image.fromarray(pixels[..., c]).resize((32, 32), Image.BILINEAR), np.float64) / 255
            for c in range(3)
        ]
        tile = np.mean(planes, axis=0)
        with torch.inference_mode():
            rebuilt = method(torch.from_numpy(tile[None, None]).float()).double().numpy()[0, 0]
        expected = ((rebuilt - tile) ** 2).sum() / (tile**2).sum()
        found = encoded.loc[encoded["Metadata_crop_id"] == crop_id, "Metadata_reconstruction_error"].item()
        assert found == pytest.approx(expected, rel=1e-4)
    scores = score_crops(encoded, k=3, min_samples=3, boxes={"cell-5": (0, 0, 5, 5), "cell-9": (0, 0, 5, 5)})
    # The black crop cannot be rebuilt relative to its (zero) brightness: rank 1.
    assert scores.loc[0, "crop_id"] == "cell-5-c0" and scores.loc[0, "rank"] == 1
    assert scores["rank"].tolist() == list(range(1, len(rows) + 1))
    assert scores["score"].is_monotonic_decreasing
    assert sorted(scores["latent_rank"]) == list(range(1, len(rows) + 1))
    assert set(scores.loc[scores["injected_text"], "crop_id"]) == {"cell-5-c0", "cell-9-c0"}
