"""Clustering without labels: do the profiles fall into the classes by themselves?

What a scientist exploring an unlabelled screen asks first ("how many phenotypes are there, and
which images go together?"), scored against the benchmark's labels: k-means with k = the number
of classes, and, for a model that assigns clusters itself (DEC), its own assignments.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from cytopretrain.core.errors import EvaluationError
from cytopretrain.core.kmeans import kmeans
from cytopretrain.core.numerics import zscore
from cytopretrain.evaluation.protocols.common import ci95, feature_matrix, label_values, require_columns

# A model's own cluster of each profile row (integer; missing where the model assigned none),
# added by the evaluate rule for runs whose method assigns clusters (learning.pretext.DEC).
CLUSTER_COLUMN = "Metadata_cluster"
METRICS = ("nmi", "ari", "unsupervised_accuracy")


def unsupervised_accuracy(labels: np.ndarray, clusters: np.ndarray) -> tuple[int, dict[str, str]]:
    """Rows whose cluster is matched to their label, with the best one-to-one matching of
    clusters to labels (Hungarian algorithm, scipy's linear_sum_assignment on the contingency
    table, maximizing the matched rows), and that matching (cluster -> label, as strings).
    With more clusters than labels the unmatched clusters' rows count as wrong, and with fewer,
    the unmatched labels' rows."""
    classes, class_codes = np.unique(labels, return_inverse=True)
    cluster_ids, cluster_codes = np.unique(clusters, return_inverse=True)
    table = contingency_matrix(class_codes, cluster_codes)
    rows, columns = linear_sum_assignment(table, maximize=True)
    matching = {str(cluster_ids[c]): str(classes[r]) for r, c in zip(rows, columns)}
    return int(table[rows, columns].sum()), matching


def _scores(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    return {
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "ari": float(adjusted_rand_score(labels, clusters)),
        "unsupervised_accuracy": unsupervised_accuracy(labels, clusters)[0] / len(labels),
    }


def score_assignment(labels: np.ndarray, clusters: np.ndarray, *, permutations: int = 100, seed: int = 0) -> dict:
    """NMI, ARI and unsupervised accuracy of ``clusters`` against ``labels``, each beside its floor.

    NMI: scikit-learn's normalized_mutual_info_score (arithmetic mean of the two entropies);
    ARI: adjusted_rand_score; unsupervised accuracy: see unsupervised_accuracy. The floor of a
    metric is its mean over ``permutations`` random assignments with the same cluster sizes
    (the clusters shuffled over the rows by numpy's default_rng(seed)): NMI and accuracy are
    not zero by chance, and the floor says where chance lies for these class and cluster
    sizes. Per metric: value, floor, floor_p95 (95th percentile of the shuffled values) and
    p_value = (1 + shuffles scoring at least the value) / (1 + permutations). Also n,
    n_clusters, correct and ci95 of the accuracy, the contingency table (labels x clusters, the
    clusters ordered by their matched label, unmatched last) and the matching.
    """
    labels = np.asarray(labels).astype(str)
    clusters = np.asarray(clusters)
    values = _scores(labels, clusters)
    rng = np.random.default_rng(seed)
    shuffled = [_scores(labels, rng.permutation(clusters)) for _ in range(permutations)]
    metrics = {}
    for metric, value in values.items():
        chance = np.array([s[metric] for s in shuffled])
        metrics[metric] = {
            "value": value,
            "floor": float(chance.mean()) if permutations else math.nan,
            "floor_p95": float(np.percentile(chance, 95)) if permutations else math.nan,
            "p_value": float((1 + (chance >= value).sum()) / (1 + permutations)),
        }
    correct, matching = unsupervised_accuracy(labels, clusters)
    classes = np.unique(labels)
    rank = {label: position for position, label in enumerate(classes)}
    order = sorted(np.unique(clusters).tolist(), key=lambda c: (rank.get(matching.get(str(c)), len(classes)), c))
    table = pd.crosstab(pd.Series(labels), pd.Series(clusters)).reindex(index=classes, columns=order, fill_value=0)
    accuracy = metrics["unsupervised_accuracy"]["value"]
    return {
        "n": len(labels),
        "n_clusters": len(order),
        "correct": correct,
        "ci95": ci95(accuracy, len(labels)),
        "metrics": metrics,
        "contingency": {
            "labels": classes.tolist(),
            "clusters": [str(c) for c in order],
            "matrix": table.to_numpy().tolist(),
        },
        "matching": matching,
    }


def clustering(
    profiles: pd.DataFrame,
    *,
    label_col: str = "Metadata_label",
    n_components: int | None = None,
    restarts: int = 20,
    seed: int = 0,
    permutations: int = 100,
) -> dict:
    """How well the profiles cluster into the classes of ``label_col``, without using the labels.

    k-means with k = the number of distinct labels on the features z-scored over all rows
    (StandardScaler), optionally reduced to ``n_components`` principal components first
    (scikit-learn PCA, random_state=seed); ``restarts`` k-means++ starts seeded by ``seed``, the
    one of least inertia kept (core.kmeans.kmeans, single-threaded and so reproducible). Every
    row takes part, controls included, and each label is one class: multi-valued labels
    ("a|b") are refused, a row with two classes belongs to no one cluster. The clusters are
    scored by score_assignment (NMI, ARI, unsupervised accuracy, each with its random-label
    floor; ``permutations`` shuffles seeded by ``seed``) under ``kmeans``. When the table has a
    CLUSTER_COLUMN (a model's own assignments, e.g. DEC's), they are scored too, under
    ``own``, on the rows that have one (``n_unassigned`` counts the others).
    """
    require_columns(profiles, [label_col], "clustering")
    labels = label_values(profiles, label_col, "clustering")
    multi = [label for label in labels if "|" in label]
    if multi:
        raise EvaluationError(
            f"clustering: {len(multi)} row(s) of {label_col!r} hold several labels (e.g. {multi[0]!r}); "
            "clustering needs one class per row"
        )
    classes = np.unique(labels)
    if len(classes) < 2:
        raise EvaluationError(f"clustering: {label_col!r} has {len(classes)} distinct label(s); at least 2 are needed")
    values = zscore(feature_matrix(profiles, "clustering").astype(np.float64))
    if n_components is not None:
        from sklearn.decomposition import PCA

        if not 1 <= n_components <= min(values.shape):
            raise EvaluationError(
                f"clustering: n_components={n_components} must lie between 1 and {min(values.shape)} "
                f"(rows and features of the table)"
            )
        values = PCA(n_components=n_components, random_state=seed).fit_transform(values)
    clusters, _ = kmeans(values, len(classes), restarts=restarts, seed=seed)
    result = {
        "protocol": "clustering",
        "n": len(labels),
        "n_classes": len(classes),
        "n_components": n_components,
        "restarts": restarts,
        "seed": seed,
        "permutations": permutations,
        "kmeans": score_assignment(labels, clusters, permutations=permutations, seed=seed),
    }
    if CLUSTER_COLUMN in profiles.columns:
        own = pd.to_numeric(profiles[CLUSTER_COLUMN], errors="coerce")
        assigned = own.notna().to_numpy()
        if not assigned.any():
            raise EvaluationError(f"clustering: {CLUSTER_COLUMN!r} assigns no row to a cluster")
        scored = score_assignment(
            labels[assigned], own[assigned].astype(np.int64).to_numpy(), permutations=permutations, seed=seed
        )
        result["own"] = {**scored, "n_unassigned": int((~assigned).sum())}
    return result
