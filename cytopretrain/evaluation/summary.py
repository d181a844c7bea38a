"""One table of every benchmark x model x protocol, with CytoImageNet's published figures beside it.

Accuracy-type protocols give one row (knn_holdout one more per split); the clustering protocol
gives one row per assignment (subset ``kmeans``, and ``own`` for a model's own clusters) and
metric (nmi, ari, unsupervised_accuracy), with the metric's value for random clusters of the
same sizes in ``floor`` (empty for the other protocols).
"""

from __future__ import annotations

import math

import pandas as pd

# CytoImageNet preprint, Table 2: kNN accuracy (%) by feature source.
PUBLISHED = {
    ("bbbc021_nsc", "nsc", ""): (27.18, 83.50, 83.50, 86.41),
    ("cyclops", "knn_loo", ""): (53.06, 68.47, 65.19, 77.97),
    ("coos7", "knn_holdout", "test1"): (65.68, 88.87, 88.58, 94.80),
    ("coos7", "knn_holdout", "test2"): (67.81, 88.93, 89.37, 95.07),
    ("coos7", "knn_holdout", "test3"): (48.77, 75.91, 65.97, 78.97),
    ("coos7", "knn_holdout", "test4"): (51.88, 82.19, 78.52, 87.47),
}
PUBLISHED_COLUMNS = (
    "published_random_init",
    "published_imagenet",
    "published_cytoimagenet",
    "published_both",
)
SUMMARY_COLUMNS = (
    "benchmark",
    "model",
    "protocol",
    "subset",
    "metric",
    "value",
    "ci95",
    "floor",
    "n",
    "correct",
    *PUBLISHED_COLUMNS,
)


def _main_metric(result: dict) -> tuple[str, float, float | None]:
    for metric in ("accuracy", "mean_average_precision", "macro_f1"):
        if metric in result:
            return metric, result[metric], result.get("ci95")
    raise KeyError(f"result of {result.get('protocol')} has no main metric")


def _clustering_rows(benchmark_name: str, model: str, result: dict) -> list[dict]:
    rows = []
    for subset in ("kmeans", "own"):
        if subset not in result:
            continue
        part = result[subset]
        for metric, score in part["metrics"].items():
            accuracy = metric == "unsupervised_accuracy"
            rows.append(
                {
                    "benchmark": benchmark_name,
                    "model": model,
                    "protocol": "clustering",
                    "subset": subset,
                    "metric": metric,
                    "value": score["value"],
                    "ci95": part["ci95"] if accuracy else math.nan,
                    "floor": score["floor"],
                    "n": part["n"],
                    "correct": part["correct"] if accuracy else math.nan,
                    **dict.fromkeys(PUBLISHED_COLUMNS, math.nan),
                }
            )
    return rows


def summary_rows(benchmark_name: str, model: str, results: dict, published_key: str | None) -> list[dict]:
    """One row per protocol (and per split for knn_holdout, per assignment and metric for
    clustering), with the published figures."""
    rows = []
    for protocol, result in results.items():
        if protocol == "clustering":
            rows += _clustering_rows(benchmark_name, model, result)
            continue
        parts = [("", result)]
        if protocol == "knn_holdout":
            parts += list(result.get("splits", {}).items())
        for subset, part in parts:
            metric, value, ci95 = _main_metric(part)
            published = PUBLISHED.get((published_key, protocol, subset)) if published_key else None
            row = {
                "benchmark": benchmark_name,
                "model": model,
                "protocol": protocol,
                "subset": subset,
                "metric": metric,
                "value": value,
                "ci95": math.nan if ci95 is None else ci95,
                "floor": math.nan,
                "n": part.get("n"),
                "correct": part.get("correct", math.nan),
            }
            for column, figure in zip(PUBLISHED_COLUMNS, published or (math.nan,) * 4):
                row[column] = figure / 100 if published else math.nan
            rows.append(row)
    return rows


def summarize(evaluations: list[dict]) -> pd.DataFrame:
    """The summary table from evaluation records ({benchmark, model, published, results})."""
    rows = [
        row
        for record in evaluations
        for row in summary_rows(record["benchmark"], record["model"], record["results"], record.get("published"))
    ]
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
