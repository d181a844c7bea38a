"""Outlier tiles among the curated crops, in an autoencoder's latent space (seed 004).

The trained autoencoder (``pretext.autoencoder``) encodes every crop of the shards, resized
whole to the training size and averaged to the run's input channels; ``evaluate.outlier_scores``
ranks them by mean distance to their k nearest neighbours and flags DBSCAN noise. When the
run's sources carry a ground truth of injected defects (the synthetic demo), crops whose parent
image had annotation text burned in are marked, so a user can see where they rank.
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

from cytopretrain.evaluate import outlier_scores
from cytopretrain.models import build_backbone
from cytopretrain.pretext import build_method
from cytopretrain.shards import iter_shard, load_index
from cytopretrain.tables import decode_pixels


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


def crop_latents(method, card: dict, shards_dir: str | os.PathLike, *, batch_size: int = 64) -> pd.DataFrame:
    """Latent codes of every crop in the shards: Metadata_crop_id, Metadata_idx, Metadata_label, z_*."""
    size, in_channels = card["image_size"], card["in_channels"]
    ids, latents, batch = [], [], []

    def flush() -> None:
        with torch.inference_mode():
            latents.append(method.encode_latent(torch.from_numpy(np.stack(batch))).float().numpy())
        batch.clear()

    for sample in _samples(Path(shards_dir)):
        ids.append((sample["crop_id"], sample["idx"], sample["label"]))
        batch.append(_tile(sample, size, in_channels))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    values = np.concatenate(latents) if latents else np.zeros((0, 0), np.float32)
    frame = pd.DataFrame(ids, columns=["Metadata_crop_id", "Metadata_idx", "Metadata_label"])
    features = pd.DataFrame(values, columns=[f"z_{k}" for k in range(values.shape[1])])
    return pd.concat([frame, features], axis=1)


def defect_images(metadata: pd.DataFrame, ground_truth: pd.DataFrame, defect: str = "text") -> set[str]:
    """Ids of images with a channel file listed in the ground truth with ``defect``.

    Ground-truth paths are relative to their layout's root; a canonical channel path ends with
    one of them after a path separator.
    """
    wanted = {os.sep + str(path) for path in ground_truth.loc[ground_truth["defect"] == defect, "path"]}
    hits = set()
    for idx, paths in zip(metadata["idx"], metadata["channel_paths"]):
        if any(str(path).endswith(suffix) for path in paths for suffix in wanted):
            hits.add(idx)
    return hits


def score_crops(latents: pd.DataFrame, *, k: int, min_samples: int, marked: set[str]) -> pd.DataFrame:
    """Outlier scores per crop, ranked, with ``injected_text`` marking the crops of ``marked`` images."""
    scores = outlier_scores(latents, k=k, min_samples=min_samples)
    table = scores[["Metadata_crop_id", "Metadata_idx", "Metadata_label", "score", "rank", "dbscan_label", "is_outlier"]]
    table = table.rename(columns=lambda c: c.removeprefix("Metadata_"))
    table["injected_text"] = table["idx"].isin(marked)
    return table.sort_values("rank", ignore_index=True)
