"""Run a benchmark's protocols on one profile table (the evaluate rule).

A benchmark (config ``benchmarks.<name>``) names its protocols and the canonical column holding
the class (``label``, default phenotype). Protocols read the profile columns
``Metadata_<label>``, ``Metadata_compound``, ``Metadata_concentration``, ``Metadata_batch``
and ``Metadata_split`` written by evaluation.features.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from cytopretrain.evaluation import protocols

# What a benchmark entry means when it leaves a key out (the config schema shows the same).
BENCHMARK_DEFAULTS = {"label": "phenotype", "published": None, "embedding": "pca", "k": 11}

# How each protocol runs on a benchmark's profiles: (profiles, label column, benchmark) -> result.
PROTOCOLS: dict[str, Callable[[pd.DataFrame, str, dict], dict]] = {
    "nsc": lambda profiles, label, benchmark: protocols.nsc(profiles, **_moa_columns(label)),
    "nscb": lambda profiles, label, benchmark: protocols.nscb(
        profiles, **_moa_columns(label), batch_col="Metadata_batch"
    ),
    "knn_holdout": lambda profiles, label, benchmark: protocols.knn_holdout(
        profiles, label_col=label, split_col="Metadata_split", k=benchmark.get("k", BENCHMARK_DEFAULTS["k"])
    ),
    "knn_loo": lambda profiles, label, benchmark: protocols.knn_loo(
        profiles, label_col=label, k=benchmark.get("k", BENCHMARK_DEFAULTS["k"])
    ),
    "map": lambda profiles, label, benchmark: protocols.mean_average_precision(profiles, label_col=label),
    "multilabel_f1": lambda profiles, label, benchmark: protocols.multilabel_f1(profiles, labels_col=label),
    "pair_threshold": lambda profiles, label, benchmark: protocols.pair_threshold(profiles, label_col=label),
    "nn_agreement": lambda profiles, label, benchmark: protocols.nn_agreement(
        profiles, label_col=label, space=benchmark.get("embedding", BENCHMARK_DEFAULTS["embedding"])
    ),
}


def _moa_columns(label: str) -> dict:
    return {
        "moa_col": label,
        "compound_col": "Metadata_compound",
        "concentration_col": "Metadata_concentration",
        "control": "dmso",
    }


def run_protocols(profiles: pd.DataFrame, benchmark: dict) -> dict:
    """Every protocol of ``benchmark`` on ``profiles``: protocol name -> its result dict."""
    benchmark = {**BENCHMARK_DEFAULTS, **benchmark}
    label = f"Metadata_{benchmark['label']}"
    return {name: PROTOCOLS[name](profiles, label, benchmark) for name in benchmark["protocols"]}


def evaluate_benchmark(profiles: pd.DataFrame, benchmark: dict, name: str, model: str) -> tuple[dict, pd.DataFrame]:
    """The evaluation record of one benchmark x model and its 2-D embedding (idx, label, x, y).

    ``profiles`` are sorted by Metadata_idx first, so the record does not depend on the order in
    which extraction wrote them.
    """
    profiles = profiles.sort_values("Metadata_idx", ignore_index=True)
    record = {
        "benchmark": name,
        "model": model,
        "published": benchmark["published"],
        "label": benchmark["label"],
        "n_profiles": len(profiles),
        "results": run_protocols(profiles, benchmark),
    }
    label = f"Metadata_{benchmark['label']}"
    coordinates = protocols.embedding_2d(profiles, method=benchmark["embedding"], seed=0)
    embedding = pd.DataFrame(
        {"idx": profiles["Metadata_idx"], "label": profiles[label], "x": coordinates[:, 0], "y": coordinates[:, 1]}
    )
    return record, embedding


def headline(results: dict) -> dict:
    """Protocol -> its main figure, for a log line."""
    return {p: r.get("accuracy", r.get("mean_average_precision", r.get("macro_f1"))) for p, r in results.items()}
