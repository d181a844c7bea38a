"""Seed 000: 2-D embeddings (FastICA or PCA) of profiles and the 1-NN label agreement in them."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from cytopretrain.core.errors import EvaluationError
from cytopretrain.core.numerics import zscore
from cytopretrain.evaluation.knn import knn
from cytopretrain.evaluation.protocols.common import (
    accuracy_result,
    as_matrix,
    decode,
    feature_matrix,
    label_values,
    require_columns,
)

EMBEDDINGS = ("fastica", "pca")


def embedding_2d(profiles: pd.DataFrame | np.ndarray, method: str = "fastica", seed: int = 0) -> np.ndarray:
    """(n, 2) coordinates of the features as given (no scaling), as in seeds 000 and 003.

    "fastica": scikit-learn FastICA(2 components, fun="cube", max_iter=3000, tol=1e-5,
    whiten="unit-variance", random_state=seed), seed 000's settings; "pca": PCA(2, full SVD).
    """
    from sklearn.decomposition import PCA, FastICA

    values = as_matrix(profiles, "embedding_2d").astype(np.float64)
    if values.shape[0] < 3:
        raise EvaluationError("embedding_2d: needs at least three rows")
    if method == "fastica":
        model = FastICA(n_components=2, fun="cube", max_iter=3000, tol=1e-5, whiten="unit-variance", random_state=seed)
    elif method == "pca":
        model = PCA(n_components=2, svd_solver="full")
    else:
        raise EvaluationError(f"embedding_2d: method must be 'fastica' or 'pca', got {method!r}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FastICA did not converge")
        return model.fit_transform(values)


def nn_agreement(
    profiles: pd.DataFrame, *, label_col: str = "Metadata_label", space: str = "fastica", seed: int = 0
) -> dict:
    """Seed 000 "consensus": share of rows whose nearest other row has the same label.

    Nearest = Euclidean 1-NN (the row itself excluded; ties to the earlier row) in
    ``space``: "fastica" or "pca" = the ``embedding_2d`` coordinates (seed 000 measured it in
    its FastICA plane: 600 of 1000), "features" = the z-scored features (StandardScaler fit on
    all rows). The result's predicted label is the neighbour's; accuracy = agreement.
    Details: space, seed.
    """
    require_columns(profiles, [label_col], "nn_agreement")
    labels = label_values(profiles, label_col, "nn_agreement")
    if space == "features":
        coordinates = zscore(feature_matrix(profiles, "nn_agreement"))
    elif space in ("fastica", "pca"):
        coordinates = embedding_2d(profiles, method=space, seed=seed)
    else:
        raise EvaluationError(f"nn_agreement: space must be 'fastica', 'pca' or 'features', got {space!r}")
    _, neighbours = knn(coordinates, None, 1, exclude_self=True)
    return accuracy_result("nn_agreement", labels, decode(neighbours[:, 0], labels), space=space, seed=seed)
