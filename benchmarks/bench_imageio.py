"""Do the hand-written readers of core.imageio earn their place? The plain-TIFF and NPY fast
paths against the libraries' own readers (tifffile, np.load), per file and at stage level.

Real files from ../shared/data: yeast_toy (64 x 64 float32 TIFF, 2 channels per cell),
hpa_toy (128 x 128 float32 TIFF, 3 channels), bbbc021_cells (68 x 68 x 3 uint16 NPY), plus
224 x 224 uint16 TIFFs written here (one plane per file, a feature-extraction field size).

For each set, the best of ``--repeat`` passes of:
- per file: read_image with the fast path against the library reader (tifffile.imread / np.load),
  ms per file;
- stage: standardize_chunk over the whole set (read, percentiles, merge, Parquet), and
  evaluation.features.extract_features with a random ResNet-18 (merge mode, batch 32), with the
  fast path and with read_image routed through the library reader, s per set.

    python benchmarks/bench_imageio.py [--repeat 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import torch
from harness import DATA, best  # noqa: E402

from cytopretrain.core import imageio  # noqa: E402
from cytopretrain.curation.standardize import standardize_chunk  # noqa: E402
from cytopretrain.evaluation.features import extract_features, random_init_backbone  # noqa: E402


def image_sets(scratch: Path) -> dict[str, pd.DataFrame]:
    """Tables (idx, channel_paths, channels) of each set."""
    yeast = sorted((DATA / "yeast_toy" / "images").glob("*/*_gfp.tif"))
    hpa = sorted((DATA / "hpa_toy").glob("*/*_blue.tif"))
    npy = sorted((DATA / "bbbc021_cells").glob("*/*.npy"))
    rng = np.random.default_rng(0)
    fields = []
    for n in range(200):
        path = scratch / f"field{n}.tif"
        tifffile.imwrite(path, rng.poisson(300, (224, 224)).astype(np.uint16))
        fields.append(path)

    def table(rows: list[list[Path]], channels: str) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "idx": [f"i{n}" for n in range(len(rows))],
                "channel_paths": [[str(p) for p in r] for r in rows],
                "channels": channels,
            }
        )

    return {
        "yeast 64 px float32 TIFF x2": table(
            [[g, g.with_name(g.name.replace("_gfp", "_rfp"))] for g in yeast], "gfp|rfp"
        ),
        "hpa 128 px float32 TIFF x3": table(
            [
                [b, b.with_name(b.name.replace("_blue", "_green")), b.with_name(b.name.replace("_blue", "_red"))]
                for b in hpa
            ],
            "blue|green|red",
        ),
        "bbbc021 68 px uint16 NPY (3 ch)": table([[p] for p in npy], "dna|tubulin|actin"),
        "224 px uint16 TIFF": table([[p] for p in fields], "dna"),
    }


@contextmanager
def library_readers():
    """read_image through tifffile.imread and np.load instead of the fast paths."""
    saved, plain = dict(imageio._READERS), imageio._plain_tiff_layout
    imageio._plain_tiff_layout = lambda head, size: None  # every TIFF through tifffile
    imageio._READERS[".npy"] = lambda path, size: np.load(path)
    try:
        yield
    finally:
        imageio._READERS.update(saved)
        imageio._plain_tiff_layout = plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = random_init_backbone("resnet18", in_channels=1, seed=0)
    with tempfile.TemporaryDirectory() as scratch:
        sets = image_sets(Path(scratch))
        print(
            f"{'set':34} {'files':>6} {'fast ms/file':>13} {'lib ms/file':>12} "
            f"{'standardize fast / lib s':>26} {'features fast / lib s':>23}"
        )
        for name, table in sets.items():
            files = [p for paths in table["channel_paths"] for p in paths]

            def read_all(files=files) -> None:
                for path in files:
                    imageio.read_image(path)

            def stage(table=table) -> None:
                standardize_chunk(table, Path(scratch) / "std.parquet", threads=1)

            def extract(table=table) -> None:
                extract_features(table, backbone, channel_mode="merge", device="cpu")

            fast = [best(f, args.repeat) for f in (read_all, stage, extract)]
            with library_readers():
                library = [best(f, args.repeat) for f in (read_all, stage, extract)]
            print(
                f"{name:34} {len(files):6d} {1000 * fast[0] / len(files):13.3f} {1000 * library[0] / len(files):12.3f} "
                f"{fast[1]:12.2f} / {library[1]:<11.2f} {fast[2]:10.2f} / {library[2]:<10.2f}"
            )


if __name__ == "__main__":
    main()
