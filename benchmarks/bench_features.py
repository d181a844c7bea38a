"""Throughput of feature extraction against a bare forward pass of the same model.

Model: efficientnet_b0 (random init; weights do not change the cost), grey input repeated to
its 3 input channels, ``merge`` mode at native resolution, batch 32, on the CPU in fp32 and in
bf16 autocast, in the channels_last layout the pipeline uses.

Image sets:
- bbbc021_cells: the 599 real single-cell crops in ../shared/data/bbbc021_cells
  (68 x 68 x 3 uint16 .npy files);
- tiff224: seeded synthetic fields written by this script as three single-page 16-bit TIFFs per
  image (224 x 224, uncompressed).

``--copies K`` repeats the crops' table K times (the same files under new idx) so that one
call can hold more than 599 crops: a call's fixed costs (starting the lanes, the last batch
running alone in one lane, building the profile table) weigh less, as in the workflow, which
extracts a whole benchmark in one call.

For each set and precision, alternating ``--repeat`` times on chunks of ``--chunk`` images
(``--chunk-tiff`` for tiff224: a whole number of batches per lane, so that no lane idles at
the end of a chunk), so all see the same load from other jobs sharing the machine:
- pipeline: cytopretrain.evaluation.features.extract_features on the chunk (read, percentile-normalize
  and merge a batch of images at a time, batch by shape, forward, profile table). It runs the
  backbone's inference copy (BatchNorms folded into the convolutions) in cache-sized slices of
  a batch (cpu_slice_images), and on the CPU one batch per torch thread, each forward on one
  intra-op thread ("lanes");
- bare, same model: the inference copy's forward alone on the same batches in the same
  slices, already normalized, repeated to 3 channels and laid out in memory (the work the
  pipeline cannot avoid), spread over as many plain threads of one intra-op thread each;
- bare, backbone as given: the torchvision backbone in eval mode (BatchNorms not folded) on
  whole batches of 32, in the same thread layout, as a user's own loop would run it;
- bare, intra-op: the backbone as given, one batch at a time on all of torch's threads
  (torch's default way to use the cores).
Reported per ``num_workers``: images/s of each (medians over chunks and repeats); the ratio
pipeline / bare same model (median of the per-chunk ratios, with their range): the share of
the pipeline's time that is the forward pass, its own overhead; the same in process CPU time
(less sensitive to other jobs); and the pipeline's speedup over the backbone as given, in the
same layout and intra-op. First, per set, the CPU cost per image of reading, normalizing and
the inference copy's forward in the pipeline's slices on one thread (thread CPU time, robust
to other jobs sharing the machine).

    python benchmarks/bench_features.py [--repeat 3] [--n-tiff 256] [--chunk 600] [--chunk-tiff 128]
                                        [--copies 4] [--num-workers 0 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cytopretrain.core.imageio import read_channels  # noqa: E402
from cytopretrain.curation.sources import run_adapter  # noqa: E402
from cytopretrain.evaluation.features import cpu_slice_images, extract_features, inference_copy, random_init_backbone
from cytopretrain.evaluation.preprocess import merge_channels, unit_channels

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


def bare_batches(table: pd.DataFrame, channels_last: bool) -> list[torch.Tensor]:
    """The pipeline's batches (same grouping, same values) as ready (B, 3, H, W) tensors."""
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for paths in table["channel_paths"]:
        image = read_channels(paths).transpose(2, 0, 1)[None]
        by_shape.setdefault(image.shape, []).append(merge_channels(*unit_channels(image)))
    batches = []
    for images in by_shape.values():
        for start in range(0, len(images), BATCH_SIZE):
            x = torch.cat(images[start : start + BATCH_SIZE]).expand(-1, 3, -1, -1)
            layout = torch.channels_last if channels_last else torch.contiguous_format
            batches.append(x.contiguous(memory_format=layout))
    return batches


def time_bare(backbone: torch.nn.Module, batches: list[torch.Tensor], bf16: bool, lanes: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the forward passes alone, in the layout the pipeline uses: on
    ``lanes`` threads of one intra-op thread each (batches dealt round-robin), or with
    lanes == 1 one batch at a time on all of torch's threads."""
    backbone.eval()
    backbone.to(memory_format=torch.channels_last)

    def forward(share: list[torch.Tensor], single: bool) -> None:
        if single:
            torch.set_num_threads(1)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for x in share:
                backbone(x)

    threads = torch.get_num_threads()
    start, cpu = time.perf_counter(), time.process_time()
    if lanes == 1:
        forward(batches, single=False)
    else:
        workers = [threading.Thread(target=forward, args=(batches[i::lanes], True)) for i in range(lanes)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    seconds = time.perf_counter() - start, time.process_time() - cpu
    torch.set_num_threads(threads)  # a thread's set_num_threads also sets later threads' count
    return seconds


def time_pipeline(backbone: torch.nn.Module, table: pd.DataFrame, bf16: bool, num_workers: int) -> tuple[float, float]:
    """(wall, CPU) seconds of extract_features on the table."""
    start, cpu = time.perf_counter(), time.process_time()
    profiles, failures = extract_features(
        table, backbone, channel_mode="merge", batch_size=BATCH_SIZE, device="cpu",
        precision="bf16" if bf16 else "fp32", num_workers=num_workers,
    )
    seconds = time.perf_counter() - start, time.process_time() - cpu
    assert len(profiles) == len(table) and len(failures) == 0, failures
    return seconds


def cost_breakdown(name: str, table: pd.DataFrame) -> None:
    """CPU milliseconds per image of each step on one thread (thread CPU time, best of 3: robust
    to other jobs), and the share of the forward pass in a serial run, F / (F + read + normalize)."""
    backbone = folded(random_init_backbone("efficientnet_b0", in_channels=3, seed=0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    paths = table["channel_paths"].tolist()
    images = [read_channels(p) for p in paths]
    batches = sliced(bare_batches(table, channels_last=True))

    def best_ms(step) -> float:
        times = []
        for _ in range(3):
            start = time.thread_time()
            step()
            times.append(time.thread_time() - start)
        return min(times) / len(table) * 1e3

    read = best_ms(lambda: [read_channels(p) for p in paths])
    # as the pipeline does it: stacks of a batch of images, normalized and merged together
    stacks = [
        np.stack([image.transpose(2, 0, 1) for image in images[start : start + BATCH_SIZE]])
        for start in range(0, len(images), BATCH_SIZE)
    ]
    normalize = best_ms(lambda: [merge_channels(*unit_channels(stack)) for stack in stacks])
    parts = [f"read {read:.3f}", f"normalize+merge {normalize:.3f}"]
    for bf16 in (False, True):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            backbone(batches[0])
            forward = best_ms(lambda: [backbone(x) for x in batches])
        share = forward / (forward + read + normalize)
        parts.append(f"forward {'bf16' if bf16 else 'fp32'} {forward:.3f} (share {share:.2f})")
    torch.set_num_threads(threads)
    print(f"{name:14s} CPU ms per image, one thread: " + ", ".join(parts), flush=True)


def chunk_batches(table: pd.DataFrame, size: int, channels_last: bool) -> list[tuple[pd.DataFrame, list[torch.Tensor]]]:
    chunks = [table.iloc[start : start + size] for start in range(0, len(table), size)]
    return [(chunk, bare_batches(chunk, channels_last)) for chunk in chunks]


def sliced(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The batches in the slices the pipeline's CPU forward takes (cpu_slice_images)."""
    slices = []
    for x in batches:
        step = cpu_slice_images(*x.shape[2:])
        slices.extend(x[start : start + step] for start in range(0, len(x), step))
    return slices


def folded(backbone: torch.nn.Module) -> torch.nn.Module:
    """The inference copy the pipeline runs (the same object: it is cached per backbone)."""
    return inference_copy(backbone, torch.device("cpu"), torch.channels_last)


def run(name: str, table: pd.DataFrame, repeat: int, chunk: int, workers: list[int]) -> None:
    """Pipeline and bare forwards alternate chunk by chunk, so all see the same machine load."""
    backbone = random_init_backbone("efficientnet_b0", in_channels=3, seed=0)
    same_model = folded(backbone)
    lanes = torch.get_num_threads()
    for bf16 in (False, True):
        chunks = chunk_batches(table, chunk, channels_last=True)
        for model in (same_model, backbone):
            for warm_up in (1, lanes):  # oneDNN primitive creation, per thread count
                time_bare(model, chunks[0][1][:lanes], bf16, warm_up)
        for num_workers in workers:
            pipeline, same, given, intra, ratios, cpu_ratios, given_speedups, intra_speedups = ([] for _ in range(8))
            for _ in range(repeat):
                for images, batches in chunks:
                    p, p_cpu = time_pipeline(backbone, images, bf16, num_workers)
                    b, b_cpu = time_bare(same_model, sliced(batches), bf16, lanes)
                    g, _ = time_bare(backbone, batches, bf16, lanes)
                    i, _ = time_bare(backbone, batches, bf16, 1)
                    for rates, seconds in ((pipeline, p), (same, b), (given, g), (intra, i)):
                        rates.append(len(images) / seconds)
                    ratios.append(b / p)
                    cpu_ratios.append(b_cpu / p_cpu)
                    given_speedups.append(g / p)
                    intra_speedups.append(i / p)
            print(
                f"{name:14s} {'bf16' if bf16 else 'fp32'} threads={lanes} workers={num_workers}  "
                f"n={len(table)}  pipeline {statistics.median(pipeline):6.1f} img/s  "
                f"bare same model {statistics.median(same):6.1f} img/s  ratio {statistics.median(ratios):.2f} "
                f"(range {min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} chunks)  "
                f"CPU-time ratio {statistics.median(cpu_ratios):.2f}  "
                f"| backbone as given: same layout {statistics.median(given):6.1f} img/s, pipeline speedup "
                f"{statistics.median(given_speedups):.2f}x; intra-op {statistics.median(intra):6.1f} img/s, "
                f"speedup {statistics.median(intra_speedups):.2f}x  load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--n-tiff", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=600, help="images per pipeline / bare pair")
    parser.add_argument(
        "--copies", type=int, default=1, help="the crops' table this many times over (for chunks above 599)"
    )
    parser.add_argument("--chunk-tiff", type=int, default=128, help="the same for tiff224")
    parser.add_argument("--num-workers", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    if DATA.is_dir():
        cells = bbbc021_cells_table(args.copies)
        cost_breakdown("bbbc021_cells", cells)
        run("bbbc021_cells", cells, args.repeat, args.chunk, args.num_workers)
    else:
        print(f"skipping bbbc021_cells: {DATA} not found")
    with tempfile.TemporaryDirectory() as folder:
        fields = tiff_table(Path(folder), args.n_tiff)
        cost_breakdown("tiff224", fields.iloc[:32])
        run("tiff224", fields, args.repeat, args.chunk_tiff, args.num_workers)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
