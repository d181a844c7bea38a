"""Do the pretext methods learn something useful on real cells? (issue 19, item 0)

For each real set of ``../shared/data`` the script trains every method for a few hundred CPU
steps and prints leave-one-out 11-NN accuracy (the ``knn_loo`` protocol: z-scored features,
Euclidean distance) with its 95 % interval, against the same architecture at random init:

- ``yeast``: yeast_toy, 1,642 cells, 64 px, GFP + RFP, label = tagged protein (5 classes);
- ``bbbc021``: bbbc021_cells, 599 MCF7 cells, 68 px, DAPI / tubulin / actin, label = MOA
  (DMSO vs protein synthesis inhibitor);
- ``rxrx1``: the 36 RxRx1 fields (512 px, channels w1-w4, the ones every site has) cut into
  16 tiles of 128 px each (576 tiles), label = cell type (HEPG2, HUVEC, RPE, U2OS). Tiles of
  one plate never count as each other's neighbours (``--rxrx1-groups plate``, the default):
  every field of a plate shows the same cell type under the same imaging, so without the
  exclusion kNN would match plates, not cell types.

Pipeline, as the workflow runs it: training images are the cells (tiles) standardized as the
curation does (0.1 / 99.9 percentiles per channel, channels merged, uint8) in Parquet shards
(10 % validation), trained at 64 px with ``in_channels: 1`` (larger images randomly cropped by
the loader); features are extracted at native resolution per channel and concatenated
(``features.channel_mode: concat``), percentile-normalized. Self-supervised methods train on
the evaluated set's own images without its labels; ``weak_label`` trains on the other real
sets (the two others plus hpa_toy, labels prefixed by set), never the evaluated one. Every run
reports its last checkpoint: the ``best`` one is picked on the validation split's labels,
which here are the evaluated labels.

Methods and their settings are in RECIPES (ResNet-18 unless named; DINO on ViT-tiny/16 with
2 global crops of 64 px and 4 local crops of 32 px). ``--steps`` scales every run.

    nice -n 10 python benchmarks/bench_real_cells.py [--steps 300] [--sets yeast,bbbc021,rxrx1]
        [--methods byol,autoencoder,...] [--override '{"byol": {"lr": 0.5}}'] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import torch
from harness import DATA, REPO, TESTS
from PIL import Image

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(TESTS))

from shard_builders import write_shard_set  # noqa: E402

from cytopretrain.core.numerics import zscore  # noqa: E402
from cytopretrain.curation.standardize import standardize_image  # noqa: E402
from cytopretrain.evaluation.features import extract_features, random_init_backbone  # noqa: E402
from cytopretrain.evaluation.knn import knn  # noqa: E402
from cytopretrain.evaluation.protocols.common import accuracy_result, decode, feature_matrix, vote  # noqa: E402
from cytopretrain.learning.models import build_backbone  # noqa: E402
from cytopretrain.learning.train import train  # noqa: E402

K = 11
COMMON = {
    "in_channels": 1,
    "checkpoint_every": 100,
    "log_every": 25,
    "num_workers": 0,
    "progress": False,
    "seed": 0,
}
# The recommended settings of each method at this scale (README, "Choosing a method").
RECIPES = {
    # AdamW, lr 0.002 per 256 images (0.0005 at batch 64): on yeast at 100 steps it beat random
    # init where LARS (lr 0.4 per 256, warm-up 30) and milder views lost (benchmarks/README.md).
    "byol": {
        "method": "byol",
        "backbone": "resnet18",
        "batch_size": 64,
        "optimizer": "adamw",
        "lr": 0.002,
        "lr_scaling": "linear",
        "weight_decay": 1e-6,
        "warmup_steps": 10,
        "method_options": {"ema_base": 0.99, "ema_schedule": "cosine"},
    },
    "autoencoder": {
        "method": "autoencoder",
        "backbone": "resnet18",
        "batch_size": 32,
        "optimizer": "adam",
        "lr": 1e-3,
        "warmup_steps": 10,
    },
    "patch_location": {
        "method": "patch_location",
        "backbone": "resnet18",
        "batch_size": 32,
        "optimizer": "adam",
        "lr": 1e-3,
        "warmup_steps": 10,
        "method_options": {"jitter": 0.1},
    },
    "weak_label": {
        "method": "weak_label",
        "backbone": "resnet18",
        "batch_size": 32,
        "optimizer": "adam",
        "lr": 1e-3,
        "warmup_steps": 20,
        "method_options": {"photometric": True},
    },
    "dino": {
        "method": "dino",
        "backbone": "vit_tiny_patch16",
        "batch_size": 32,
        "optimizer": "adamw",
        "lr": 5e-4,
        "lr_scaling": "linear",
        "weight_decay": 0.04,
        "weight_decay_end": 0.4,
        "warmup_steps": 30,
        "method_options": {"out_dim": 4096, "local_crops": 4, "local_size": 32, "teacher_temp": 0.04},
    },
}


# ------------------------------------------------------------------------------------ the sets


def merged(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) -> (size, size, 1) uint8 as the curation's standardize stage writes it
    (percentiles, channels merged), then resized as the crops stage does (bilinear)."""
    grey = standardize_image(image, mode="merge")[0]
    return np.asarray(Image.fromarray(grey).resize((size, size), Image.BILINEAR))[:, :, None]


def yeast_set(work: Path, size: int) -> dict:
    rows, images = [], []
    for protein_dir in sorted((DATA / "yeast_toy" / "images").iterdir()):
        for gfp in sorted(protein_dir.glob("*_gfp.tif")):
            rfp = gfp.with_name(gfp.name.replace("_gfp.tif", "_rfp.tif"))
            idx = gfp.name.removesuffix("_gfp.tif")
            rows.append({"idx": idx, "channel_paths": [str(gfp), str(rfp)], "channels": "gfp|rfp"})
            rows[-1]["phenotype"] = protein_dir.name
            image = np.stack([tifffile.imread(gfp), tifffile.imread(rfp)], axis=-1)
            images.append({"idx": idx, "label": protein_dir.name.lower(), "crops": [merged(image, size)]})
    return {"table": pd.DataFrame(rows), "images": images, "groups": None, "resize": size}


def bbbc021_set(work: Path, size: int) -> dict:
    folder = DATA / "bbbc021_cells"
    cells = pd.read_csv(folder / "cells.csv")
    rows, images = [], []
    for row in cells.itertuples():
        idx = Path(row.file).stem
        moa = "DMSO" if row.moa == "DMSO" else "protein_synthesis"
        rows.append({"idx": idx, "channel_paths": [str(folder / row.file)], "channels": "dna|tubulin|actin"})
        rows[-1]["phenotype"] = moa
        images.append({"idx": idx, "label": moa.lower(), "crops": [merged(np.load(folder / row.file), size)]})
    return {"table": pd.DataFrame(rows), "images": images, "groups": None, "resize": size}


def rxrx1_set(work: Path, size: int, field_scale: float = 0.25) -> dict:
    """Fields resized by ``field_scale`` (512 px -> 128 px at 0.25), cut into tiles of ``size``."""
    folder = work / f"rxrx1_tiles_{size}"
    folder.mkdir(parents=True, exist_ok=True)
    side = round(512 * field_scale)
    rows, images = [], []
    for first in sorted((DATA / "rxrx1").glob("*/*/Plate*/B02_s*_w1.png")):
        experiment, plate = first.parent.parent.name, first.parent.name
        site = first.name.split("_")[1]
        planes = [Image.open(first.with_name(first.name.replace("_w1", f"_w{c}"))) for c in range(1, 5)]
        field = np.stack([np.asarray(p.resize((side, side), Image.BILINEAR)) for p in planes], axis=-1)
        for row_start in range(0, side - size + 1, size):
            for col_start in range(0, side - size + 1, size):
                idx = f"{experiment}_{plate}_{site}_{row_start}_{col_start}"
                pixels = field[row_start : row_start + size, col_start : col_start + size]
                path = folder / f"{idx}.npy"
                np.save(path, pixels)
                cell_type = experiment.split("-")[0]
                rows.append({"idx": idx, "channel_paths": [str(path)], "channels": "w1|w2|w3|w4"})
                rows[-1].update(phenotype=cell_type, plate=f"{experiment}/{plate}")
                images.append({"idx": idx, "label": cell_type.lower(), "crops": [merged(pixels, size)]})
    table = pd.DataFrame(rows)
    return {"table": table, "images": images, "groups": table["plate"].to_numpy(), "resize": None}


def hpa_images(size: int) -> list[dict]:
    images = []
    for cell_dir in sorted((DATA / "hpa_toy").iterdir()):
        protein = cell_dir.name.split("_")[0]
        for blue in sorted(cell_dir.glob("*_blue.tif")):
            paths = [blue.with_name(blue.name.replace("_blue", f"_{c}")) for c in ("blue", "green", "red")]
            stack = np.stack([tifffile.imread(path) for path in paths], axis=-1)
            images.append({"idx": f"hpa-{blue.stem}", "label": protein.lower(), "crops": [merged(stack, size)]})
    return images


# name -> (builder, image side): cells resized to 32 px, RxRx1 fields to 128 px cut in 32 px
# tiles; rxrx1_64 (fields at 256 px, 64 px tiles) is where patch_location's patches fit.
SETS = {
    "yeast": (yeast_set, {"size": 32}),
    "bbbc021": (bbbc021_set, {"size": 32}),
    "rxrx1": (rxrx1_set, {"size": 32}),
    "rxrx1_64": (rxrx1_set, {"size": 64, "field_scale": 0.5}),
}
# The methods each set runs by default (patch_location needs 64 px images for 16 px patches).
DEFAULT_METHODS = {
    "yeast": ("byol", "autoencoder", "weak_label", "dino"),
    "bbbc021": ("byol", "autoencoder", "weak_label", "dino"),
    "rxrx1": ("byol", "autoencoder", "weak_label", "dino"),
    "rxrx1_64": ("patch_location",),
}


def build_set(name: str, work: Path) -> dict:
    builder, options = SETS[name]
    return {**builder(work, **options), "size": options["size"]}


# ------------------------------------------------------------------------------------ evaluation


def knn_accuracy(profiles: pd.DataFrame, groups: np.ndarray | None) -> dict:
    """knn_loo (k = 11, z-scored, Euclidean); with ``groups``, rows of one group are never
    neighbours of each other."""
    labels = profiles["Metadata_phenotype"].astype(str).to_numpy()
    names, codes = np.unique(labels, return_inverse=True)
    group_codes = None if groups is None else np.unique(groups, return_inverse=True)[1]
    _, neighbours = knn(zscore(feature_matrix(profiles, "knn")), None, K, exclude_self=True, query_groups=group_codes)
    predicted = decode(vote(np.where(neighbours >= 0, codes[neighbours], -1)), names)
    return accuracy_result("knn_loo", labels, predicted, k=K)


def evaluate(backbone, dataset: dict) -> dict:
    profiles, failures = extract_features(
        dataset["table"], backbone, channel_mode="concat", resize=dataset["resize"], device="cpu"
    )
    if len(failures):
        raise RuntimeError(f"{len(failures)} images failed: {failures.head()}")
    return knn_accuracy(profiles, dataset["groups"])


# ------------------------------------------------------------------------------------ runs


def run_method(settings: dict, shards: Path, out: Path) -> tuple[Path, dict]:
    started = time.perf_counter()
    result = train(settings, shards, out, device="cpu", resume=False)
    card = json.loads(Path(result["model_card"]).read_text())
    card["wall_s"] = time.perf_counter() - started
    return Path(result["backbone"]), card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--methods", default=None, help="restrict to these methods (default: DEFAULT_METHODS)")
    parser.add_argument("--override", default="{}", help="JSON: method -> settings replacing the recipe's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="keep shards and runs here (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = json.loads(args.override)
    chosen = None if args.methods is None else set(args.methods.split(","))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-real-cells-"))
    print(f"work dir {work}; {args.steps} steps per run; torch threads {args.threads}", flush=True)
    built: dict[str, dict] = {}

    def dataset_of(name: str) -> dict:
        if name not in built:
            built[name] = build_set(name, work)
        return built[name]

    rows = []
    for name in args.sets.split(","):
        dataset = dataset_of(name)
        methods = [m for m in DEFAULT_METHODS[name] if chosen is None or m in chosen]
        shards = write_shard_set(dataset["images"], work / name, samples_per_shard=256, validation_fraction=0.1)["dir"]
        baselines: dict[str, dict] = {}
        for method in methods:
            settings = {**COMMON, **RECIPES[method], **overrides.get(method, {})}
            settings.update(steps=args.steps, image_size=dataset["size"], validate_every=settings["checkpoint_every"])
            train_shards = shards
            if method == "weak_label":
                train_shards = other_sets_shards(name, dataset["size"], dataset_of, work)
            path, card = run_method(settings, train_shards, work / name / method)
            trained = evaluate(build_backbone(settings["backbone"], weights=path), dataset)
            architecture = settings["backbone"]
            if architecture not in baselines:
                baselines[architecture] = evaluate(random_init_backbone(architecture, seed=settings["seed"]), dataset)
            random = baselines[architecture]
            gain = trained["accuracy"] - random["accuracy"]
            rows.append(
                {
                    "set": name,
                    "n": trained["n"],
                    "method": method,
                    "backbone": architecture,
                    "steps": settings["steps"],
                    "trained": f"{trained['accuracy']:.3f} ± {trained['ci95']:.3f}",
                    "random init": f"{random['accuracy']:.3f} ± {random['ci95']:.3f}",
                    "gain": round(gain, 3),
                    "intervals disjoint": abs(gain) > trained["ci95"] + random["ci95"],
                    "val kNN last / best @ step": _monitor(card),
                    "warnings": len(card["warnings"]),
                    "train s": round(card["wall_s"]),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(pd.DataFrame(rows).to_markdown(index=False))


def other_sets_shards(name: str, size: int, dataset_of, work: Path) -> Path:
    """Shards of every other real set at the same image size, plus hpa_toy, labels prefixed."""
    family = name.split("_")[0]
    others = [other for other, (_, opts) in SETS.items() if other.split("_")[0] != family and opts["size"] == size]
    images = [
        {**image, "label": f"{other}-{image['label']}"} for other in others for image in dataset_of(other)["images"]
    ]
    images += [{**image, "label": f"hpa-{image['label']}"} for image in hpa_images(size)]
    return write_shard_set(images, work / f"not-{name}", samples_per_shard=256)["dir"]


def _monitor(card: dict) -> str:
    last = card["final_metrics"].get("val_knn_accuracy")
    best = card["best"].get("value")
    return "—" if last is None else f"{last:.2f} / {best:.2f} @ {card['best']['step']}"


if __name__ == "__main__":
    main()
