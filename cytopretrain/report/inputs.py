"""The report's inputs, read and checked: every malformed file raises ReportInputError naming it."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cytopretrain.core.errors import ReportInputError
from cytopretrain.core.schema import QUARANTINE_FIELDS
from cytopretrain.evaluation.outliers import OUTLIER_TABLE_COLUMNS
from cytopretrain.evaluation.summary import PUBLISHED_COLUMNS, SUMMARY_COLUMNS

QUARANTINE_EXAMPLES = 3
CSV_CHUNK_ROWS = 200_000
FUNNEL_COLUMNS = ("stage", "unit", "n_in", "n_kept", "n_removed", "removed_as")
QUARANTINE_COLUMNS = tuple(QUARANTINE_FIELDS)
LABEL_COLUMNS = ("class_index", "label", "category", "n_train", "n_validation")
INDEX_COLUMNS = ("split", "shard", "format", "n_samples")
EMBEDDING_COLUMNS = ("idx", "label", "x", "y")


# All cells as text (blank stays ""); no implicit index column (see _tsv_errors).
TSV_OPTIONS = {"sep": "\t", "dtype": str, "keep_default_na": False, "index_col": False}


@contextlib.contextmanager
def _tsv_errors(path: Path, what: str) -> Iterator[None]:
    """Turn pandas' read failures into ReportInputError naming the file. A row with more
    fields than the header raises too (pandas would only warn and drop the surplus)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            yield
        except FileNotFoundError:
            raise ReportInputError(f"{path}: {what} not found") from None
        except pd.errors.EmptyDataError:
            raise ReportInputError(f"{path}: {what} is empty (not even a header line)") from None
        except (pd.errors.ParserError, pd.errors.ParserWarning, UnicodeDecodeError) as error:
            raise ReportInputError(f"{path}: {what} is not a readable TSV: {error}") from None


def _read_tsv(path: Path, required: Sequence[str], what: str) -> pd.DataFrame:
    """The table, with the required columns checked."""
    with _tsv_errors(path, what):
        frame = pd.read_csv(path, **TSV_OPTIONS)
    _require_columns(frame.columns, required, path, what)
    return frame


def _require_columns(columns: Sequence[str], required: Sequence[str], path: Path, what: str) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise ReportInputError(f"{path}: {what} lacks column(s) {missing} (has {list(columns)})")


def _numeric(
    frame: pd.DataFrame, columns: Sequence[str], path: Path, *, blank_ok: bool = False, integer: bool = False
) -> None:
    """Parse ``columns`` in place (int64 with ``integer``, else float); a cell that is not a
    number (or not a whole number) raises naming the file, column and row."""
    for column in columns:
        text = frame[column].astype(str).str.strip()
        values = pd.to_numeric(text, errors="coerce")
        blank = text.isin(["", "nan", "NaN"])
        bad = values.isna() & ~(blank & blank_ok)
        if integer:
            bad |= values.notna() & (values % 1 != 0)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            kind = "a whole number" if integer else "a number"
            raise ReportInputError(
                f"{path}: column {column!r} row {row + 1}: {frame[column].iloc[row]!r} is not {kind}"
            )
        frame[column] = values.astype(np.int64) if integer else values.astype(float)


def _boolean(frame: pd.DataFrame, column: str, path: Path) -> None:
    values = frame[column].map({"True": True, "False": False, "true": True, "false": False})
    if values.isna().any():
        row = int(np.flatnonzero(values.isna().to_numpy())[0])
        raise ReportInputError(
            f"{path}: column {column!r} row {row + 1}: {frame[column].iloc[row]!r} is not True/False"
        )
    frame[column] = values.astype(bool)


def read_funnel(path: Path) -> pd.DataFrame:
    funnel = _read_tsv(path, FUNNEL_COLUMNS, "funnel table")
    _numeric(funnel, ["n_in", "n_kept", "n_removed"], path, integer=True)
    return funnel


def read_quarantine(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Counts per (stage, reason) and the first few examples of each, read in chunks so a
    quarantine of millions of rows never sits in memory at once."""
    counts: dict[tuple[str, str], int] = {}
    examples: list[pd.DataFrame] = []
    with _tsv_errors(path, "quarantine table"):
        for chunk in pd.read_csv(path, chunksize=CSV_CHUNK_ROWS, **TSV_OPTIONS):
            _require_columns(chunk.columns, QUARANTINE_COLUMNS, path, "quarantine table")
            for key, n in chunk.groupby(["stage", "reason"], sort=False).size().items():
                counts[key] = counts.get(key, 0) + int(n)
            examples.append(chunk.groupby(["stage", "reason"], sort=False).head(QUARANTINE_EXAMPLES))
    table = pd.DataFrame(
        [(stage, reason, n) for (stage, reason), n in counts.items()], columns=["stage", "reason", "n"]
    )
    sample = pd.concat(examples, ignore_index=True) if examples else pd.DataFrame(columns=QUARANTINE_COLUMNS)
    sample = sample.groupby(["stage", "reason"], sort=False).head(QUARANTINE_EXAMPLES)
    return table, sample


def read_labels(path: Path) -> pd.DataFrame:
    labels = _read_tsv(path, LABEL_COLUMNS, "label table")
    _numeric(labels, ["n_train", "n_validation"], path, integer=True)
    return labels


def read_index(path: Path) -> pd.DataFrame:
    index = _read_tsv(path, INDEX_COLUMNS, "shard index")
    _numeric(index, ["n_samples"], path, integer=True)
    return index


def read_summary(path: Path) -> pd.DataFrame:
    summary = _read_tsv(path, SUMMARY_COLUMNS, "evaluation summary")
    _numeric(summary, ["value"], path)
    _numeric(summary, ["ci95", "floor", "n", "correct", *PUBLISHED_COLUMNS], path, blank_ok=True)
    return summary


def _read_json(path: Path, what: str) -> dict:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportInputError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReportInputError(f"{path}: {what} is not valid JSON: {error}") from None
    if not isinstance(record, dict):
        raise ReportInputError(f"{path}: {what} must be a JSON object, got {type(record).__name__}")
    return record


def read_evaluation(path: Path) -> dict:
    """One evaluation record, with its embedding table (None when the file is absent)."""
    record = _read_json(path, "evaluation result")
    missing = [key for key in ("benchmark", "model", "results") if key not in record]
    if missing:
        raise ReportInputError(f"{path}: evaluation result lacks key(s) {missing}")
    if not isinstance(record["results"], dict):
        raise ReportInputError(f"{path}: 'results' must map protocol names to result objects")
    embedding_path = path.with_name(f"{path.stem}.embedding.tsv")
    record["embedding"] = None
    if embedding_path.exists():
        embedding = _read_tsv(embedding_path, EMBEDDING_COLUMNS, "embedding table")
        _numeric(embedding, ["x", "y"], embedding_path)
        record["embedding"] = embedding
    record["path"] = path
    return record


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl file (train.py: one object per logged step)."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ReportInputError(f"{path}: line {number} is not valid JSON: {error}") from None
        if not isinstance(record, dict) or not _is_number(record.get("step")):
            raise ReportInputError(f"{path}: line {number} is not a record with a numeric 'step'")
        records.append(record)
    return records


def read_run(card_path: Path) -> dict:
    """A training run: its name (the card's folder), model card and metrics (None if absent)."""
    card = _read_json(card_path, "model card")
    metrics_path = card_path.with_name("metrics.jsonl")
    metrics = read_metrics(metrics_path) if metrics_path.exists() else None
    return {"name": card_path.parent.name, "card": card, "metrics": metrics, "path": card_path}


def read_outliers(path: Path) -> pd.DataFrame:
    outliers = _read_tsv(path, OUTLIER_TABLE_COLUMNS, "outlier table")
    _numeric(outliers, ["score", "latent_distance"], path)
    _numeric(outliers, ["rank", "latent_rank"], path, integer=True)
    for column in ("is_outlier", "injected_text"):
        _boolean(outliers, column, path)
    return outliers.sort_values("rank", ignore_index=True)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
