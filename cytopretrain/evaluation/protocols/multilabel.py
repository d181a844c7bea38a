"""Seed 001 (HPA): one-vs-rest logistic linear probe, macro F1 over the labels."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from cytopretrain.core.errors import EvaluationError
from cytopretrain.core.numerics import zscore
from cytopretrain.evaluation.protocols.common import (
    feature_matrix,
    require_columns,
)


def multilabel_f1(
    profiles: pd.DataFrame,
    *,
    labels_col: str = "Metadata_labels",
    split_col: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    test_fraction: float = 0.25,
    seed: int = 0,
    C: float = 1.0,
    max_iter: int = 2000,
) -> dict:
    """Seed 001 (HPA): linear probe with macro F1 over labels.

    Labels: ``labels_col`` holds "|"-joined label names per row (blank parts ignored; a row may
    have none). Split: with ``split_col``, rows equal to ``train_split`` train and rows equal to
    ``test_split`` are tested (others unused); without it, a seeded split stratified on each
    row's rarest label (least frequent over the table, ties by name): within each such group
    the rows are shuffled with numpy's default_rng(seed) and round(test_fraction * size) of
    them go to test (so a label seen once never reaches the test set). Features: StandardScaler
    fit on the training rows. Probe: scikit-learn one-vs-rest LogisticRegression (L2, C,
    lbfgs, max_iter), one binary classifier per label, threshold 0.5; a label without positive
    (or negative) training rows predicts its constant. Score: F1 per label over the labels with
    at least one positive test row (a label never predicted has precision 0 and F1 0), macro F1
    = their unweighted mean. Returns protocol, n (test rows), n_train, macro_f1, per_class
    (label -> n_positive, precision, recall, f1), labels_not_in_test, split, seed.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import precision_recall_fscore_support
    from sklearn.multiclass import OneVsRestClassifier

    require_columns(profiles, [labels_col] + ([split_col] if split_col else []), "multilabel_f1")
    sets = [
        frozenset(p.strip() for p in str(v).split("|") if p.strip()) if pd.notna(v) else frozenset()
        for v in profiles[labels_col]
    ]
    names = sorted(set().union(*sets))
    if not names:
        raise EvaluationError(f"multilabel_f1: no labels in {labels_col!r}")
    targets = np.array([[name in s for name in names] for s in sets], dtype=np.int64)
    if split_col:
        split_values = profiles[split_col].astype(str).to_numpy()
        train, test = split_values == train_split, split_values == test_split
        split = f"{split_col}: {train_split!r} / {test_split!r}"
    else:
        test = _rarest_label_split(sets, targets, names, test_fraction, seed)
        train = ~test
        split = f"stratified on rarest label, test_fraction={test_fraction}, seed={seed}"
    if not train.any() or not test.any():
        raise EvaluationError(f"multilabel_f1: empty train ({int(train.sum())}) or test ({int(test.sum())}) set")
    z = zscore(feature_matrix(profiles, "multilabel_f1"), train)
    probe = OneVsRestClassifier(LogisticRegression(C=C, max_iter=max_iter))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Label .* is present in all training examples")
        probe.fit(z[train], targets[train])
    predicted = probe.predict(z[test])
    evaluated = targets[test].sum(axis=0) > 0
    precision, recall, f1, support = precision_recall_fscore_support(
        targets[test][:, evaluated], predicted[:, evaluated], average=None, zero_division=0
    )
    kept = [name for name, e in zip(names, evaluated) if e]
    per_class = {
        name: {"n_positive": int(s), "precision": float(p), "recall": float(r), "f1": float(f)}
        for name, p, r, f, s in zip(kept, precision, recall, f1, support)
    }
    return {
        "protocol": "multilabel_f1",
        "n": int(test.sum()),
        "n_train": int(train.sum()),
        "macro_f1": float(np.mean(f1)),
        "per_class": per_class,
        "labels_not_in_test": [n for n, e in zip(names, evaluated) if not e],
        "split": split,
        "seed": seed,
    }


def _rarest_label_split(
    sets: list[frozenset], targets: np.ndarray, names: list[str], test_fraction: float, seed: int
) -> np.ndarray:
    if not 0 < test_fraction < 1:
        raise EvaluationError(f"multilabel_f1: test_fraction must be in (0, 1), got {test_fraction}")
    frequency = dict(zip(names, targets.sum(axis=0)))
    strata = [min(s, key=lambda name: (frequency[name], name)) if s else "" for s in sets]
    rng = np.random.default_rng(seed)
    test = np.zeros(len(sets), dtype=bool)
    for stratum in sorted(set(strata)):
        rows = rng.permutation(np.flatnonzero(np.array(strata) == stratum))
        test[rows[: int(round(test_fraction * len(rows)))]] = True
    return test
