"""Throughput of feature extraction against a bare forward pass of the same model.

Model: efficientnet_b0 (random init; weights do not change the cost), grey input repeated to
its 3 input channels, ``merge`` mode at native resolution, batch 32, on the CPU in fp32 and in
bf16 (autocast + channels_last).

Image sets:
- bbbc021_cells: the 599 real single-cell crops in ../shared/data/bbbc021_cells
  (68 x 68 x 3 uint16 .npy files);
- tiff224: seeded synthetic fields written by this script as three single-page 16-bit TIFFs per
  image (224 x 224, uncompressed).

For each set and precision, alternating ``--repeat`` times:
- pipeline: cytopretrain.features.extract_features on the table (read, percentile-normalize,
  merge, batch by shape, forward, profile table);
- bare: the backbone's forward alone on the same batches, already normalized, repeated to 3
  channels and laid out in memory (the work the pipeline cannot avoid).
The two alternate on chunks of ``--chunk`` images (half that for tiff224), so both see the
same load from other jobs sharing the machine. Reported per ``num_workers``: images/s of each
(medians over chunks and repeats) and the ratio pipeline / bare (median of the per-chunk
ratios, with their range). Target: ratio >= 0.9.

    python benchmarks/bench_features.py [--repeat 2] [--n-tiff 96] [--chunk 100]
                                        [--num-workers 0 2]
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

from cytopretrain.features import (  # noqa: E402
    extract_features,
    merge_channels,
    random_init_backbone,
    unit_channels,
)
from cytopretrain.imageio import read_channels  # noqa: E402
from cytopretrain.sources import run_adapter  # noqa: E402

DATA = REPO.parent / "shared" / "data"
BATCH_SIZE = 32


def bbbc021_cells_table() -> pd.DataFrame:
    options = {"file": "cells.csv", "path_column": "file", "columns": {"phenotype": "moa"}}
    return run_adapter("manifest", DATA / "bbbc021_cells", "bbbc021_cells", options).table


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


def bare_batches(table: pd.DataFrame, channels_last: bool) -> list[torch.Tensor]:
    """The pipeline's batches (same grouping, same values) as ready (B, 3, H, W) tensors."""
    grey = []
    for paths in table["channel_paths"]:
        planes, active = unit_channels(read_channels(paths))
        grey.append(merge_channels(planes, active))
    by_shape: dict[tuple, list[np.ndarray]] = {}
    for image in grey:
        by_shape.setdefault(image.shape, []).append(image)
    batches = []
    for images in by_shape.values():
        for start in range(0, len(images), BATCH_SIZE):
            x = torch.from_numpy(np.stack(images[start : start + BATCH_SIZE])).expand(-1, 3, -1, -1)
            batches.append(x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format))
    return batches


def time_bare(backbone: torch.nn.Module, batches: list[torch.Tensor], bf16: bool) -> float:
    backbone.eval()
    if bf16:
        backbone.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for x in batches:
            backbone(x)
    seconds = time.perf_counter() - start
    backbone.to(memory_format=torch.contiguous_format)
    return seconds


def time_pipeline(backbone: torch.nn.Module, table: pd.DataFrame, bf16: bool, num_workers: int) -> float:
    start = time.perf_counter()
    profiles, failures = extract_features(
        table, backbone, channel_mode="merge", batch_size=BATCH_SIZE, device="cpu",
        precision="bf16" if bf16 else "fp32", num_workers=num_workers,
    )
    seconds = time.perf_counter() - start
    assert len(profiles) == len(table) and len(failures) == 0, failures
    return seconds


def chunk_batches(table: pd.DataFrame, size: int, channels_last: bool) -> list[tuple[pd.DataFrame, list[torch.Tensor]]]:
    chunks = [table.iloc[start : start + size] for start in range(0, len(table), size)]
    return [(chunk, bare_batches(chunk, channels_last)) for chunk in chunks]


def run(name: str, table: pd.DataFrame, repeat: int, chunk: int, workers: list[int]) -> None:
    """Pipeline and bare forward alternate chunk by chunk, so both see the same machine load."""
    backbone = random_init_backbone("efficientnet_b0", in_channels=3, seed=0)
    for bf16 in (False, True):
        chunks = chunk_batches(table, chunk, channels_last=True)
        time_bare(backbone, chunks[0][1][:1], bf16)  # warm-up: oneDNN primitive creation
        for num_workers in workers:
            pipeline, bare, ratios = [], [], []
            for _ in range(repeat):
                for images, batches in chunks:
                    p = time_pipeline(backbone, images, bf16, num_workers)
                    b = time_bare(backbone, batches, bf16)
                    pipeline.append(len(images) / p)
                    bare.append(len(images) / b)
                    ratios.append(b / p)
            print(
                f"{name:14s} {'bf16' if bf16 else 'fp32'} workers={num_workers}  n={len(table)}  "
                f"pipeline {statistics.median(pipeline):6.1f} img/s  bare forward {statistics.median(bare):6.1f} img/s  "
                f"ratio median {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}, "
                f"{len(ratios)} pairs)  load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--n-tiff", type=int, default=96)
    parser.add_argument("--chunk", type=int, default=100, help="images per pipeline / bare pair")
    parser.add_argument("--num-workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    if DATA.is_dir():
        run("bbbc021_cells", bbbc021_cells_table(), args.repeat, args.chunk, args.num_workers)
    else:
        print(f"skipping bbbc021_cells: {DATA} not found")
    with tempfile.TemporaryDirectory() as folder:
        run("tiff224", tiff_table(Path(folder), args.n_tiff), args.repeat, args.chunk // 2, args.num_workers)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
