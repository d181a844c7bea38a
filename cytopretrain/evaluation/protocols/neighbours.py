"""kNN classification: COOS-7's hold-out protocol and CyCLOPS's leave-one-out protocol."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cytopretrain.core.errors import EvaluationError
from cytopretrain.core.numerics import zscore
from cytopretrain.evaluation.knn import knn
from cytopretrain.evaluation.protocols.common import (
    accuracy_result,
    decode,
    feature_matrix,
    label_values,
    require_columns,
    vote,
)


def knn_holdout(
    profiles: pd.DataFrame,
    *,
    label_col: str = "Metadata_label",
    split_col: str = "Metadata_split",
    train_split: str = "train",
    k: int = 11,
) -> dict:
    """COOS-7 protocol: k-NN from the training split to every other split.

    StandardScaler fit on the rows whose ``split_col`` equals ``train_split``; every other row is
    a query; its k nearest training rows by Euclidean distance on the z-scored features vote
    (module docstring: majority, ties to the tied label with the nearest neighbour). The top
    level pools all non-train rows; ``splits`` holds one result per split (e.g. test1..test4),
    sorted by name. Details: k, n_train.
    """
    require_columns(profiles, [label_col, split_col], "knn_holdout")
    labels = label_values(profiles, label_col, "knn_holdout")
    splits = profiles[split_col].astype(str).to_numpy()
    train = splits == str(train_split)
    if not train.any() or train.all():
        raise EvaluationError(f"knn_holdout: {split_col!r} needs rows equal to {train_split!r} and other rows")
    z = zscore(feature_matrix(profiles, "knn_holdout"), train)
    names, train_codes = np.unique(labels[train], return_inverse=True)
    _, neighbours = knn(z[~train], z[train], k)
    predicted = np.array(decode(vote(np.where(neighbours >= 0, train_codes[neighbours], -1)), names), dtype=object)
    query_labels, query_splits = labels[~train], splits[~train]
    per_split = {
        split: accuracy_result(
            "knn_holdout", query_labels[query_splits == split], predicted[query_splits == split], split=split, k=k
        )
        for split in sorted(set(query_splits))
    }
    return accuracy_result("knn_holdout", query_labels, predicted, k=k, n_train=int(train.sum()), splits=per_split)


def knn_loo(profiles: pd.DataFrame, *, label_col: str = "Metadata_label", k: int = 11) -> dict:
    """CyCLOPS protocol: leave-one-out k-NN over all rows.

    StandardScaler fit on all rows; each row's k nearest other rows (Euclidean, z-scored; the
    row itself excluded, its exact duplicates kept) vote as in the module docstring.
    Details: k.
    """
    require_columns(profiles, [label_col], "knn_loo")
    labels = label_values(profiles, label_col, "knn_loo")
    if len(labels) < 2:
        raise EvaluationError("knn_loo: needs at least two rows")
    names, codes = np.unique(labels, return_inverse=True)
    _, neighbours = knn(zscore(feature_matrix(profiles, "knn_loo")), None, k, exclude_self=True)
    predicted = decode(vote(np.where(neighbours >= 0, codes[neighbours], -1)), names)
    return accuracy_result("knn_loo", labels, predicted, k=k)
