"""A dec run through the workflow on real yeast cells: train_clustering writes clusters.parquet
and centres.tsv beside the backbone, assign_clusters gives every benchmark image its own
cluster, and summary.tsv holds the clustering rows (kmeans for every model, own for dec)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from workflow_helpers import DATA, check, snakemake, write_config

YEAST = DATA / "yeast_toy" / "images"
pytestmark = [
    pytest.mark.slow,  # about 3 minutes on 2 cores
    pytest.mark.skipif(not YEAST.is_dir(), reason=f"real yeast cells not found at {YEAST}"),
]
CONFIG = {
    "sources": {
        "yeast": {"path": str(YEAST), "adapter": "cyclops", "options": {"category": "gene"}},
        "yeast_eval": {"path": str(YEAST), "adapter": "cyclops", "role": "benchmark"},
    },
    "labels": {"min_count": 20, "take_all_max": 200, "prelim_max": 400},
    "crops": {"rules": [[0, 1]], "min_crop_side": 24, "min_image_side": 48},
    "quality_control": {"min_images_per_label": 30},
    "shards": {"samples_per_shard": 300},
    "training": {
        "runs": {
            "dec": {
                "method": "dec",
                "backbone": "resnet18",
                "image_size": 32,
                "batch_size": 32,
                "steps": 12,
                "checkpoint_every": 6,
                "log_every": 3,
                "validate_every": 6,
                "threads": 1,
                "method_options": {"n_clusters": 5, "pretrain_steps": 6, "update_interval": 3, "kmeans_restarts": 2},
            }
        }
    },
    "features": {"channel_mode": "merge", "resize": 32, "random_baseline": True},
    "benchmarks": {"yeast_protein": {"source": "yeast_eval", "protocols": ["clustering", "knn_loo"]}},
}


def test_dec_run_clusters_and_is_scored_with_its_own_clusters(tmp_path):
    write_config(tmp_path, CONFIG)
    check(snakemake(tmp_path, "-c", "2", "results/eval/summary.tsv"))
    run = tmp_path / "results" / "train" / "dec"
    labels = pd.read_csv(tmp_path / "results" / "shards" / "labels.tsv", sep="\t")
    clusters = pd.read_parquet(run / "clusters.parquet")
    assert len(clusters) == labels["n_train"].sum() and clusters["cluster"].between(0, 4).all()
    centres = pd.read_csv(run / "centres.tsv", sep="\t")
    assert centres["n_crops"].sum() == len(clusters)
    card = json.loads((run / "model_card.json").read_text())
    assert [s["stage"] for s in card["method_details"]["stages"]] == ["pretrain", "clustering"]
    own = pd.read_parquet(tmp_path / "results" / "features" / "yeast_protein" / "dec.clusters.parquet")
    assert len(own) == 1642 and own["Metadata_idx"].is_unique  # every yeast_toy cell
    summary = pd.read_csv(tmp_path / "results" / "eval" / "summary.tsv", sep="\t")
    rows = summary[summary["protocol"] == "clustering"]
    assert set(zip(rows["model"], rows["subset"])) == {("dec", "kmeans"), ("dec", "own"), ("random_dec", "kmeans")}
    assert len(rows) == 9 and rows["floor"].notna().all() and (rows["n"] == 1642).all()
