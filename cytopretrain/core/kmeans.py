"""Reproducible k-means, shared by DEC's centre initialisation and the clustering protocol.

Its own module, apart from core.numerics, because it needs scikit-learn and threadpoolctl,
which only the training environment carries (curation and download rules import numerics).
"""

from __future__ import annotations

import numpy as np


def kmeans(values: np.ndarray, n_clusters: int, *, restarts: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means of the rows: (labels (n,) int64, centres (n_clusters, d) float64).

    scikit-learn's KMeans (Lloyd, k-means++ seeding, ``restarts`` seeded starts, the one of least
    inertia kept), on one thread: its multi-threaded reduction adds partial sums in the order
    the threads finish, so only one thread gives the same centres bit for bit on every run
    (DEC's exact resume, reproducible evaluations).
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or len(values) < n_clusters:
        raise ValueError(f"k-means needs a 2-D array of at least {n_clusters} rows, got shape {values.shape}")
    with threadpool_limits(limits=1):
        model = KMeans(n_clusters=n_clusters, n_init=restarts, random_state=seed).fit(values)
    return model.labels_.astype(np.int64), model.cluster_centers_
