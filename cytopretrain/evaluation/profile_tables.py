"""Profile tables: the pycytominer / copairs convention every evaluation reads and writes.

One row per image (or well, or treatment): ``Metadata_``-prefixed metadata columns first, then
numeric feature columns. Feature extraction writes them (``f_<k>`` in merge mode,
``f_<channel>_<k>`` in concat mode) with the canonical columns of METADATA_COLUMNS carried as
``Metadata_<column>``; classical tables (CellProfiler per-well means) are read as they are.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cytopretrain.core.errors import SchemaError
from cytopretrain.core.numerics import zscore
from cytopretrain.core.tables import atomic_path

METADATA_PREFIX = "Metadata_"
FEATURE_PREFIX = "f_"
# Canonical columns carried into the profile table (as Metadata_<column>), in this order.
METADATA_COLUMNS = (
    "idx",
    "name",
    "phenotype",
    "compound",
    "concentration",
    "sirna",
    "gene",
    "cell_type",
    "plate",
    "well",
    "batch",
    "split",
    "organism",
    "channels",
)
_FLOAT_METADATA = ("concentration",)
# Rows per Parquet row group when profiles are streamed to a file.
ROWS_PER_GROUP = 2048


def metadata_columns(profiles: pd.DataFrame) -> list[str]:
    """Columns whose name starts with ``Metadata_``, in table order."""
    return [c for c in profiles.columns if str(c).startswith(METADATA_PREFIX)]


def feature_columns(profiles: pd.DataFrame) -> list[str]:
    """All other columns (the features), in table order."""
    return [c for c in profiles.columns if not str(c).startswith(METADATA_PREFIX)]


def non_numeric(table: pd.DataFrame, columns: list[str]) -> list[str]:
    """The columns that cannot be features: not numeric, or boolean."""
    return [c for c in columns if not pd.api.types.is_numeric_dtype(table[c]) or pd.api.types.is_bool_dtype(table[c])]


def feature_names(mode: str, channel_names: list[str], per_image: int, feature_dim: int) -> list[str]:
    """Feature column names: ``f_<k>`` (merge) or ``f_<channel>_<k>`` (concat; c0, c1, ...
    when the table names no channels)."""
    if mode == "merge":
        return [f"{FEATURE_PREFIX}{k}" for k in range(feature_dim)]
    names = channel_names or [f"c{c}" for c in range(per_image)]
    return [f"{FEATURE_PREFIX}{name}_{k}" for name in names for k in range(feature_dim)]


def metadata_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The Metadata_ columns of a profile table for every row of a canonical ``table``: text as
    str, concentration as float64; missing canonical columns become "" or NaN, as
    schema.conform fills them."""
    columns = {}
    for column in METADATA_COLUMNS:
        if column in _FLOAT_METADATA:
            values = pd.to_numeric(table[column]).to_numpy(np.float64) if column in table.columns else np.nan
        elif column in table.columns:
            text = table[column].to_numpy(object)
            values = np.where(pd.isna(text), "", text).astype(str).astype(object)
        else:
            values = ""
        columns[METADATA_PREFIX + column] = values
    return pd.DataFrame(columns, index=pd.RangeIndex(len(table)))


def profile_frame(meta: pd.DataFrame, positions: np.ndarray, features: np.ndarray, names: list[str]) -> pd.DataFrame:
    """Rows ``positions`` of the metadata frame with their features beside them."""
    rows = meta.iloc[positions].reset_index(drop=True)
    return pd.concat([rows, pd.DataFrame(features, columns=names, copy=False)], axis=1)


def read_profile_table(path: str | os.PathLike) -> pd.DataFrame:
    """A CSV or TSV (optionally gzipped) or Parquet table, its format from the file name."""
    lower = os.fspath(path).lower()
    if lower.endswith(".parquet"):
        return pd.read_parquet(path)
    return pd.read_csv(path, sep="\t" if lower.endswith((".tsv", ".tsv.gz")) else ",")


class ProfileWriter:
    """Profile rows appended to one Parquet file in row groups; renamed into place on close."""

    def __init__(self, path: str | os.PathLike):
        self._atomic = atomic_path(path)
        self._tmp = self._atomic.__enter__()
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def write(self, frame: pd.DataFrame) -> None:
        self._pending.append(pa.Table.from_pandas(frame, preserve_index=False))
        self._pending_rows += len(frame)
        if self._pending_rows >= ROWS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        batch = pa.concat_tables(self._pending)
        if self._writer is None:
            metadata = [n for n in batch.schema.names if n.startswith(METADATA_PREFIX)]
            # Dictionaries pay off on repeated metadata strings, never on float features.
            self._writer = pq.ParquetWriter(self._tmp, batch.schema, compression="zstd", use_dictionary=metadata)
        self._writer.write_table(batch, row_group_size=len(batch))
        self._pending, self._pending_rows = [], 0

    def close(self, empty: pd.DataFrame) -> None:
        """Finish the file; ``empty`` (a zero-row profile frame) gives the schema if nothing was written."""
        if self._writer is None and not self._pending:
            self._pending.append(pa.Table.from_pandas(empty, preserve_index=False))
        self._flush()
        self._writer.close()
        self._atomic.__exit__(None, None, None)

    def abort(self, error: BaseException) -> None:
        if self._writer is not None:
            self._writer.close()
        self._atomic.__exit__(type(error), error, None)


def write_profiles(profiles: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a profile table to Parquet atomically (float32 features stay float32)."""
    writer = ProfileWriter(path)
    try:
        for start in range(0, len(profiles), ROWS_PER_GROUP):
            writer.write(profiles.iloc[start : start + ROWS_PER_GROUP])
    except BaseException as error:
        writer.abort(error)
        raise
    writer.close(profiles.iloc[:0])


def fuse_profiles(a: pd.DataFrame, b: pd.DataFrame, *, suffixes: tuple[str, str] = ("a", "b")) -> pd.DataFrame:
    """The fusion baseline: two profile tables of the same images, each feature block z-scored
    over all rows (core.numerics.zscore), concatenated side by side (a's features, then b's).

    Rows are aligned on Metadata_idx (b reordered to a's order); the id sets must be equal and
    unique. Metadata columns are a's. Feature columns become ``<column>_<suffix>``.
    """
    key = METADATA_PREFIX + "idx"
    if len(suffixes) != 2 or suffixes[0] == suffixes[1]:
        raise ValueError(f"suffixes must be two different strings, got {suffixes!r}")
    for label, frame in zip(suffixes, (a, b)):
        if key not in frame.columns:
            raise SchemaError(f"fuse_profiles: profiles {label!r} lack column {key}")
        if frame[key].duplicated().any():
            repeated = frame.loc[frame[key].duplicated(), key].iloc[0]
            raise SchemaError(f"fuse_profiles: profiles {label!r} repeat {key} {repeated!r}")
    only_a = set(a[key]) - set(b[key])
    only_b = set(b[key]) - set(a[key])
    if only_a or only_b:
        example = sorted(only_a or only_b)[0]
        raise SchemaError(
            f"fuse_profiles: the tables hold different images ({len(only_a)} only in {suffixes[0]!r}, "
            f"{len(only_b)} only in {suffixes[1]!r}, e.g. {example!r})"
        )
    features_a, features_b = feature_columns(a), feature_columns(b)
    b_aligned = b.set_index(key).loc[a[key].to_numpy()]
    blocks = [
        pd.DataFrame(zscore(a[features_a].to_numpy()), columns=[f"{c}_{suffixes[0]}" for c in features_a]),
        pd.DataFrame(zscore(b_aligned[features_b].to_numpy()), columns=[f"{c}_{suffixes[1]}" for c in features_b]),
    ]
    return pd.concat([a[metadata_columns(a)].reset_index(drop=True)] + blocks, axis=1)
