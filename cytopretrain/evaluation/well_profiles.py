"""Precomputed per-well profiles (e.g. CellProfiler means) on the BBBC021 NSC / NSCB protocols.

A ``well_profiles.<name>`` config entry names three tables: the per-well profiles (``path``,
keyed by ``plate_col`` and ``well_col``), BBBC021_v1_image.csv and BBBC021_v1_moa.csv. This
module reads them (CSV or TSV, optionally gzipped, or Parquet, by file-name ending), runs the
protocol of :func:`cytopretrain.evaluation.protocols.bbbc021_from_well_profiles` (its join, then NSC and
NSCB) and returns the record written to ``results/eval/well_profiles/<name>.json`` with the
wells' 2-D embedding. The record has the shape of the benchmark
evaluations (benchmark, model, published, label, n_profiles, results) with benchmark
``bbbc021`` and model ``<name>``, so summary.tsv lists the profiles beside CNN features on
BBBC021 and CytoImageNet's published figures. Every error names the config key and the file.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from cytopretrain.core.config import TABLE_SUFFIXES
from cytopretrain.core.errors import EvaluationError, WellProfileError
from cytopretrain.core.numerics import zscore
from cytopretrain.evaluation.profiles import read_profile_table
from cytopretrain.evaluation.protocols import bbbc021_well_results, bbbc021_well_table, embedding_2d

BENCHMARK = "bbbc021"
# Row of cytopretrain.evaluation.summary.PUBLISHED printed beside the NSC result (the preprint has no NSCB).
PUBLISHED = "bbbc021_nsc"
TABLES = ("path", "image_csv", "moa_csv")
# bbbc021_well_table starts its errors with the name of the table at fault.
ERROR_PREFIXES = {"well_table": "path", "image_csv": "image_csv", "moa_csv": "moa_csv"}


def read_table(path: str | os.PathLike, key: str) -> pd.DataFrame:
    """One table, its format from the file-name ending; ``key`` is the config key naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WellProfileError(f"{key}: file not found: {path}")
    if not path.lower().endswith(TABLE_SUFFIXES):
        raise WellProfileError(f"{key}: {path} is not a table this reads ({', '.join(TABLE_SUFFIXES)})")
    return read_profile_table(path)


def evaluate_well_profiles(name: str, spec: dict, files: dict[str, str]) -> tuple[dict, pd.DataFrame]:
    """NSC and NSCB of one ``well_profiles`` entry as an evaluation record, and its embedding.

    ``spec`` is the validated config entry (plate_col, well_col, aggregate); ``files`` maps
    path, image_csv and moa_csv to the files to read. The protocol choices are those of
    ``bbbc021_from_well_profiles``: DMSO and MOA-less wells dropped, StandardScaler fit on the
    treated MOA-annotated wells, a treatment's profile the ``aggregate`` of its z-scored wells,
    1-NN by cosine distance excluding the same compound (and, for NSCB, the same batch).
    The embedding (columns idx = "<plate>/<well>", label = MOA, x, y) is the 2-D FastICA of
    the wells the protocols use, z-scored the same way, as the report draws for every
    benchmark x model.
    """
    key = f"well_profiles.{name}"
    tables = {table: read_table(files[table], f"{key}.{table}") for table in TABLES}
    wells = tables["path"]
    for column_key in ("plate_col", "well_col"):
        column = spec[column_key]
        if column not in wells.columns:
            raise WellProfileError(
                f"{key}.{column_key}: column {column!r} is not in {files['path']} "
                f"(its first columns: {', '.join(map(str, wells.columns[:6]))})"
            )
    try:
        joined = bbbc021_well_table(
            wells, tables["image_csv"], tables["moa_csv"], plate_col=spec["plate_col"], well_col=spec["well_col"]
        )
        result = bbbc021_well_results(joined, aggregate=spec["aggregate"])
    except EvaluationError as exc:
        table, _, detail = str(exc).partition(": ")
        if table in ERROR_PREFIXES:
            table_key = ERROR_PREFIXES[table]
            raise WellProfileError(f"{key}.{table_key} ({files[table_key]}): {detail}") from exc
        raise WellProfileError(f"{key} ({files['path']}): {exc}") from exc
    record = {
        "benchmark": BENCHMARK,
        "model": name,
        "published": PUBLISHED,
        "label": "moa",
        "n_profiles": result["n_wells"],
        "n_features": result["n_features"],
        "settings": {
            "plate_col": spec["plate_col"],
            "well_col": spec["well_col"],
            "aggregate": spec["aggregate"],
            "files": dict(files),
        },
        "results": {"nsc": result["nsc"], "nscb": result["nscb"]},
    }
    return record, well_embedding(joined)


def well_embedding(profiles: pd.DataFrame) -> pd.DataFrame:
    """2-D FastICA of the treated, MOA-annotated wells, z-scored (StandardScaler fit on them),
    as ``nsc`` scales them: idx ("<plate>/<well>"), label (MOA), x, y."""
    moa = profiles["Metadata_moa"]
    used = profiles[moa.notna() & (profiles["Metadata_compound"].str.upper() != "DMSO")].reset_index(drop=True)
    features = used[[c for c in used.columns if not c.startswith("Metadata_")]].to_numpy(np.float64)
    coordinates = embedding_2d(zscore(features), seed=0)
    return pd.DataFrame(
        {
            "idx": used["Metadata_plate"] + "/" + used["Metadata_well"],
            "label": used["Metadata_moa"],
            "x": coordinates[:, 0],
            "y": coordinates[:, 1],
        }
    )
