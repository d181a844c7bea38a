"""Throughput of feature extraction against a bare forward pass of the same model.

Model: efficientnet_b0 (random init; weights do not change the cost), grey input repeated to
its 3 input channels, ``merge`` mode at native resolution, batch 32, in the channels_last
layout, on the CPU in fp32 and in bf16 autocast (on a GPU when one is present, ``--device``).

Image sets:
- bbbc021_cells: the 599 real single-cell crops in ../shared/data/bbbc021_cells
  (68 x 68 x 3 uint16 .npy files);
- tiff224: seeded synthetic fields written by this script as three single-page 16-bit TIFFs per
  image (224 x 224, uncompressed).

For each set, precision and ``--num-workers`` value, alternating ``--repeat`` times so both see
the same load from other jobs sharing the machine:
- pipeline: evaluation.features.extract_features on the set (read, percentile-normalize and
  merge a batch of images at a time, batch by shape, forward, profile table), loading in
  ``num_workers`` threads beside the model;
- bare: the forward of the same model (the BatchNorm-folded inference copy the pipeline runs)
  alone on the same batches, already normalized, repeated to 3 channels and laid out in memory.
Reported: images/s of both (medians) and the ratio pipeline / bare: the share of the
pipeline's time that is the model's forward.

    python benchmarks/bench_features.py [--repeat 3] [--n-tiff 128] [--num-workers 0 1 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cytopretrain.core.devices import resolve_device  # noqa: E402
from cytopretrain.core.imageio import read_channels  # noqa: E402
from cytopretrain.curation.sources import run_adapter  # noqa: E402
from cytopretrain.evaluation.features import extract_features, random_init_backbone  # noqa: E402
from cytopretrain.evaluation.preprocess import merge_channels, unit_channels  # noqa: E402
from cytopretrain.learning.models import InferenceBackbone  # noqa: E402

DATA = REPO.parent / "shared" / "data"
BATCH_SIZE = 32


def bbbc021_cells_table(copies: int = 1) -> pd.DataFrame:
    """The crops' canonical table, ``copies`` times over (each copy's idx suffixed)."""
    options = {"file": "cells.csv", "path_column": "file", "columns": {"phenotype": "moa"}}
    table = run_adapter("manifest", DATA / "bbbc021_cells", "bbbc021_cells", options).table
    if copies == 1:
        return table
    return pd.concat([table.assign(idx=table["idx"] + f"-copy{k}") for k in range(copies)], ignore_index=True)


def tiff_table(folder: Path, n_images: int, size: int = 224, seed: int = 0) -> pd.DataFrame:
    """Seeded fields of view: Poisson background with Gaussian nuclei, three channels, uint16."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    rows = []
    for i in range(n_images):
        paths = []
        for c in range(3):
            signal = np.zeros((size, size))
            for cy, cx in rng.uniform(0, size, (12, 2)):
                signal += 2500 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(15, 60)))
            path = folder / f"img{i:04d}_w{c}.tif"
            tifffile.imwrite(path, rng.poisson(300 + signal).astype(np.uint16))
            paths.append(str(path))
        rows.append({"idx": f"tiff-{i}", "channel_paths": paths, "channels": "dna|tubulin|actin"})
    return pd.DataFrame(rows)


def bare_batches(table: pd.DataFrame, device: torch.device) -> list[torch.Tensor]:
    """The pipeline's batches (same grouping, same values) as ready (B, 3, H, W) tensors."""
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for paths in table["channel_paths"]:
        image = read_channels(paths).transpose(2, 0, 1)[None]
        by_shape.setdefault(image.shape, []).append(merge_channels(*unit_channels(image)))
    batches = []
    for images in by_shape.values():
        for start in range(0, len(images), BATCH_SIZE):
            x = torch.cat(images[start : start + BATCH_SIZE]).expand(-1, 3, -1, -1)
            batches.append(x.contiguous(memory_format=torch.channels_last).to(device))
    return batches


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_bare(
    model: torch.nn.Module, batches: list[torch.Tensor], dtype: torch.dtype | None, device: torch.device
) -> float:
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for x in batches:
            model(x)
    synchronize(device)
    return time.perf_counter() - start


def time_pipeline(backbone, table: pd.DataFrame, precision: str, num_workers: int, device: torch.device) -> float:
    start = time.perf_counter()
    profiles, failures = extract_features(
        table,
        backbone,
        channel_mode="merge",
        batch_size=BATCH_SIZE,
        device=device,
        precision=precision,
        num_workers=num_workers,
    )
    synchronize(device)
    assert len(profiles) == len(table) and len(failures) == 0, failures
    return time.perf_counter() - start


def run(name: str, table: pd.DataFrame, repeat: int, workers: list[int], device: torch.device) -> None:
    backbone = random_init_backbone("efficientnet_b0", in_channels=3, seed=0)
    model = InferenceBackbone(backbone).to(device, memory_format=torch.channels_last)
    batches = bare_batches(table, device)
    precisions = {"fp32": None, "bf16": torch.bfloat16}
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        precisions = {"fp32": None}
    for precision, dtype in precisions.items():
        time_bare(model, batches[:1], dtype, device)  # warm-up: kernel selection
        for num_workers in workers:
            pipeline, bare, ratios = [], [], []
            for _ in range(repeat):
                p = time_pipeline(backbone, table, precision, num_workers, device)
                b = time_bare(model, batches, dtype, device)
                pipeline.append(len(table) / p)
                bare.append(len(table) / b)
                ratios.append(b / p)
            print(
                f"{name:14s} {precision} workers={num_workers} n={len(table)}  pipeline "
                f"{statistics.median(pipeline):6.1f} img/s  bare forward {statistics.median(bare):6.1f} img/s  "
                f"ratio {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})  "
                f"load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--n-tiff", type=int, default=128)
    parser.add_argument("--num-workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")
    if DATA.is_dir():
        run("bbbc021_cells", bbbc021_cells_table(), args.repeat, args.num_workers, device)
    else:
        print(f"skipping bbbc021_cells: {DATA} not found")
    with tempfile.TemporaryDirectory() as folder:
        run("tiff224", tiff_table(Path(folder), args.n_tiff), args.repeat, args.num_workers, device)


if __name__ == "__main__":
    main()
