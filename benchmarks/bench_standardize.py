"""Throughput of the standardize stage against bare decoding and a CytoImageNet-style loop.

Image sets:
- rxrx1: every RxRx1 site with all six channel PNGs in ../shared/data/rxrx1 (512x512 uint8),
  merged to one gray image per site;
- tiff: seeded synthetic fields of view written by this script, three single-page 16-bit TIFFs
  per image (nuclei, cytoplasm, cell edges; 1280x1024, BBBC021-like), uncompressed unless
  ``--tiff-compression`` says otherwise.

For each set and method, the median over ``--repeat`` runs of:
- decode: read every file (cytopretrain.core.imageio.read_image: imagecodecs PNG; TIFF planes
  uncompressed and plain read directly, others through tifffile);
- reference: per image, Pillow Image.open + np.array per channel file, np.percentile per
  channel, clip / rescale, channel average, PNG written with Pillow (CytoImageNet's style);
  also shown without its PNG write, to separate compute from output-format cost;
- ours: cytopretrain.curation.standardize.standardize_chunk (Parquet output included).

Megapixels count every channel plane read (H x W x channels). "per core" divides by the CPU
seconds the process used (user + system), which is robust to other jobs sharing the machine;
wall-clock rates (divided by the thread count) are printed beside them. Targets: ours at least
10x the reference per core; ours at most 1.5x the bare decode time.

    python benchmarks/bench_standardize.py [--repeat 3] [--n-tiff 12] [--threads 1 2]
                                           [--tiff-compression zlib]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from PIL import Image
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cytopretrain.core.imageio import read_image  # noqa: E402
from cytopretrain.curation.standardize import standardize_chunk  # noqa: E402

DATA = REPO.parent / "shared" / "data"


@dataclass
class ImageSet:
    name: str
    meta: pd.DataFrame  # idx, channel_paths, channels
    megapixels: float  # H x W x C summed over images


def rxrx1_sites(root: Path) -> ImageSet:
    sites = []
    for first in sorted(root.glob("*/*/Plate*/*_w1.png")):
        paths = [str(first.with_name(first.name.replace("_w1.png", f"_w{c}.png"))) for c in range(1, 7)]
        if all(Path(p).is_file() for p in paths):
            sites.append(paths)
    if not sites:
        raise SystemExit(f"no complete 6-channel RxRx1 site under {root}")
    meta = pd.DataFrame(
        {
            "idx": [f"rxrx1-{i}" for i in range(len(sites))],
            "channel_paths": sites,
            "channels": "|".join(f"w{c}" for c in range(1, 7)),
        }
    )
    height, width = read_image(sites[0][0]).shape[:2]
    return ImageSet("rxrx1 png", meta, len(sites) * 6 * height * width / 1e6)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], n_cells: int, sigma: float) -> np.ndarray:
    """Gaussian blobs at random positions, built at 1/8 resolution and zoomed (fast)."""
    small = np.zeros((shape[0] // 8, shape[1] // 8))
    ys = rng.integers(0, small.shape[0], n_cells)
    xs = rng.integers(0, small.shape[1], n_cells)
    np.add.at(small, (ys, xs), rng.uniform(0.5, 1.5, n_cells))
    small = ndimage.gaussian_filter(small, sigma)
    return ndimage.zoom(small / small.max(), 8, order=1)


def synthetic_channels(rng: np.random.Generator, height: int, width: int) -> list[np.ndarray]:
    """Nuclei, cytoplasm and cell-edge channels with background, texture and shot noise."""
    cells = _smooth_field(rng, (height, width), 120, 1.2)
    cytoplasm = _smooth_field(rng, (height, width), 120, 3.0) * 0.5 + ndimage.gaussian_filter(cells, 4) * 0.5
    edges = np.hypot(*np.gradient(ndimage.gaussian_filter(cytoplasm, 2)))
    texture = ndimage.gaussian_filter(rng.standard_normal((height, width)), 1.5)
    out = []
    for signal, background, peak in ((cells, 300, 30000), (cytoplasm, 500, 12000), (edges, 400, 8000)):
        expected = background + peak * np.clip(signal / signal.max() * (1 + 0.3 * texture), 0, None)
        out.append(np.clip(rng.poisson(expected), 0, 65535).astype(np.uint16))
    return out


def synthetic_tiffs(
    folder: Path, n_images: int, height: int, width: int, seed: int, compression: str | None = None
) -> ImageSet:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_images):
        paths = []
        for stain, plane in zip(("dapi", "tubulin", "actin"), synthetic_channels(rng, height, width)):
            path = folder / f"field{i:03d}_{stain}.tif"
            tifffile.imwrite(path, plane, compression=compression)
            paths.append(str(path))
        rows.append(paths)
    meta = pd.DataFrame(
        {
            "idx": [f"tiff-{i}" for i in range(n_images)],
            "channel_paths": rows,
            "channels": "dapi|tubulin|actin",
        }
    )
    label = f"tiff 16-bit {compression or 'uncompressed'}"
    return ImageSet(label, meta, n_images * 3 * height * width / 1e6)


def bare_decode(images: ImageSet, out_dir: Path, threads: int) -> None:
    for paths in images.meta["channel_paths"]:
        for path in paths:
            read_image(path)


def reference(images: ImageSet, out_dir: Path, threads: int, write: bool = True) -> None:
    """One image at a time, as CytoImageNet's preprocessing scripts do it."""
    for idx, paths in zip(images.meta["idx"], images.meta["channel_paths"]):
        normalized = []
        for path in paths:
            img = np.array(Image.open(path))
            bottom = np.percentile(img.flatten(), 0.1)
            top = np.percentile(img.flatten(), 99.9)
            img = np.clip(img, bottom, top) - bottom  # float64 from here on
            normalized.append(img / img.max())
        merged = np.stack(normalized, axis=-1).mean(axis=-1) * 255
        gray = Image.fromarray(merged).convert("L")
        if write:
            gray.save(out_dir / f"{idx}.png")


def reference_without_write(images: ImageSet, out_dir: Path, threads: int) -> None:
    """The reference minus its PNG encoding: how much of the gap is the output format."""
    reference(images, out_dir, threads, write=False)


def ours(images: ImageSet, out_dir: Path, threads: int) -> None:
    decisions = standardize_chunk(images.meta, out_dir / "standardized.parquet", threads=threads)
    if (decisions["status"] != "kept").any():
        raise SystemExit(f"standardize_chunk quarantined images:\n{decisions[decisions.status != 'kept']}")


@dataclass
class Timing:
    wall: float
    cpu: float
    output_bytes: int = 0


def timed(method: Callable[[ImageSet, Path, int], None], images: ImageSet, threads: int) -> Timing:
    out_dir = Path(tempfile.mkdtemp(prefix="bench_std_out_"))
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        method(images, out_dir, threads)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return Timing(wall, cpu, sum(f.stat().st_size for f in out_dir.iterdir()))
    finally:
        shutil.rmtree(out_dir)


def report(images: ImageSet, runs: dict[str, list[Timing]], threads_of: dict[str, int]) -> None:
    n = len(images.meta)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\n== {images.name}: {n} images, {images.megapixels:.1f} MPix per pass "
        f"(load average {load} on {os.cpu_count()} cores) =="
    )
    print(
        f"{'method':<25}{'threads':>8}{'wall s':>9}{'cpu s':>9}{'img/s/core':>12}{'MPix/s/core':>13}"
        f"{'(wall) img/s/core':>19}{'MPix/s/core':>13}{'KB out/img':>12}"
    )
    medians = {}
    for label, timings in runs.items():
        wall = statistics.median(t.wall for t in timings)
        cpu = statistics.median(t.cpu for t in timings)
        medians[label] = Timing(wall, cpu)
        per_core_wall = wall * threads_of[label]
        print(
            f"{label:<25}{threads_of[label]:>8}{wall:>9.3f}{cpu:>9.3f}{n / cpu:>12.1f}"
            f"{images.megapixels / cpu:>13.1f}{n / per_core_wall:>19.1f}{images.megapixels / per_core_wall:>13.1f}"
            f"{timings[-1].output_bytes / n / 1e3:>12.0f}"
        )
    ref, dec = medians["reference"], medians["decode"]
    threaded = sorted((k, medians[label].wall) for label, k in threads_of.items() if label.startswith("ours"))
    for k, wall in threaded[1:]:
        print(f"ours: {threaded[0][1] / wall:.2f}x wall-clock speedup with {k} threads over {threaded[0][0]}")
    for label, m in medians.items():
        if not label.startswith("ours"):
            continue
        k = threads_of[label]
        best = min(t.cpu for t in runs[label]) / min(t.cpu for t in runs["decode"])
        print(
            f"{label}: {ref.cpu / m.cpu:.1f}x reference per core (cpu), {ref.wall / (m.wall * k):.1f}x (wall), "
            f"{medians['reference w/o PNG write'].cpu / m.cpu:.1f}x reference w/o PNG write (cpu); "
            f"{m.cpu / dec.cpu:.2f}x bare decode time per core (cpu; best of runs {best:.2f}x), "
            f"{m.wall * k / dec.wall:.2f}x (wall)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--n-tiff", type=int, default=12, help="synthetic 16-bit images to write")
    parser.add_argument("--tiff-shape", type=int, nargs=2, default=(1024, 1280), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts for ours")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiff-compression", default=None, help="e.g. zlib or lzw (default: none)")
    parser.add_argument("--rxrx1", type=Path, default=DATA / "rxrx1")
    args = parser.parse_args()

    tiff_dir = Path(tempfile.mkdtemp(prefix="bench_std_tiff_"))
    try:
        image_sets = []
        if args.rxrx1.is_dir():
            image_sets.append(rxrx1_sites(args.rxrx1))
        else:
            print(f"skipping rxrx1: {args.rxrx1} not found")
        image_sets.append(
            synthetic_tiffs(tiff_dir, args.n_tiff, *args.tiff_shape, seed=args.seed, compression=args.tiff_compression)
        )
        methods = {
            "decode": (bare_decode, 1),
            "reference": (reference, 1),
            "reference w/o PNG write": (reference_without_write, 1),
        }
        methods |= {f"ours threads={k}": (ours, k) for k in args.threads}
        for images in image_sets:
            bare_decode(images, tiff_dir, 1)  # warm the page cache
            runs: dict[str, list[Timing]] = {label: [] for label in methods}
            for _ in range(args.repeat):  # interleave methods so drifting machine load hits all alike
                for label, (method, threads) in methods.items():
                    runs[label].append(timed(method, images, threads))
            report(images, runs, {label: threads for label, (_, threads) in methods.items()})
    finally:
        shutil.rmtree(tiff_dir)


if __name__ == "__main__":
    main()
