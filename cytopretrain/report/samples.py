"""Crops for the report's montages and outlier tiles, streamed from the shards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from cytopretrain.core.errors import ReportInputError
from cytopretrain.core.tables import decode_pixels
from cytopretrain.curation.shards import iter_shard

SAMPLE_COLUMNS = ["crop_id", "label", "pixels", "height", "width", "n_channels"]


def _wanted_samples(path: Path, wanted: Callable[[str, str], bool]) -> Iterator[dict]:
    """Samples of one shard whose (crop_id, label) is wanted. Parquet shards are filtered on
    their id columns first, so pixels are decoded only for the rows asked for."""
    if path.suffix != ".parquet":
        yield from (s for s in iter_shard(path) if wanted(s["crop_id"], s["label"]))
        return
    with pq.ParquetFile(path) as handle:
        for group in range(handle.num_row_groups):
            keys = handle.read_row_group(group, columns=["crop_id", "label"])
            rows = [
                i
                for i, (crop_id, label) in enumerate(zip(keys["crop_id"].to_pylist(), keys["label"].to_pylist()))
                if wanted(crop_id, label)
            ]
            if rows:
                yield from handle.read_row_group(group, columns=SAMPLE_COLUMNS).take(rows).to_pylist()


def collect_samples(
    index_path: Path, index: pd.DataFrame, quotas: dict[str, int], crop_ids: set[str]
) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Up to ``quotas[label]`` samples per label and the samples of ``crop_ids``, in one pass
    over the shards that stops as soon as both are complete."""
    by_label: dict[str, list[dict]] = {label: [] for label in quotas}
    by_id: dict[str, dict] = {}

    def wanted(crop_id: str, label: str) -> bool:
        missing_id = crop_id in crop_ids and crop_id not in by_id
        return missing_id or len(by_label.get(label, ())) < quotas.get(label, 0)

    def complete() -> bool:
        return len(by_id) == len(crop_ids) and all(len(by_label[k]) >= n for k, n in quotas.items())

    for shard in index["shard"]:
        if complete():
            break
        path = index_path.parent / shard
        if not path.exists():
            raise ReportInputError(f"{index_path}: shard {shard!r} not found at {path}")
        for sample in _wanted_samples(path, wanted):
            if sample["crop_id"] in crop_ids:
                by_id[sample["crop_id"]] = sample
            if len(by_label.get(sample["label"], ())) < quotas.get(sample["label"], 0):
                by_label[sample["label"]].append(sample)
    return by_label, by_id


def display_image(sample: dict) -> np.ndarray:
    """uint8 image to show: (H, W) grey for one channel, (H, W, 3) RGB for three, the
    channel mean (grey) otherwise."""
    image = decode_pixels(sample["pixels"], sample["height"], sample["width"], sample["n_channels"])
    if image.shape[2] == 1:
        return image[:, :, 0]
    if image.shape[2] == 3:
        return image
    return np.round(image.mean(axis=2)).astype(np.uint8)


def fit_tile(image: np.ndarray, side: int) -> np.ndarray:
    """(h, w, 3) uint8 RGB of ``image`` scaled to fit a side x side box (aspect kept):
    enlarged with nearest neighbours so pixels stay visible, shrunk with area averaging."""
    height, width = image.shape[:2]
    factor = side / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    resample = Image.NEAREST if factor >= 1 else Image.BOX
    scaled = np.asarray(Image.fromarray(image).resize(size, resample))
    return np.repeat(scaled[:, :, None], 3, axis=2) if scaled.ndim == 2 else scaled
