"""Seed 003's pair query: "same class?" answered by a cosine-similarity threshold, and rank-10
retrieval (mean average precision is in mean_ap)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cytopretrain.core.errors import EvaluationError
from cytopretrain.evaluation.knn import knn
from cytopretrain.evaluation.protocols.common import (
    accuracy_result,
    feature_matrix,
    label_values,
    require_columns,
)


def pair_threshold(
    profiles: pd.DataFrame,
    *,
    label_col: str = "Metadata_label",
    seed: int = 0,
    n_pairs: int = 2000,
    validation_fraction: float = 0.5,
    retrieval_k: int = 10,
    retrieval_metric: str = "euclidean",
) -> dict:
    """Seed 003: "same class?" answered by a cosine-similarity threshold; rank-10 retrieval.

    Rows are split into a validation and a test part, per label: the label's rows shuffled with
    numpy's default_rng(seed), the first round(validation_fraction * size) to validation. In
    each part, n_pairs // 2 same-label and n_pairs // 2 different-label pairs of distinct rows
    are drawn uniformly (with replacement across pairs). Similarity = cosine of the features
    as given. A pair is predicted "same" when similarity >= threshold; the threshold maximizes
    validation accuracy among the midpoints between consecutive distinct validation
    similarities and one value below / above them all (ties: the smallest threshold). The top
    level reports test-pair accuracy (labels "same" / "different"). Retrieval: each row's
    ``retrieval_k`` nearest other rows over the whole table (``retrieval_metric`` on the
    features as given, as seed 003 ranks by Euclidean distance); precision = share of them with
    the query's label, averaged over rows (retrieval_precision). Details: threshold,
    validation_accuracy, seed.
    """
    require_columns(profiles, [label_col], "pair_threshold")
    labels = label_values(profiles, label_col, "pair_threshold")
    values = feature_matrix(profiles, "pair_threshold")
    rng = np.random.default_rng(seed)
    validation = np.zeros(len(labels), dtype=bool)
    for label in sorted(set(labels)):
        rows = rng.permutation(np.flatnonzero(labels == label))
        validation[rows[: int(round(validation_fraction * len(rows)))]] = True
    unit = values.astype(np.float64) / np.maximum(
        np.linalg.norm(values.astype(np.float64), axis=1, keepdims=True), 1e-300
    )
    parts = {}
    for name, rows in (("validation", np.flatnonzero(validation)), ("test", np.flatnonzero(~validation))):
        first, second, same = _sample_pairs(rows, labels, n_pairs // 2, rng, name)
        parts[name] = ((unit[first] * unit[second]).sum(axis=1), same)
    threshold, validation_accuracy = _best_threshold(*parts["validation"])
    similarity, same = parts["test"]
    y_true = np.where(same, "same", "different")
    y_pred = np.where(similarity >= threshold, "same", "different")
    _, neighbours = knn(values, None, retrieval_k, metric=retrieval_metric, exclude_self=True)
    hits = np.where(neighbours >= 0, labels[neighbours] == labels[:, None], False)
    return accuracy_result(
        "pair_threshold",
        y_true,
        list(y_pred),
        threshold=threshold,
        validation_accuracy=validation_accuracy,
        seed=seed,
        retrieval_k=retrieval_k,
        retrieval_metric=retrieval_metric,
        retrieval_precision=float(hits.mean()),
    )


def _sample_pairs(
    rows: np.ndarray, labels: np.ndarray, n_each: int, rng: np.random.Generator, part: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n_each same-label and n_each different-label pairs of distinct rows, drawn uniformly."""
    names, counts = np.unique(labels[rows], return_counts=True)
    same_pairs = counts * (counts - 1) / 2
    if same_pairs.sum() == 0 or len(names) < 2:
        raise EvaluationError(f"pair_threshold: the {part} part needs a label with two rows and two labels")
    # Same-label pairs: label drawn with probability ∝ its number of pairs, then two rows.
    chosen = rng.choice(len(names), size=n_each, p=same_pairs / same_pairs.sum())
    first, second = [], []
    for label_index, count in zip(*np.unique(chosen, return_counts=True)):
        members = rows[labels[rows] == names[label_index]]
        a = rng.integers(0, members.size, size=count)
        b = rng.integers(0, members.size - 1, size=count)
        b += b >= a  # a second, different member
        first.append(members[a])
        second.append(members[b])
    # Different-label pairs: uniform pairs of rows, rejecting same-label ones.
    diff_first, diff_second = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    while diff_first.size < n_each:
        a, b = rng.choice(rows, size=2 * n_each), rng.choice(rows, size=2 * n_each)
        keep = labels[a] != labels[b]
        diff_first, diff_second = np.r_[diff_first, a[keep]], np.r_[diff_second, b[keep]]
    first = np.concatenate(first + [diff_first[:n_each]])
    second = np.concatenate(second + [diff_second[:n_each]])
    same = np.r_[np.ones(n_each, dtype=bool), np.zeros(n_each, dtype=bool)]
    return first, second, same


def _best_threshold(similarity: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """Threshold (predict same when similarity >= it) with the best accuracy; smallest on ties."""
    values = np.unique(similarity)
    candidates = np.r_[values[0] - 1.0, (values[:-1] + values[1:]) / 2, values[-1] + 1.0]
    # For each candidate, pairs at or above it are "same": count correct answers on both sides.
    order = np.argsort(similarity)
    sorted_sim, sorted_same = similarity[order], same[order]
    below = np.searchsorted(sorted_sim, candidates, side="left")
    different_below = np.r_[0, np.cumsum(~sorted_same)][below]
    same_above = sorted_same.sum() - np.r_[0, np.cumsum(sorted_same)][below]
    accuracy = (different_below + same_above) / len(similarity)
    best = int(np.argmax(accuracy))
    return float(candidates[best]), float(accuracy[best])
