"""The clustering protocol (evaluation.protocols.clustering): NMI and ARI as scikit-learn computes
them, unsupervised accuracy against a brute-force matching, the random-cluster floor, a model's
own clusters, the summary rows and the profiles: path on the real Ljosa wells."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pandas as pd
import pytest
import yaml
from cell_images import DATA
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.preprocessing import StandardScaler

from cytopretrain import REPO_ROOT
from cytopretrain.core.config import validate_config
from cytopretrain.core.errors import EvaluationError
from cytopretrain.evaluation.evaluate import evaluate_benchmark
from cytopretrain.evaluation.profiles import evaluate_profiles
from cytopretrain.evaluation.protocols import CLUSTER_COLUMN, clustering
from cytopretrain.evaluation.protocols.clustering import score_assignment, unsupervised_accuracy
from cytopretrain.evaluation.summary import summarize

BBBC021 = DATA / "bbbc021"


def blobs(n: int = 240, k: int = 4, features: int = 8, seed: int = 0) -> pd.DataFrame:
    """A profile table of ``k`` labelled groups with unequal scales per feature."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    centres = rng.normal(size=(k, features)) * 2.0
    values = (centres[labels] + rng.normal(size=(n, features))) * np.geomspace(0.5, 20, features)
    frame = pd.DataFrame(values, columns=[f"f{i}" for i in range(features)])
    frame.insert(0, "Metadata_idx", [f"i{i}" for i in range(n)])
    frame.insert(1, "Metadata_phenotype", [f"L{label}" for label in labels])
    return frame


def brute_force_accuracy(labels, clusters) -> int:
    """The most rows any one-to-one matching of clusters to labels gets right (every injection)."""
    classes, cluster_ids = sorted(set(labels)), sorted(set(clusters))
    small, large = (cluster_ids, classes) if len(cluster_ids) <= len(classes) else (classes, cluster_ids)
    best = 0
    for image in itertools.permutations(large, len(small)):
        pairs = dict(zip(small, image))
        if small is cluster_ids:
            hits = sum(pairs[c] == label for label, c in zip(labels, clusters))
        else:
            hits = sum(pairs[label] == c for label, c in zip(labels, clusters))
        best = max(best, hits)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_unsupervised_accuracy_equals_brute_force_matching(seed):
    rng = np.random.default_rng(seed)
    n_labels, n_clusters = rng.integers(2, 5), rng.integers(2, 6)  # fewer, as many and more clusters
    labels = rng.choice([f"L{i}" for i in range(n_labels)], size=30)
    clusters = np.where(rng.random(30) < 0.5, [int(label[1:]) for label in labels], rng.integers(0, n_clusters, 30))
    correct, matching = unsupervised_accuracy(labels, clusters)
    assert correct == brute_force_accuracy(labels.tolist(), clusters.tolist())
    assert sum(matching.get(str(c)) == label for label, c in zip(labels, clusters)) == correct
    assert len(set(matching.values())) == len(matching)  # one to one


def test_unsupervised_accuracy_by_hand():
    # Clusters 7 and 3 swap the names of a and b; cluster 5 is mostly c, once a.
    labels = np.array(["a", "a", "a", "b", "b", "c", "c", "c"])
    clusters = np.array([7, 7, 5, 3, 3, 5, 5, 3])
    correct, matching = unsupervised_accuracy(labels, clusters)
    assert (correct, matching) == (6, {"7": "a", "3": "b", "5": "c"})


def test_kmeans_scores_equal_scikit_learn():
    profiles = blobs()
    result = clustering(profiles, label_col="Metadata_phenotype", restarts=5, seed=3)
    values = StandardScaler().fit_transform(profiles.filter(like="f").to_numpy())
    predicted = KMeans(n_clusters=4, n_init=5, random_state=3).fit_predict(values)
    labels = profiles["Metadata_phenotype"].to_numpy()
    metrics = result["kmeans"]["metrics"]
    assert metrics["nmi"]["value"] == pytest.approx(normalized_mutual_info_score(labels, predicted), abs=1e-12)
    assert metrics["ari"]["value"] == pytest.approx(adjusted_rand_score(labels, predicted), abs=1e-12)
    correct = brute_force_accuracy(labels.tolist(), predicted.tolist())
    assert result["kmeans"]["correct"] == correct
    assert metrics["unsupervised_accuracy"]["value"] == pytest.approx(correct / len(labels))
    # Separable groups: far above the floor, which lies where chance does.
    assert metrics["nmi"]["value"] > 0.8 and metrics["nmi"]["floor"] < 0.05
    assert abs(metrics["ari"]["floor"]) < 0.02
    assert 0.25 <= metrics["unsupervised_accuracy"]["floor"] < 0.4
    assert all(metrics[m]["p_value"] == pytest.approx(1 / 101) for m in metrics)
    table = np.array(result["kmeans"]["contingency"]["matrix"])
    assert table.sum() == len(profiles) and table.shape == (4, 4)
    assert np.trace(table) == correct  # clusters ordered by their matched label


def test_pca_option_and_reproducibility():
    profiles = blobs(features=12)
    result = clustering(profiles, label_col="Metadata_phenotype", n_components=3, restarts=4, seed=1)
    values = PCA(n_components=3, random_state=1).fit_transform(
        StandardScaler().fit_transform(profiles.filter(like="f").to_numpy())
    )
    predicted = KMeans(n_clusters=4, n_init=4, random_state=1).fit_predict(values)
    nmi = normalized_mutual_info_score(profiles["Metadata_phenotype"], predicted)
    assert result["kmeans"]["metrics"]["nmi"]["value"] == pytest.approx(nmi, abs=1e-12)
    again = clustering(profiles.sample(frac=1, random_state=0), label_col="Metadata_phenotype")
    first = clustering(profiles, label_col="Metadata_phenotype")
    assert again["kmeans"]["metrics"]["ari"]["value"] == pytest.approx(first["kmeans"]["metrics"]["ari"]["value"])


def test_floor_of_random_clusters_is_chance():
    rng = np.random.default_rng(5)
    labels = rng.choice(["a", "b", "c"], size=300, p=[0.6, 0.3, 0.1])
    clusters = rng.integers(0, 3, 300)  # unrelated to the labels
    score = score_assignment(labels, clusters, permutations=200, seed=0)
    for metric in ("nmi", "ari", "unsupervised_accuracy"):
        part = score["metrics"][metric]
        assert part["floor"] - 0.05 < part["value"] < part["floor_p95"] + 0.05
        assert part["p_value"] > 0.01
    assert score["metrics"]["unsupervised_accuracy"]["floor"] > 1 / 3  # matching finds some agreement


def test_own_clusters_are_scored_beside_kmeans_and_become_summary_rows():
    profiles = blobs(n=60, k=3)
    truth = profiles["Metadata_phenotype"].str[1:].astype(int)
    own = pd.DataFrame({"Metadata_idx": profiles["Metadata_idx"], "cluster": (truth + 1) % 3})
    own = own.iloc[5:]  # five images without a cluster
    benchmark = {"source": "s", "protocols": ["clustering"]}
    record, _ = evaluate_benchmark(profiles, benchmark, "blobs", "dec_run", clusters=own)
    result = record["results"]["clustering"]
    assert result["own"]["n_unassigned"] == 5 and result["own"]["n"] == 55
    assert result["own"]["metrics"]["unsupervised_accuracy"]["value"] == 1.0
    assert result["own"]["metrics"]["nmi"]["value"] == pytest.approx(1.0)
    summary = summarize([record])
    assert len(summary) == 6
    assert set(zip(summary["subset"], summary["metric"])) == {
        (subset, metric) for subset in ("kmeans", "own") for metric in ("nmi", "ari", "unsupervised_accuracy")
    }
    assert summary["floor"].notna().all()
    assert summary.loc[summary["metric"] != "unsupervised_accuracy", "ci95"].isna().all()


def test_bad_input_is_named():
    profiles = blobs(n=20, k=2)
    with pytest.raises(EvaluationError, match="at least 2 are needed"):
        clustering(profiles.assign(Metadata_phenotype="x"), label_col="Metadata_phenotype")
    with pytest.raises(EvaluationError, match="several labels"):
        clustering(profiles.assign(Metadata_phenotype="a|b"), label_col="Metadata_phenotype")
    with pytest.raises(EvaluationError, match="n_components=50"):
        clustering(profiles, label_col="Metadata_phenotype", n_components=50)
    with pytest.raises(EvaluationError, match="assigns no row"):
        clustering(profiles.assign(**{CLUSTER_COLUMN: pd.NA}), label_col="Metadata_phenotype")


@pytest.mark.skipif(not BBBC021.is_dir(), reason=f"real BBBC021 data not found at {BBBC021}")
def test_ljosa_wells_cluster_by_moa_through_profiles():
    """The profiles: path (real per-well CellProfiler means): treated wells aggregated per
    compound and dose, k-means with k = 12 MOAs on them; NMI as scikit-learn computes it."""
    spec = copy.deepcopy(
        yaml.safe_load((REPO_ROOT / "config" / "experiments" / "bbbc021_profiles.yaml").read_text())["profiles"][
            "ljosa2013_cellprofiler"
        ]
    )
    spec["protocols"] = ["clustering"]
    spec["clustering"] = {"n_components": 20, "restarts": 5}
    config = {"sources": {"t": {"path": "/t", "role": "files"}}, "profiles": {"ljosa": spec}}
    spec["path"] = {"source": "t", "file": "wells.csv.gz"}
    for join in spec["join"]:
        join["path"] = {"source": "t", "file": "table.csv"}
    spec = validate_config(config)["profiles"]["ljosa"]
    files = {
        "path": str(BBBC021 / "ljosa_jbiomolscreen_2013_per_well_mean.csv.gz"),
        "join": [str(BBBC021 / "BBBC021_v1_image.csv.gz"), str(BBBC021 / "BBBC021_v1_moa.csv")],
    }
    record, _ = evaluate_profiles("ljosa", spec, files)
    result = record["results"]["clustering"]
    assert result["n_classes"] == 12 and result["n"] == 103  # treatments with a MOA, controls left out
    nmi = result["kmeans"]["metrics"]["nmi"]
    assert nmi["value"] > nmi["floor_p95"]  # MOAs cluster better than chance
    table = np.array(result["kmeans"]["contingency"]["matrix"])
    assert table.sum() == result["n"]
