"""Adapter for the synthetic collection's native layout: ``metadata.csv`` + ``images/``.

``metadata.csv`` has one row per image; ``files`` lists the channel files relative to the
layout root, ``;``-joined (one entry for a multi-page TIFF holding every channel), and
``channels`` names them, ``|``-joined.  Every other column is a canonical metadata field.
Files are not checked here: the standardize stage quarantines missing or unreadable ones.

A multi-page TIFF row keeps one path and all its channel names (one per page, in order).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path, PurePosixPath

import pandas as pd

from cytopretrain.core.errors import SourceError
from cytopretrain.core.schema import MICROSCOPY_VALUES
from cytopretrain.curation.sources import resolve_options
from cytopretrain.curation.sources.base import AdapterResult, finish, require_file

METADATA_FILE = "metadata.csv"
DEFAULTS: dict = {}  # only the options every adapter takes
NATIVE_COLUMNS = (
    "image_id",
    "files",
    "channels",
    "organism",
    "cell_type",
    "cell_visible",
    "phenotype",
    "compound",
    "concentration",
    "sirna",
    "gene",
    "microscopy",
    "plate",
    "well",
    "batch",
)
REQUIRED_COLUMNS = ("image_id", "files", "microscopy")
# Native columns copied unchanged into the canonical table (conform lowercases the text ones).
COPIED_COLUMNS = (
    "organism",
    "cell_type",
    "cell_visible",
    "phenotype",
    "compound",
    "sirna",
    "microscopy",
    "plate",
    "well",
    "batch",
)
MULTIPAGE_SUFFIXES = (".tif", ".tiff")


def adapt(root: Path, source: str, options: dict) -> AdapterResult:
    """Read ``root/metadata.csv`` into the canonical schema (idx ``<source>-<row>``)."""
    resolve_options(options, DEFAULTS, source)
    root = Path(root).resolve()
    metadata = require_file(root / METADATA_FILE, "synthetic metadata")
    header, rows = _read_rows(metadata)
    if not rows:
        raise SourceError(f"{metadata}: no image rows")
    frame = pd.DataFrame([_canonical_row(root, source, metadata, header, i, values) for i, values in enumerate(rows)])
    duplicated = frame["image_id"].duplicated()
    if duplicated.any():
        raise SourceError(f"{metadata}: duplicate image_id {frame.loc[duplicated, 'image_id'].iloc[0]!r}")
    return finish(frame.drop(columns="image_id"), str(metadata))


def _read_rows(metadata: Path) -> tuple[list[str], list[list[str]]]:
    with open(metadata, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise SourceError(f"{metadata}: empty file, expected a header row")
        header = [h.strip() for h in header]
        unknown = [h for h in header if h not in NATIVE_COLUMNS]
        if unknown:
            raise SourceError(f"{metadata}: unknown column(s) {unknown}; known columns are {list(NATIVE_COLUMNS)}")
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise SourceError(f"{metadata}: missing required column(s) {missing}")
        rows = []
        for values in reader:
            if len(values) != len(header):
                raise SourceError(
                    f"{metadata} line {reader.line_num}: {len(values)} fields, the header has {len(header)}"
                )
            rows.append(values)
    return header, rows


def _canonical_row(root: Path, source: str, metadata: Path, header: list[str], index: int, values: list[str]) -> dict:
    row = dict(zip(header, (v.strip() for v in values)))
    where = f"{metadata} row {index + 1} (image_id {row.get('image_id', '')!r})"
    if not row["image_id"]:
        raise SourceError(f"{where}: empty image_id")
    files = [f.strip() for f in row["files"].split(";") if f.strip()]
    if not files:
        raise SourceError(f"{where}: empty 'files'")
    for name in files:
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts:
            raise SourceError(f"{where}: file {name!r} must be relative to the layout root")
    channels = [c for c in row.get("channels", "").split("|") if c]
    multipage = len(files) == 1 and len(channels) > 1 and PurePosixPath(files[0]).suffix.lower() in MULTIPAGE_SUFFIXES
    if channels and len(channels) != len(files) and not multipage:
        raise SourceError(f"{where}: {len(channels)} channel names for {len(files)} files")
    microscopy = row["microscopy"].lower()
    if microscopy not in MICROSCOPY_VALUES:
        raise SourceError(f"{where}: microscopy must be one of {MICROSCOPY_VALUES}, got {row['microscopy']!r}")
    paths = [str(root / PurePosixPath(name)) for name in files]
    record = {
        "image_id": row["image_id"],
        "idx": f"{source}-{index}",
        "database": "synthetic",
        "name": source,
        "dir_name": source,
        "path": str(Path(paths[0]).parent),
        "filename": Path(paths[0]).name,
        "channels": "|".join(channels),
        "channel_paths": paths,
        "gene": _targeted(row.get("gene", "")),
        "concentration": _concentration(row.get("concentration", ""), where),
        "split": "",
    }
    record.update({c: row.get(c, "") for c in COPIED_COLUMNS})
    return record


def _targeted(genes: str) -> str:
    """CytoImageNet marks knocked-down genes with the suffix " targeted"."""
    return "|".join(f"{g.strip()} targeted" for g in genes.split("|") if g.strip())


def _concentration(text: str, where: str) -> float:
    if not text:
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise SourceError(f"{where}: concentration {text!r} is not a number") from None
