"""Adapter ``canonical``: a table already in the canonical schema (e.g. an exported curation).

Reads ``<root>/<file>`` (option ``file``, default ``metadata.parquet``; .parquet, .csv or .tsv).
In CSV/TSV files ``channel_paths`` holds the channel files joined by ``;``. Relative channel
paths are taken relative to ``root``. Ids are kept as given: they must already be unique.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from cytopretrain.sources.base import AdapterResult, SourceError, finish, require_file

OPTIONS = {"file"}


def adapt(root: Path, source: str, options: dict) -> AdapterResult:
    unknown = set(options) - OPTIONS
    if unknown:
        raise SourceError(f"sources.{source}.options.{sorted(unknown)[0]}: unknown option for adapter canonical")
    path = require_file(Path(root) / options.get("file", "metadata.parquet"), "canonical metadata table")
    if path.suffix == ".parquet":
        frame = pq.read_table(path).to_pandas()
    elif path.suffix in (".csv", ".tsv"):
        frame = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
        if "channel_paths" in frame:
            frame["channel_paths"] = frame["channel_paths"].str.split(";")
    else:
        raise SourceError(f"{path}: canonical tables must be .parquet, .csv or .tsv")
    if "channel_paths" in frame:
        frame["channel_paths"] = _absolute(frame["channel_paths"], Path(root).resolve())
    return finish(frame, str(path))


def _absolute(paths: pd.Series, root: Path) -> pd.Series:
    """Prefix relative paths with ``root``, working on the flattened lists at once."""
    lengths = paths.map(len).to_numpy()
    flat = pd.Series(np.concatenate([np.asarray(p, dtype=object) for p in paths]) if len(paths) else [], dtype=object)
    relative = ~flat.map(os.path.isabs).astype(bool)
    flat[relative] = str(root) + os.sep + flat[relative]
    bounds = np.cumsum(lengths)[:-1]
    return pd.Series([list(part) for part in np.split(flat.to_numpy(), bounds)], index=paths.index)
