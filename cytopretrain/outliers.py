"""Outlier tiles among the curated crops, with the QC autoencoder of seed 004.

The trained autoencoder (``pretext.autoencoder``) sees every crop of the shards, resized whole
to its training size and averaged to the run's input channels. Each crop gets two scores: how
badly the autoencoder reconstructs it (relative squared error; the ranking) and the seed's
mean distance to its k nearest neighbours in the z-scored latent space, with DBSCAN noise
flagged there (``evaluate.outlier_scores``). The ranking uses the reconstruction error because
on the demo it puts the crops showing burned-in annotation text near the top, where the
latent distance leaves most of them among ordinary crops (README, "Outlier QC", has the
ranks). When the run's sources carry a ground truth of injected defects (the synthetic demo),
crops whose window overlaps the lettering are marked, so a user can see where they rank.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from PIL import Image

from cytopretrain.evaluate import descending_rank, outlier_scores
from cytopretrain.models import build_backbone
from cytopretrain.pretext import build_method
from cytopretrain.shards import iter_shard, load_index
from cytopretrain.tables import decode_pixels


OUTLIER_TABLE_COLUMNS = (
    "crop_id", "idx", "label", "x_min", "x_max", "y_min", "y_max", "score", "rank", "latent_distance",
    "latent_rank", "dbscan_label", "is_outlier", "injected_text",
)


def load_autoencoder(method_path: str | os.PathLike, card_path: str | os.PathLike):
    """The trained autoencoder of a run, from its method state dict and model card."""
    card = json.loads(Path(card_path).read_text())
    if card["method"] != "autoencoder":
        raise ValueError(f"{card_path}: run is a {card['method']!r} run, not an autoencoder")
    settings = card["settings"]
    backbone = build_backbone(card["backbone"], in_channels=card["in_channels"])
    options = dict(settings.get("method_options", {}))
    options.setdefault("image_size", card["image_size"])
    method = build_method("autoencoder", backbone, **options)
    method.load_state_dict(torch.load(method_path, map_location="cpu", weights_only=True))
    return method.eval(), card


def _tile(sample: dict, size: int, in_channels: int) -> np.ndarray:
    """A crop resized whole to (in_channels, size, size) float32 in [0, 1]."""
    image = decode_pixels(sample["pixels"], sample["height"], sample["width"], sample["n_channels"])
    planes = [
        np.asarray(Image.fromarray(image[:, :, c]).resize((size, size), Image.BILINEAR), np.float32) / 255
        for c in range(image.shape[2])
    ]
    stack = np.stack(planes)
    if stack.shape[0] != in_channels:
        stack = stack.mean(axis=0, keepdims=True).repeat(in_channels, axis=0)
    return stack


def _samples(shards_dir: Path) -> Iterator[dict]:
    for shard in load_index(shards_dir)["shard"]:
        yield from iter_shard(shards_dir / shard)


def encode_crops(method, card: dict, shards_dir: str | os.PathLike, *, batch_size: int = 64) -> pd.DataFrame:
    """Every crop of the shards through the autoencoder: Metadata_ crop_id, idx, label and window
    (x_min, x_max, y_min, y_max in the source image), Metadata_reconstruction_error, then the
    latent code z_*.

    reconstruction_error is relative: the squared error of the reconstruction summed over the
    tile, divided by the tile's own sum of squares (floored at 1e-12, so an all-black tile
    scores highest), both on the (in_channels, size, size) tile the autoencoder sees. Relative,
    because a dim tile's error is small in absolute terms even when the autoencoder cannot
    reproduce it at all.
    """
    size, in_channels = card["image_size"], card["in_channels"]
    ids, latents, errors, batch = [], [], [], []
    window = ("x_min", "x_max", "y_min", "y_max")

    def flush() -> None:
        tiles = torch.from_numpy(np.stack(batch))
        with torch.inference_mode():
            latent = method.encode_latent(tiles)
            reconstruction = torch.sigmoid(method.decode_logits(latent, tuple(tiles.shape[2:])))
        squared_error = (reconstruction.float() - tiles).square().sum(dim=(1, 2, 3))
        energy = tiles.square().sum(dim=(1, 2, 3)).clamp_min(1e-12)
        latents.append(latent.float().numpy())
        errors.append((squared_error / energy).numpy())
        batch.clear()

    for sample in _samples(Path(shards_dir)):
        ids.append((sample["crop_id"], sample["idx"], sample["label"], *(sample[name] for name in window)))
        batch.append(_tile(sample, size, in_channels))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    values = np.concatenate(latents) if latents else np.zeros((0, 0), np.float32)
    frame = pd.DataFrame(ids, columns=[f"Metadata_{name}" for name in ("crop_id", "idx", "label", *window)])
    frame["Metadata_reconstruction_error"] = np.concatenate(errors) if errors else np.zeros(0)
    features = pd.DataFrame(values, columns=[f"z_{k}" for k in range(values.shape[1])])
    return pd.concat([frame, features], axis=1)


def text_boxes(metadata: pd.DataFrame, ground_truth: pd.DataFrame) -> dict[str, tuple[int, int, int, int]]:
    """Lettering box (x_min, y_min, x_max, y_max) of each image with a ground-truth text file.

    Ground-truth paths are relative to their layout's root; a canonical channel path ends with
    one of them after a path separator.
    """
    text = ground_truth[ground_truth["defect"] == "text"]
    boxes = {
        os.sep + str(row.path): (int(row.x_min), int(row.y_min), int(row.x_max), int(row.y_max))
        for row in text.itertuples()
    }
    found = {}
    for idx, paths in zip(metadata["idx"], metadata["channel_paths"]):
        for path in paths:
            box = next((box for suffix, box in boxes.items() if str(path).endswith(suffix)), None)
            if box is not None:
                found[idx] = box
                break
    return found


def shows_text(crops: pd.DataFrame, boxes: dict[str, tuple[int, int, int, int]]) -> pd.Series:
    """Whether each crop's window (columns idx, x_min, x_max, y_min, y_max) overlaps its image's
    lettering box."""
    box = np.array([boxes.get(idx, (0, 0, 0, 0)) for idx in crops["idx"]]).reshape(-1, 4)
    return pd.Series(
        (crops["x_min"].to_numpy() < box[:, 2]) & (box[:, 0] < crops["x_max"].to_numpy())
        & (crops["y_min"].to_numpy() < box[:, 3]) & (box[:, 1] < crops["y_max"].to_numpy()),
        index=crops.index,
    )


def score_crops(encoded: pd.DataFrame, *, k: int, min_samples: int,
                boxes: dict[str, tuple[int, int, int, int]]) -> pd.DataFrame:
    """Outlier scores per crop (``encode_crops`` output), ranked by reconstruction error.

    score / rank: relative reconstruction error, rank 1 the largest; latent_distance /
    latent_rank: seed 004's mean distance to the k nearest crops in the z-scored latent space;
    dbscan_label / is_outlier: DBSCAN noise there (``evaluate.outlier_scores``);
    injected_text: the crop's window overlaps its image's lettering box in ``boxes``.
    """
    latent = outlier_scores(encoded.drop(columns="Metadata_reconstruction_error"), k=k, min_samples=min_samples)
    table = latent.rename(columns=lambda c: c.removeprefix("Metadata_"))
    table = table.rename(columns={"score": "latent_distance", "rank": "latent_rank"})
    table["score"] = encoded["Metadata_reconstruction_error"].to_numpy()
    table["rank"] = descending_rank(table["score"].to_numpy())
    table["injected_text"] = shows_text(table, boxes)
    return table[list(OUTLIER_TABLE_COLUMNS)].sort_values("rank", ignore_index=True)

