"""Helpers every protocol shares: column checks, the feature matrix, accuracy results, votes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cytopretrain.core.errors import EvaluationError
from cytopretrain.evaluation.profile_tables import METADATA_PREFIX, feature_columns, metadata_columns, non_numeric

NO_PREDICTION = "<none>"


def require_columns(profiles: pd.DataFrame, columns: Sequence[str], protocol: str) -> None:
    if not isinstance(profiles, pd.DataFrame):
        raise EvaluationError(f"{protocol}: profiles must be a pandas DataFrame, got {type(profiles).__name__}")
    missing = [c for c in columns if c not in profiles.columns]
    if missing:
        raise EvaluationError(
            f"{protocol}: column(s) {missing} not in the profile table (metadata columns: {metadata_columns(profiles)})"
        )


def feature_matrix(profiles: pd.DataFrame, protocol: str) -> np.ndarray:
    """Feature matrix (rows x features), float32 if all features are float32, else float64."""
    columns = feature_columns(profiles)
    if not columns:
        raise EvaluationError(f"{protocol}: no feature columns (every column starts with {METADATA_PREFIX!r})")
    text = non_numeric(profiles, columns)
    if text:
        raise EvaluationError(
            f"{protocol}: non-numeric feature column(s) {text[:5]}; "
            f"metadata columns must start with {METADATA_PREFIX!r}"
        )
    dtype = np.float32 if all(profiles[c].dtype == np.float32 for c in columns) else np.float64
    values = np.ascontiguousarray(profiles[columns].to_numpy(dtype=dtype))
    bad = ~np.isfinite(values).all(axis=0)
    if bad.any():
        raise EvaluationError(
            f"{protocol}: NaN or infinite values in feature column(s) {[columns[i] for i in np.flatnonzero(bad)][:5]}"
        )
    return values


def label_values(profiles: pd.DataFrame, column: str, protocol: str) -> np.ndarray:
    missing = profiles[column].isna()
    if missing.any():
        raise EvaluationError(f"{protocol}: {int(missing.sum())} row(s) without a value in {column!r}")
    return profiles[column].astype(str).to_numpy()


# --- results -------------------------------------------------------------------------------


def ci95(accuracy: float, n: int) -> float:
    return float(1.96 * np.sqrt(accuracy * (1 - accuracy) / n))


def accuracy_result(protocol: str, y_true: np.ndarray, y_pred: Sequence, **details) -> dict:
    """The common result dict (module docstring) of true labels and predictions (None allowed)."""
    truth = [str(t) for t in y_true]
    predicted = [NO_PREDICTION if p is None else str(p) for p in y_pred]
    n = len(truth)
    if n == 0:
        raise EvaluationError(f"{protocol}: nothing to evaluate (0 rows)")
    hits = np.array([t == p for t, p in zip(truth, predicted)])
    accuracy = float(hits.mean())
    labels = sorted(set(truth) | set(predicted) - {NO_PREDICTION})
    if NO_PREDICTION in predicted:
        labels.append(NO_PREDICTION)
    position = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(matrix, ([position[t] for t in truth], [position[p] for p in predicted]), 1)
    per_class = {}
    for label in sorted(set(truth)):
        rows = np.array([t == label for t in truth])
        per_class[label] = {
            "n": int(rows.sum()),
            "correct": int(hits[rows].sum()),
            "accuracy": float(hits[rows].mean()),
        }
    return {
        "protocol": protocol,
        "n": n,
        "correct": int(hits.sum()),
        "accuracy": accuracy,
        "ci95": ci95(accuracy, n),
        "per_class": per_class,
        "confusion": {"labels": labels, "matrix": matrix.tolist()},
        **details,
    }


def vote(neighbour_codes: np.ndarray) -> np.ndarray:
    """Majority label code per row of (n, k) neighbour codes, nearest first; -1 = missing.

    Ties between labels go to the tied label whose nearest neighbour comes first: for each
    neighbour position the count of its label is taken, and argmax returns the first maximum.
    Rows without any neighbour get -1.
    """
    valid = neighbour_codes >= 0
    same = neighbour_codes[:, :, None] == neighbour_codes[:, None, :]
    counts = (same & valid[:, None, :]).sum(axis=2)
    counts[~valid] = -1
    winner = counts.argmax(axis=1)
    codes = neighbour_codes[np.arange(len(neighbour_codes)), winner]
    return np.where(valid.any(axis=1), codes, -1)


def decode(codes: np.ndarray, names: np.ndarray) -> list:
    return [names[c] if c >= 0 else None for c in codes]


def as_matrix(data: pd.DataFrame | np.ndarray, protocol: str) -> np.ndarray:
    if isinstance(data, pd.DataFrame):
        return feature_matrix(data, protocol)
    values = np.asarray(data)
    if values.ndim != 2 or not np.issubdtype(values.dtype, np.number):
        raise EvaluationError(f"{protocol}: expected a 2-D numeric array or a profile table, got {values.shape}")
    if not np.isfinite(values).all():
        raise EvaluationError(f"{protocol}: NaN or infinite values in the values")
    return values
