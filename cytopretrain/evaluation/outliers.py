"""Outlier tiles among the curated crops, with the QC autoencoder of seed 004.

The trained autoencoder (``pretext.autoencoder``) sees every crop of the shards, resized whole
to its training size and averaged to the run's input channels. Each crop gets two scores: how
badly the autoencoder reconstructs it (relative squared error; the ranking) and the seed's
mean distance to its k nearest neighbours in the z-scored latent space, with DBSCAN noise
flagged there (outlier_scores). The ranking uses the reconstruction error because
on the demo it puts the crops showing burned-in annotation text near the top, where the
latent distance leaves most of them among ordinary crops (README, "Outlier QC", has the
ranks). When the run's sources carry a ground truth of injected defects (the synthetic demo),
crops whose window overlaps the lettering are marked, so a user can see where they rank.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from cytopretrain.core.errors import EvaluationError
from cytopretrain.core.numerics import zscore
from cytopretrain.core.tables import decode_pixels
from cytopretrain.curation.shards import iter_shard, load_index
from cytopretrain.evaluation.knn import knn
from cytopretrain.evaluation.profile_tables import metadata_columns
from cytopretrain.evaluation.protocols.common import as_matrix
from cytopretrain.learning.train import load_trained_method

OUTLIER_TABLE_COLUMNS = (
    "crop_id",
    "idx",
    "label",
    "x_min",
    "x_max",
    "y_min",
    "y_max",
    "score",
    "rank",
    "latent_distance",
    "latent_rank",
    "dbscan_label",
    "is_outlier",
    "injected_text",
)


def load_autoencoder(method_path: str | os.PathLike, card_path: str | os.PathLike):
    """The trained autoencoder of a run, from its method state dict and model card."""
    card = json.loads(Path(card_path).read_text())
    if card["method"] != "autoencoder":
        raise ValueError(f"{card_path}: run is a {card['method']!r} run, not an autoencoder")
    return load_trained_method(method_path, card_path)


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
        (crops["x_min"].to_numpy() < box[:, 2])
        & (box[:, 0] < crops["x_max"].to_numpy())
        & (crops["y_min"].to_numpy() < box[:, 3])
        & (box[:, 1] < crops["y_max"].to_numpy()),
        index=crops.index,
    )


def score_crops(
    encoded: pd.DataFrame,
    *,
    k: int = 5,
    min_samples: int = 5,
    boxes: dict[str, tuple[int, int, int, int]] | None = None,
) -> pd.DataFrame:
    """Outlier scores per crop (``encode_crops`` output), ranked by reconstruction error.

    score / rank: relative reconstruction error, rank 1 the largest; latent_distance /
    latent_rank: seed 004's mean distance to the k nearest crops in the z-scored latent space;
    dbscan_label / is_outlier: DBSCAN noise there (outlier_scores);
    injected_text: the crop's window overlaps its image's lettering box in ``boxes``.
    """
    latent = outlier_scores(encoded.drop(columns="Metadata_reconstruction_error"), k=k, min_samples=min_samples)
    table = latent.rename(columns=lambda c: c.removeprefix("Metadata_"))
    table = table.rename(columns={"score": "latent_distance", "rank": "latent_rank"})
    table["score"] = encoded["Metadata_reconstruction_error"].to_numpy()
    table["rank"] = descending_rank(table["score"].to_numpy())
    table["injected_text"] = shows_text(table, boxes or {})
    return table[list(OUTLIER_TABLE_COLUMNS)].sort_values("rank", ignore_index=True)


def outlier_scores(
    latents: pd.DataFrame | np.ndarray, *, k: int = 5, eps: float | None = None, min_samples: int = 5
) -> pd.DataFrame:
    """Seed 004: kNN-distance outlier score and DBSCAN noise on standardized latents.

    Latents (a profile table's features, or an array) are z-scored (StandardScaler fit on all
    rows). score = mean Euclidean distance to the k nearest other rows; rank 1 = highest score
    (ties to the earlier row). DBSCAN(eps, min_samples, Euclidean) labels clusters 0, 1, ...
    and noise -1; is_outlier = noise. eps=None: knee of the sorted k-distance curve, with the
    distance of each row to its (min_samples - 1)-th nearest other row (DBSCAN counts the row
    itself among min_samples): after scaling both axes of the ascending curve to [0, 1], the
    knee is the point farthest below the chord from its first to its last point, and eps is
    its distance (at least 1e-12). Returns one row per input row (metadata columns kept) with
    score, rank, dbscan_label, is_outlier; ``attrs`` holds eps, eps_source, k, min_samples.
    """
    from sklearn.cluster import DBSCAN

    values = as_matrix(latents, "outlier_scores")
    n = values.shape[0]
    if n <= max(k, min_samples - 1):
        raise EvaluationError(f"outlier_scores: {n} rows, need more than k={k} and min_samples-1={min_samples - 1}")
    z = zscore(values)
    distances, _ = knn(z, None, max(k, min_samples - 1), exclude_self=True)
    score = distances[:, :k].mean(axis=1)
    eps_source = "given"
    if eps is None:
        # With min_samples = 1 every row is a core point and eps does not matter.
        eps = _knee(distances[:, min_samples - 2]) if min_samples > 1 else 1e-12
        eps_source = "knee"
    if eps <= 0:
        raise EvaluationError(f"outlier_scores: eps must be positive, got {eps}")
    dbscan_labels = DBSCAN(eps=eps, min_samples=min_samples).fit_predict(z.astype(np.float64))
    rank = descending_rank(score)
    out = (
        latents[metadata_columns(latents)].reset_index(drop=True)
        if isinstance(latents, pd.DataFrame)
        else pd.DataFrame(index=range(n))
    )
    out = out.assign(score=score, rank=rank, dbscan_label=dbscan_labels, is_outlier=dbscan_labels == -1)
    out.attrs.update({"eps": float(eps), "eps_source": eps_source, "k": k, "min_samples": min_samples})
    return out


def descending_rank(values: np.ndarray) -> np.ndarray:
    """Rank 1 for the largest value, ties to the earlier row."""
    rank = np.empty(values.size, dtype=np.int64)
    rank[np.lexsort((np.arange(values.size), -values))] = np.arange(1, values.size + 1)
    return rank


def _knee(k_distances: np.ndarray) -> float:
    curve = np.sort(k_distances)
    span = curve[-1] - curve[0]
    if span <= 0:
        return max(float(curve[-1]), 1e-12)
    x = np.linspace(0.0, 1.0, curve.size)
    y = (curve - curve[0]) / span
    return max(float(curve[int(np.argmax(x - y))]), 1e-12)
