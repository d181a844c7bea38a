"""The canonical metadata schema shared by every stage.

One row per image (a field of view or a single-cell crop made of one or more channel files).
Multi-valued text fields join their values with ``|``; text is lowercase except paths, ids and
file names. Columns follow CytoImageNet's metadata plus what transfer evaluations need
(plate, well, batch, concentration, split).
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from cytopretrain.core.errors import SchemaError

# Columns that carry weak-label candidates, in CytoImageNet's order.
LABEL_COLUMNS = (
    "compound",
    "sirna",
    "gene",
    "phenotype",
    "cell_visible",
    "cell_type",
    "organism",
)

# name -> arrow type; every adapter returns exactly these columns in this order.
CANONICAL_FIELDS: dict[str, pa.DataType] = {
    "idx": pa.string(),  # unique image id, "<dir_name>-<row>"
    "database": pa.string(),  # e.g. "broad bioimage benchmark collection"
    "name": pa.string(),  # source dataset name, e.g. "bbbc021"
    "dir_name": pa.string(),  # short name used in ids and output folders
    "path": pa.string(),  # folder holding the first channel file
    "filename": pa.string(),  # first channel file name
    "organism": pa.string(),
    "cell_type": pa.string(),
    "cell_visible": pa.string(),  # stained structures, "|"-joined
    "phenotype": pa.string(),
    "compound": pa.string(),
    "sirna": pa.string(),
    "gene": pa.string(),  # values end in " targeted"
    "microscopy": pa.string(),  # "fluorescence" or "brightfield"
    "channels": pa.string(),  # channel names, "|"-joined, same order as channel_paths
    "channel_paths": pa.list_(pa.string()),  # absolute path of each channel file
    "plate": pa.string(),
    "well": pa.string(),
    "batch": pa.string(),
    "concentration": pa.float64(),
    "split": pa.string(),  # the source's own split (train, test1, ...), "" if none
}

CANONICAL_SCHEMA = pa.schema(list(CANONICAL_FIELDS.items()))
TEXT_COLUMNS = tuple(name for name, kind in CANONICAL_FIELDS.items() if kind == pa.string())
# Columns whose values are compared case-insensitively and so are stored lowercase.
LOWERCASE_COLUMNS = (
    "organism",
    "cell_type",
    "cell_visible",
    "phenotype",
    "compound",
    "sirna",
    "gene",
    "microscopy",
    "channels",
)
MICROSCOPY_VALUES = ("fluorescence", "brightfield")

# Columns of every quarantine / decision table: images in = images kept + images quarantined.
QUARANTINE_FIELDS: dict[str, pa.DataType] = {
    "idx": pa.string(),
    "stage": pa.string(),
    "reason": pa.string(),  # short machine-readable reason, e.g. "unreadable"
    "detail": pa.string(),  # human-readable detail naming the file
}
QUARANTINE_SCHEMA = pa.schema(list(QUARANTINE_FIELDS.items()))


def empty_canonical() -> pd.DataFrame:
    return CANONICAL_SCHEMA.empty_table().to_pandas()


def conform(frame: pd.DataFrame, origin: str) -> pd.DataFrame:
    """Return ``frame`` with exactly the canonical columns, types and normalisation.

    Missing optional text columns become "", a missing ``concentration`` becomes NaN;
    ``idx``, ``channel_paths`` and ``microscopy`` are required. ``origin`` (a file or
    source name) is named in every error.
    """
    missing_required = [c for c in ("idx", "channel_paths", "microscopy") if c not in frame.columns]
    if missing_required:
        raise SchemaError(f"{origin}: missing required column(s) {missing_required}")
    out = pd.DataFrame(index=frame.index)
    for name in CANONICAL_FIELDS:
        if name in frame.columns:
            out[name] = frame[name]
        elif name == "concentration":
            out[name] = float("nan")
        else:
            out[name] = ""
    for name in TEXT_COLUMNS:
        col = out[name].astype("string").fillna("")
        if name in LOWERCASE_COLUMNS:
            col = col.str.lower().str.strip()
        out[name] = col.astype(object)
    out["concentration"] = pd.to_numeric(out["concentration"], errors="raise").astype("float64")
    paths = out["channel_paths"]
    bad = ~paths.map(lambda p: isinstance(p, (list, tuple)) and len(p) > 0)
    if bad.any():
        raise SchemaError(
            f"{origin}: channel_paths must be a non-empty list per row; first bad idx {out.loc[bad, 'idx'].iloc[0]!r}"
        )
    # One path may hold several named channels (a multi-page TIFF, an H×W×C array); several
    # paths must pair one-to-one with the names.
    n_names = out["channels"].str.count(r"\|") + (out["channels"] != "")
    n_paths = paths.map(len)
    mismatch = (n_names != n_paths) & (n_names > 0) & (n_paths > 1)
    if mismatch.any():
        first = out.loc[mismatch, "idx"].iloc[0]
        raise SchemaError(f"{origin}: 'channels' names and 'channel_paths' differ in length (idx {first!r})")
    bad_micro = ~out["microscopy"].isin(MICROSCOPY_VALUES)
    if bad_micro.any():
        raise SchemaError(
            f"{origin}: 'microscopy' must be one of {MICROSCOPY_VALUES}, "
            f"got {out.loc[bad_micro, 'microscopy'].iloc[0]!r}"
        )
    dup = out["idx"].duplicated()
    if dup.any():
        raise SchemaError(f"{origin}: duplicate image ids, e.g. {out.loc[dup, 'idx'].iloc[0]!r}")
    return out.reset_index(drop=True)
