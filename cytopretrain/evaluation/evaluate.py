"""Run a benchmark's protocols on one profile table (the evaluate rule).

A benchmark (config ``benchmarks.<name>``) names its protocols, the canonical column holding
the class (``label``, default phenotype), optionally the column naming a perturbation
(``perturbation``, e.g. compound) and its control rows (``controls``). Protocols read the
profile columns ``Metadata_<label>``, ``Metadata_compound``, ``Metadata_concentration``,
``Metadata_batch`` and ``Metadata_split`` written by evaluation.features: a benchmark's CNN
features are a profile table like any other (evaluation.profiles runs the same functions).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from cytopretrain.evaluation import protocols
from cytopretrain.evaluation.profile_tables import METADATA_PREFIX
from cytopretrain.evaluation.profiles import control_mask
from cytopretrain.evaluation.protocols.mean_ap import mean_average_precision

# What a benchmark entry means when it leaves a key out (the config schema shows the same).
BENCHMARK_DEFAULTS = {
    "label": "phenotype",
    "published": None,
    "embedding": "pca",
    "k": 11,
    "perturbation": None,
    "controls": {},
    "map": {},
    "clustering": {},
}


def _controls(profiles: pd.DataFrame, benchmark: dict) -> np.ndarray | None:
    if not benchmark["controls"]:
        return None
    mapping = {METADATA_PREFIX + column: values for column, values in benchmark["controls"].items()}
    return control_mask(profiles, mapping, f"benchmarks.{benchmark.get('name', '<benchmark>')}")


def _moa(profiles: pd.DataFrame, label: str, benchmark: dict) -> dict:
    mask = _controls(profiles, benchmark)
    return {
        "moa_col": label,
        "compound_col": "Metadata_compound",
        "concentration_col": "Metadata_concentration",
        # without `controls`, BBBC021's DMSO
        **({"control": "dmso"} if mask is None else {"control_mask": mask}),
    }


def _map(profiles: pd.DataFrame, label: str, benchmark: dict) -> dict:
    perturbation = benchmark["perturbation"]
    return mean_average_precision(
        profiles,
        label_col=label,
        perturbation_col=METADATA_PREFIX + perturbation if perturbation else None,
        control_mask=_controls(profiles, benchmark),
        **benchmark["map"],
    )


# How each protocol runs on a benchmark's profiles: (profiles, label column, benchmark) -> result.
PROTOCOLS: dict[str, Callable[[pd.DataFrame, str, dict], dict]] = {
    "nsc": lambda profiles, label, benchmark: protocols.nsc(profiles, **_moa(profiles, label, benchmark)),
    "nscb": lambda profiles, label, benchmark: protocols.nscb(
        profiles, **_moa(profiles, label, benchmark), batch_col="Metadata_batch"
    ),
    "knn_holdout": lambda profiles, label, benchmark: protocols.knn_holdout(
        profiles, label_col=label, split_col="Metadata_split", k=benchmark["k"]
    ),
    "knn_loo": lambda profiles, label, benchmark: protocols.knn_loo(profiles, label_col=label, k=benchmark["k"]),
    "map": _map,
    "multilabel_f1": lambda profiles, label, benchmark: protocols.multilabel_f1(profiles, labels_col=label),
    "pair_threshold": lambda profiles, label, benchmark: protocols.pair_threshold(profiles, label_col=label),
    "nn_agreement": lambda profiles, label, benchmark: protocols.nn_agreement(
        profiles, label_col=label, space=benchmark["embedding"]
    ),
    # The benchmark's ``clustering`` mapping holds the protocol's options (n_components, restarts, seed).
    "clustering": lambda profiles, label, benchmark: protocols.clustering(
        profiles, label_col=label, **benchmark["clustering"]
    ),
}


def run_protocols(profiles: pd.DataFrame, benchmark: dict) -> dict:
    """Every protocol of ``benchmark`` on ``profiles``: protocol name -> its result dict."""
    benchmark = {**BENCHMARK_DEFAULTS, **benchmark}
    label = f"Metadata_{benchmark['label']}"
    return {name: PROTOCOLS[name](profiles, label, benchmark) for name in benchmark["protocols"]}


def evaluate_benchmark(
    profiles: pd.DataFrame, benchmark: dict, name: str, model: str, clusters: pd.DataFrame | None = None
) -> tuple[dict, pd.DataFrame]:
    """The evaluation record of one benchmark x model and its 2-D embedding (idx, label, x, y).

    ``profiles`` are sorted by Metadata_idx first, so the record does not depend on the order in
    which extraction wrote them. ``clusters`` (Metadata_idx, cluster: a model's own assignment of
    the benchmark's images, learning.pretext.DEC) joins the profiles as CLUSTER_COLUMN, which the
    clustering protocol scores beside its k-means.
    """
    benchmark = {**BENCHMARK_DEFAULTS, **benchmark, "name": name}
    profiles = profiles.sort_values("Metadata_idx", ignore_index=True)
    if clusters is not None:
        own = clusters.set_index("Metadata_idx")["cluster"]
        profiles[protocols.CLUSTER_COLUMN] = profiles["Metadata_idx"].map(own).astype("Int64")
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
    """Protocol -> its main figure, for a log line (clustering: the NMI of its k-means)."""
    return {
        p: r.get("accuracy", r.get("mean_average_precision", r.get("macro_f1")))
        if "kmeans" not in r
        else r["kmeans"]["metrics"]["nmi"]["value"]
        for p, r in results.items()
    }
