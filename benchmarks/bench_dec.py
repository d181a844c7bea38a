"""Does DEC cluster real cells better than k-means on random-init features of its backbone?

On ``../shared/data/yeast_toy`` (1,642 real yeast cells, GFP + RFP, 64 px; 5 tagged proteins:
the label, never shown to the training) it writes shards of the whole cells (each channel
min-max scaled to uint8; 10 % held out for validation), trains a ``dec`` run (ResNet-18,
2 input channels) and scores, on the training crops, against the protein labels (the
clustering protocol's NMI, ARI and unsupervised accuracy, each with its random-label floor):

- ``random_init kmeans``: k-means (k = 5, 20 restarts) on the z-scored pooled features of the
  same backbone at random init (the run's seed) — the baseline;
- ``dec start``: DEC's assignments right after its k-means initialisation on the stage-1
  (autoencoder) latent codes, read from the checkpoint at ``pretrain_steps``;
- ``dec own``: DEC's final assignments (clusters.parquet);
- ``dec_backbone kmeans``: k-means on the z-scored pooled features of the trained backbone.

The run is trained in two calls (stopped at ``pretrain_steps``, then resumed), as a killed
job would be. Figures and timing: benchmarks/README.md, "bench_dec".

    python benchmarks/bench_dec.py [--steps 600] [--pretrain-steps 300] [--latent-dim 10] ...
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

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(TESTS))

from cell_images import to_uint8  # noqa: E402
from shard_builders import write_shard_set  # noqa: E402

from cytopretrain.core.kmeans import kmeans  # noqa: E402
from cytopretrain.core.numerics import zscore  # noqa: E402
from cytopretrain.evaluation.features import random_init_backbone  # noqa: E402
from cytopretrain.evaluation.protocols.clustering import score_assignment  # noqa: E402
from cytopretrain.learning import data, train  # noqa: E402
from cytopretrain.learning.checkpoints import checkpoint_path  # noqa: E402
from cytopretrain.learning.models import load_backbone  # noqa: E402

YEAST = DATA / "yeast_toy" / "images"


def yeast_cells() -> list[dict]:
    """Every yeast_toy cell as a shard image: (64, 64, 2) uint8 GFP + RFP, labelled by protein."""
    cells = []
    for protein in sorted(p.name for p in YEAST.iterdir()):
        for gfp in sorted((YEAST / protein).glob("*_gfp.tif")):
            rfp = gfp.with_name(gfp.name.replace("_gfp.tif", "_rfp.tif"))
            pixels = to_uint8([tifffile.imread(gfp), tifffile.imread(rfp)])
            cells.append({"idx": f"yeast-{len(cells)}", "label": protein, "crops": [pixels]})
    return cells


def pooled_features(backbone, settings: dict, shards: Path) -> tuple[list[str], np.ndarray]:
    """The backbone's pooled features of every training crop as the run saw it (epoch 0's cut)."""
    loader = data.make_loader(
        shards,
        "train",
        batch_size=64,
        image_size=settings["image_size"],
        in_channels=settings["in_channels"],
        seed=settings["seed"],
        epoch=0,
        num_workers=0,
        drop_last=False,
    )
    backbone.eval()
    ids, rows = [], []
    with torch.no_grad():
        for batch in loader:
            rows.append(backbone(batch["image"]).numpy())
            ids += batch["crop_id"]
    return ids, np.concatenate(rows)


def kmeans_of(ids: list[str], features: np.ndarray, k: int, seed: int) -> pd.Series:
    clusters, _ = kmeans(zscore(features.astype(np.float64)), k, restarts=20, seed=seed)
    return pd.Series(clusters, index=ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--update-interval", type=int, default=23, help="about one epoch of the training crops")
    parser.add_argument("--latent-dim", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--reconstruction-weight", type=float, default=0.0)
    parser.add_argument("--tol", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="folder for the shards and the run (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        cells = yeast_cells()
        written = write_shard_set(cells, root, samples_per_shard=256, validation_fraction=0.1)
        shards, labels_of = written["dir"], {cid: row["label"] for cid, row in written["crops"].items()}
        settings = {
            "method": "dec",
            "backbone": "resnet18",
            "in_channels": 2,
            "image_size": 64,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "lr": args.lr,
            "warmup_steps": 20,
            "checkpoint_every": args.pretrain_steps,
            "log_every": 25,
            "validate_every": 100,
            "seed": args.seed,
            "num_workers": 1,
            "progress": False,
            "method_options": {
                "n_clusters": 5,
                "pretrain_steps": args.pretrain_steps,
                "update_interval": args.update_interval,
                "latent_dim": args.latent_dim,
                "reconstruction_weight": args.reconstruction_weight,
                "tol": args.tol,
            },
        }
        run = root / "run"
        started = time.perf_counter()
        train.train(settings, shards, run, max_steps_this_run=args.pretrain_steps)
        start_state = torch.load(checkpoint_path(run, args.pretrain_steps), weights_only=True)["method_state"]
        result = train.train(settings, shards, run)
        minutes = (time.perf_counter() - started) / 60
        card = json.loads((run / "model_card.json").read_text())
        details = card["method_details"]

        own = pd.read_parquet(run / "clusters.parquet").set_index("crop_id")["cluster"]
        ids, random_features = pooled_features(
            random_init_backbone("resnet18", in_channels=2, seed=args.seed), settings, shards
        )
        trained = load_backbone(run / "backbone.pt", "resnet18", in_channels=2)
        _, dec_features = pooled_features(trained, settings, shards)
        assignments = {
            "random_init kmeans": kmeans_of(ids, random_features, 5, args.seed),
            "dec start": pd.Series(start_state["assignments"].numpy(), index=start_state["crop_ids"]),
            "dec own": own,
            "dec_backbone kmeans": kmeans_of(ids, dec_features, 5, args.seed),
        }
        print(
            f"yeast_toy: {len(ids)} training crops of {len(cells)} cells, 5 proteins; dec: {result['step']} steps "
            f"(stages {[(s['stage'], s['first_step'], s['last_step']) for s in details['stages']]}, "
            f"converged {details['converged']}), {minutes:.1f} min; options {settings['method_options']}"
        )
        print("changed share at each target update:", [(u["step"], u["changed"]) for u in details["target_updates"]])
        print(f"final metrics: {card['final_metrics']}")
        print(f"{'assignment':22s} {'NMI (floor)':>16s} {'ARI (floor)':>16s} {'accuracy (floor)':>18s}  clusters")
        for name, clusters in assignments.items():
            truth = np.array([labels_of[c] for c in clusters.index])
            score = score_assignment(truth, clusters.to_numpy(), permutations=100, seed=0)
            cells_text = "  ".join(
                f"{score['metrics'][m]['value']:.3f} ({score['metrics'][m]['floor']:.3f})"
                for m in ("nmi", "ari", "unsupervised_accuracy")
            )
            sizes = np.bincount(clusters.to_numpy(), minlength=5).tolist()
            print(f"{name:22s} {cells_text}  sizes {sizes}")


if __name__ == "__main__":
    main()
