"""Merging the sources' canonical tables, reading their issue tables, and describing the result."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cytopretrain.core.errors import SchemaError
from cytopretrain.core.schema import LABEL_COLUMNS, QUARANTINE_FIELDS, conform  # noqa: E402
from cytopretrain.core.tables import atomic_path, read_table  # noqa: E402

DESCRIBED_COLUMNS = {"database": "database", "source": "name", "microscopy": "microscopy"}


def merge_tables(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Concatenate canonical tables (keyed by source or file name) in the given order.

    Each table is re-checked with ``schema.conform``; an id present in two tables raises
    SchemaError naming both.
    """
    if not tables:
        raise SchemaError("merge_tables: no tables to merge")
    conformed = {origin: conform(_with_list_paths(frame), origin) for origin, frame in tables.items()}
    origins = np.repeat(np.array(list(conformed), dtype=object), [len(f) for f in conformed.values()])
    merged = pd.concat(conformed.values(), ignore_index=True)
    duplicated = merged["idx"].duplicated(keep=False).to_numpy()
    if duplicated.any():
        first_id = merged["idx"][duplicated].iloc[0]
        where = sorted(set(origins[merged["idx"].to_numpy() == first_id]))
        raise SchemaError(
            f"image id {first_id!r} appears in more than one table: {' and '.join(map(str, where))}; "
            "give the sources distinct names"
        )
    return merged


def _with_list_paths(frame: pd.DataFrame) -> pd.DataFrame:
    """Parquet reads list columns back as numpy arrays; the schema expects Python lists."""
    if "channel_paths" not in frame or frame.empty or isinstance(frame["channel_paths"].iloc[0], list):
        return frame
    return frame.assign(channel_paths=[list(p) if isinstance(p, np.ndarray) else p for p in frame["channel_paths"]])


def read_issue_tables(paths: list[str | os.PathLike]) -> pd.DataFrame:
    """Concatenate quarantine tables (idx, stage, reason, detail); a wrong header names the file."""
    frames = []
    for path in paths:
        frame = read_table(path)
        if list(frame.columns) != list(QUARANTINE_FIELDS):
            raise SchemaError(
                f"{path}: issue table columns must be {list(QUARANTINE_FIELDS)}, got {list(frame.columns)}"
            )
        frames.append(frame.astype(object))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in QUARANTINE_FIELDS})
    return pd.concat(frames, ignore_index=True)


def describe(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Image counts per database, source, microscopy and per value of each label column.

    Each frame has columns ``value`` and ``n_images``, largest first. Multi-valued label
    columns are split on "|", so an image counts once for each of its values; empty values
    are not counted.
    """
    description = {name: _token_counts(table[column], split=False) for name, column in DESCRIBED_COLUMNS.items()}
    for column in LABEL_COLUMNS:
        description[column] = _token_counts(table[column], split=True)
    return description


def _token_counts(values: pd.Series, split: bool) -> pd.DataFrame:
    """Counts of each value (or "|"-separated token). Distinct values are few even in millions
    of rows, so they are counted first and only the distinct values are split."""
    counts = values.astype(object).fillna("").value_counts()
    if split:
        tokens = pd.Series(counts.index, dtype=object).str.split("|")
        per_token = pd.DataFrame({"value": tokens, "n_images": counts.to_numpy()}).explode("value")
        counts = per_token.groupby("value")["n_images"].sum()
    counts = counts[counts.index != ""]
    frame = pd.DataFrame({"value": counts.index.astype(object), "n_images": counts.to_numpy(dtype=np.int64)})
    return frame.sort_values(["n_images", "value"], ascending=[False, True], ignore_index=True)


def plot_description(description: dict[str, pd.DataFrame], out_png: str | os.PathLike, top: int = 15) -> None:
    """One bar chart per label column (its ``top`` values) plus images per source, as a PNG.

    Counts spanning more than two orders of magnitude are drawn on a log axis, so small sources
    stay visible next to large ones.
    """
    panels = ["source", *LABEL_COLUMNS]
    n_cols = 4
    n_rows = -(-len(panels) // n_cols)
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(5 * n_cols, 4.2 * n_rows))
    for axis, name in zip(axes.flat, panels, strict=False):
        _bar_panel(axis, name, description[name], top)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    figure.tight_layout()
    with atomic_path(Path(out_png)) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def _bar_panel(axis, name: str, counts: pd.DataFrame, top: int) -> None:
    shown = counts.head(top)
    label = f"top {top} of {len(counts)}" if len(counts) > top else f"{len(counts)} values"
    axis.set_title(f"{name} ({label})", fontsize=10)
    if shown.empty:
        axis.text(0.5, 0.5, "no values", ha="center", va="center", transform=axis.transAxes)
        axis.set_xticks([])
        axis.set_yticks([])
        return
    axis.barh(shown["value"].astype(str)[::-1], shown["n_images"][::-1], color="#4c72b0")
    if shown["n_images"].max() > 100 * shown["n_images"].min():
        axis.set_xscale("log")
    axis.tick_params(axis="y", labelsize=7)
    axis.set_xlabel("images")
