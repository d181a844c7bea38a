"""Throughput of the shard loader and of training steps on this machine.

Builds a seeded shard set (``--samples`` grey crops of random sides 70-320 px with cell-like
blobs, Parquet shards of 256 through ``write_shards``), then prints:

- loader: images/s of one epoch of ``make_loader`` (batch 32) at 224 px and at the demo size,
  with 0, 1 and 2 DataLoader workers (0 = decoding in the training process);
- step: images/s of optimizer steps of the weak_label method (rotation + flip augmentation,
  linear head) on EfficientNet-B0, batch 32, at 224 px and at the demo size, in fp32 NCHW,
  fp32 channels_last and bf16 autocast with channels_last (CPU);
- end to end: ``train.train`` for a few steps at the demo size (loading, step, bookkeeping),
  from its metrics.jsonl.

Wall-clock figures: other jobs on the machine slow them down (the load average is printed);
the step rates per CPU second are less sensitive to them.

    python benchmarks/bench_training.py [--samples 1024] [--steps 4] [--demo-size 64]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cytopretrain.core.schema import conform  # noqa: E402
from cytopretrain.core.tables import ParquetStreamWriter, encode_pixels  # noqa: E402
from cytopretrain.curation.shards import CROP_FIELDS, write_shards  # noqa: E402
from cytopretrain.learning import data, train  # noqa: E402
from cytopretrain.learning.checkpoints import read_metrics  # noqa: E402
from cytopretrain.learning.models import build_backbone  # noqa: E402
from cytopretrain.learning.pretext import build_method  # noqa: E402

BATCH = 32
N_CLASSES = 20


def cell_crop(rng: np.random.Generator) -> np.ndarray:
    """A uint8 (H, W, 1) crop of blurred blobs on noise: compresses like microscopy, not like noise."""
    height, width = rng.integers(70, 321, size=2)
    field = np.zeros((height, width))
    for _ in range(rng.integers(3, 12)):
        field[rng.integers(height), rng.integers(width)] = rng.uniform(500, 2000)
    field = ndimage.gaussian_filter(field, sigma=rng.uniform(4, 10)) + rng.normal(0, 2, field.shape)
    return np.clip(field * 255 / max(field.max(), 1e-6), 0, 255).astype(np.uint8)[:, :, None]


def build_shards(folder: Path, n_samples: int) -> Path:
    rng = np.random.default_rng(0)
    schema = pa.schema(list(CROP_FIELDS.items()))
    labels = [f"class-{k:02d}" for k in range(N_CLASSES)]
    crop_file = folder / "crops.parquet"
    with ParquetStreamWriter(crop_file, schema) as writer:
        for number in range(n_samples):
            pixels = cell_crop(rng)
            writer.write(
                {
                    "crop_id": f"img-{number}-c0",
                    "idx": f"img-{number}",
                    "label": labels[number % N_CLASSES],
                    "category": "phenotype",
                    "crop": False,
                    "scaling": 1.0,
                    "x_min": 0,
                    "x_max": pixels.shape[1],
                    "y_min": 0,
                    "y_max": pixels.shape[0],
                    **encode_pixels(pixels),
                }
            )
    metadata = conform(
        pd.DataFrame(
            {
                "idx": [f"img-{n}" for n in range(n_samples)],
                "microscopy": "fluorescence",
                "channel_paths": [["/synthetic.tif"]] * n_samples,
            }
        ),
        "benchmark metadata",
    )
    kept = pd.DataFrame({"label": labels, "category": "phenotype"})
    out = folder / "shards"
    write_shards([crop_file], kept, metadata, out, samples_per_shard=256, validation_fraction=0.1)
    return out


def loader_rate(shards: Path, size: int, workers: int) -> float:
    loader = data.make_loader(
        shards,
        "train",
        batch_size=BATCH,
        image_size=size,
        in_channels=1,
        seed=0,
        epoch=0,
        num_workers=workers,
    )
    start = time.perf_counter()
    images = sum(len(batch["label"]) for batch in loader)
    return images / (time.perf_counter() - start)


def step_rate(size: int, mode: str, steps: int) -> tuple[float, float]:
    """Images per wall second and per CPU second (all threads) of weak_label optimizer steps
    on EfficientNet-B0, after 2 untimed warm-up steps."""
    torch.manual_seed(0)
    method = build_method("weak_label", build_backbone("efficientnet_b0", in_channels=1), n_classes=N_CLASSES)
    channels_last = mode != "fp32"
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(BATCH, 1, size, size)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(N_CLASSES, (BATCH,))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()
    for number in range(steps + 2):
        if number == 2:
            start, cpu_start = time.perf_counter(), time.process_time()
        with autocast:
            loss, _ = method.loss(images, labels, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    images = steps * BATCH
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu_start)


def end_to_end(shards: Path, out: Path, size: int, precision: str, steps: int) -> float:
    settings = {
        "method": "weak_label",
        "backbone": "efficientnet_b0",
        "in_channels": 1,
        "image_size": size,
        "batch_size": BATCH,
        "steps": steps,
        "lr": 1e-3,
        "log_every": steps,
        "checkpoint_every": steps,
        "precision": precision,
        "num_workers": 1,
        "progress": False,
    }
    train.train(settings, shards, out, resume=False)
    return read_metrics(out / "metrics.jsonl")[-1]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024, help="crops in the shard set")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per setting")
    parser.add_argument("--demo-size", type=int, default=64, help="the demo's training image side, px")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    sizes = (224, args.demo_size)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        shards = build_shards(Path(tmp), args.samples)
        print(f"shard set: {args.samples} crops written in {time.perf_counter() - start:.1f} s")
        print("\nloader, images/s (one epoch, batch 32)")
        print(f"{'workers':>8s}" + "".join(f"{f'{s} px':>10s}" for s in sizes))
        for workers in (0, 1, 2):
            print(f"{workers:8d}" + "".join(f"{loader_rate(shards, s, workers):10.0f}" for s in sizes))
        print(
            "\ntraining step (EfficientNet-B0, weak_label, batch 32, CPU): images per wall second"
            " (per CPU second of all threads)"
        )
        modes = {
            "fp32": "fp32 NCHW",
            "fp32-cl": "fp32 channels_last",
            "bf16": "bf16 autocast + channels_last",
        }
        print(f"{'mode':>32s}" + "".join(f"{f'{s} px':>16s}" for s in sizes))
        for mode, name in modes.items():
            rates = [step_rate(s, mode, args.steps) for s in sizes]
            print(f"{name:>32s}" + "".join(f"{wall:8.1f} ({cpu:5.1f})" for wall, cpu in rates))
        print(f"\nend to end (train.train, {args.demo_size} px, 1 loader worker), images/s")
        for precision in ("fp32", "bf16"):
            rate = end_to_end(shards, Path(tmp) / f"run-{precision}", args.demo_size, precision, args.steps + 2)
            print(f"{precision:>32s}{rate:10.1f}")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
