"""Adapter ``canonical``: a table already in the canonical schema (e.g. an exported curation).

Reads ``<root>/<file>`` (option ``file``, default ``metadata.parquet``; .parquet, .csv or .tsv).
In CSV/TSV files ``channel_paths`` holds the channel files joined by ``;``. Relative channel
paths are taken relative to ``root``. Ids are kept as given: they must already be unique.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cytopretrain.core.errors import SourceError
from cytopretrain.curation.sources import resolve_options
from cytopretrain.curation.sources.base import AdapterResult, finish, require_file

DEFAULTS = {"file": "metadata.parquet"}


def adapt(root: Path, source: str, options: dict) -> AdapterResult:
    opts = resolve_options(options, DEFAULTS, source)
    path = require_file(Path(root) / opts["file"], "canonical metadata table")
    if path.suffix == ".parquet":
        table = pq.read_table(path)
    elif path.suffix in (".csv", ".tsv"):
        frame = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
        if "channel_paths" in frame:
            frame["channel_paths"] = frame["channel_paths"].str.split(";")
        table = pa.Table.from_pandas(frame, preserve_index=False)
    else:
        raise SourceError(f"{path}: canonical tables must be .parquet, .csv or .tsv")
    if "channel_paths" in table.column_names:
        column = table.column_names.index("channel_paths")
        table = table.set_column(column, "channel_paths", _absolute(table["channel_paths"], Path(root).resolve()))
    frame = table.to_pandas()
    if "channel_paths" in frame:
        frame["channel_paths"] = frame["channel_paths"].map(list)
    return finish(frame, str(path))


def _absolute(paths: pa.ChunkedArray, root: Path) -> pa.ChunkedArray:
    """Prefix relative paths with ``root`` on the flattened Arrow lists, without a Python loop."""
    chunks = []
    for chunk in paths.chunks:
        values = chunk.values.cast(pa.string())
        prefixed = pc.binary_join_element_wise(pa.scalar(str(root)), values, os.sep)
        absolute = pc.if_else(pc.starts_with(values, os.sep), values, prefixed)
        chunks.append(pa.ListArray.from_arrays(chunk.offsets, absolute))
    return pa.chunked_array(chunks, type=pa.list_(pa.string()))
