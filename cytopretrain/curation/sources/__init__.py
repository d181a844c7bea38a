"""Source adapters: one module per source layout, each turning its files into the canonical table.

Every adapter module exposes ``adapt(root, source, options) -> AdapterResult`` and its
``DEFAULTS`` (the option names it accepts), and may expose ``check_options(source, options)``,
which checks the option values without reading a file: ``validate_options`` runs both before
any job (core.config). Modules are imported only when asked for, so a missing or broken adapter
cannot break the others. This module also holds the option handling the adapters share.

Options every adapter accepts (``COMMON_OPTIONS``):
    z_projection   how a TIFF stack (Z or T planes, or unnamed pages in a file holding one
                   channel) becomes one plane: ``max`` (maximum intensity projection), ``mean``
                   or ``pick:<index>`` (0-based plane). Unset, a stack is quarantined by
                   standardize with reason ``stack``; an image is never averaged across planes
                   silently (core.imageio).
"""

from __future__ import annotations

import importlib
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytopretrain.core.errors import SourceError
from cytopretrain.core.schema import CANONICAL_FIELDS, LABEL_COLUMNS, MICROSCOPY_VALUES
from cytopretrain.core.zprojection import ZProjection
from cytopretrain.curation.sources.base import AdapterResult

log = logging.getLogger(__name__)

ADAPTERS = ("bbbc021", "rxrx1", "hpa", "cyclops", "coos7", "synthetic", "folder", "manifest", "canonical")

# Marks an option that has no default and must be given in the config.
REQUIRED = object()
# Options of every adapter; standardize (not the adapter) applies them to the images.
COMMON_OPTIONS = {"z_projection": None}

# Columns an adapter derives itself; options may not set them.
DERIVED_COLUMNS = ("idx", "name", "dir_name", "path", "filename", "channels", "channel_paths")
SETTABLE_COLUMNS = tuple(c for c in CANONICAL_FIELDS if c not in DERIVED_COLUMNS)

Adapter = Callable[[Path, str, dict], AdapterResult]


def get_adapter(name: str) -> Adapter:
    """The ``adapt`` function of adapter ``name``."""
    return _adapter_module(name).adapt


def validate_options(name: str, source: str, options: dict | None) -> dict:
    """Adapter ``name``'s options for config source ``source``, with defaults, each checked
    without reading a file (unknown or missing keys and bad values raise SourceError naming
    ``sources.<source>.options.<key>``)."""
    module = _adapter_module(name)
    if hasattr(module, "check_options"):
        return module.check_options(source, dict(options or {}))
    return resolve_options(options, module.DEFAULTS, source)


def _adapter_module(name: str):
    if name not in ADAPTERS:
        raise SourceError(f"unknown adapter {name!r}; known adapters: {', '.join(ADAPTERS)}")
    module_name = f"cytopretrain.curation.sources.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise SourceError(f"adapter {name!r} is registered but its module {module_name} is not installed") from None
    return module


def run_adapter(name: str, root: str | Path, source: str, options: dict | None) -> AdapterResult:
    """Run adapter ``name`` on the folder ``root`` for config source ``source``."""
    adapt = get_adapter(name)
    root = Path(root)
    if not root.is_dir():
        raise SourceError(folder_problem(root, f"sources.{source}"))
    start = time.perf_counter()
    result = adapt(root, source, dict(options or {}))
    log.info(
        "adapter %s on %s: %d rows, %d issues %s in %.1f s",
        name,
        root,
        len(result.table),
        len(result.issues),
        result.issues["reason"].value_counts().to_dict(),
        time.perf_counter() - start,
    )
    return result


def folder_problem(root: Path, key: str) -> str:
    """Why ``root`` is not a source folder (it does not exist, or is a file), naming config ``key``."""
    if root.exists():
        return f"config key '{key}': {root} is a file, not a folder; give the folder holding the source's files"
    return f"config key '{key}': {root} does not exist; give the folder holding the source's files"


def option_key(source: str, key: str) -> str:
    return f"sources.{source}.options.{key}"


def resolve_options(options: dict | None, defaults: dict[str, Any], source: str) -> dict[str, Any]:
    """``defaults`` (plus COMMON_OPTIONS) updated with ``options``; unknown or missing required
    keys and a bad z_projection raise SourceError."""
    options = dict(options or {})
    defaults = {**COMMON_OPTIONS, **defaults}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise SourceError(
            f"config key '{option_key(source, unknown[0])}': unknown option; "
            f"this adapter accepts: {', '.join(sorted(defaults))}"
        )
    merged = {**defaults, **options}
    missing = [key for key, value in merged.items() if value is REQUIRED]
    if missing:
        raise SourceError(f"config key '{option_key(source, missing[0])}': missing required option")
    try:
        ZProjection.parse(merged["z_projection"])
    except ValueError as exc:
        raise SourceError(f"config key '{option_key(source, 'z_projection')}': {exc}") from None
    return merged


def check_pattern(pattern: str, group: str, source: str, key: str) -> re.Pattern:
    """Option ``key``'s regular expression, which must compile and have the named group ``group``."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise SourceError(f"{option_key(source, key)}: invalid regex: {exc}") from None
    if group not in regex.groupindex:
        raise SourceError(f"{option_key(source, key)} needs a named group (?P<{group}>...)")
    return regex


def check_choice(value: Any, choices: tuple, source: str, key: str) -> Any:
    if value not in choices:
        raise SourceError(f"{option_key(source, key)} must be one of {list(choices)}, got {value!r}")
    return value


def check_str_list(value: Any, source: str, key: str, allow_empty: bool = False) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise SourceError(f"{option_key(source, key)} must be a list of strings, got {value!r}")
    if not value and not allow_empty:
        raise SourceError(f"{option_key(source, key)} must not be empty")
    if not all(isinstance(v, str) and v for v in value):
        raise SourceError(f"{option_key(source, key)} must hold non-empty strings, got {value!r}")
    if len(set(value)) != len(value):
        raise SourceError(f"{option_key(source, key)} has repeated entries: {value!r}")
    return list(value)


def check_mapping(value: Any, source: str, key: str) -> dict:
    if not isinstance(value, dict):
        raise SourceError(f"{option_key(source, key)} must be a mapping, got {value!r}")
    return value


def check_label_column(value: Any, source: str, key: str) -> str:
    return check_choice(value, LABEL_COLUMNS, source, key)


def check_microscopy(value: Any, source: str, key: str = "microscopy") -> str:
    return check_choice(str(value).lower(), MICROSCOPY_VALUES, source, key)


def check_extensions(value: Any, source: str, key: str = "extensions") -> list[str]:
    """Lowercase extensions, each starting with a dot."""
    extensions = check_str_list(value, source, key)
    return [e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions]


def check_constants(constants: Any, source: str, key: str = "constants") -> dict[str, Any]:
    """Fixed metadata ``{column: value}``; only canonical columns an adapter does not derive."""
    constants = check_mapping(constants, source, key)
    for column in constants:
        if column not in SETTABLE_COLUMNS:
            raise SourceError(
                f"{option_key(source, f'{key}.{column}')}: not a settable canonical column; "
                f"choose from {', '.join(SETTABLE_COLUMNS)}"
            )
    if "microscopy" in constants:
        check_microscopy(constants["microscopy"], source, f"{key}.microscopy")
    return constants


def apply_constants(frame: pd.DataFrame, constants: dict[str, Any]) -> pd.DataFrame:
    """Set every column named in ``constants`` to its value (overriding adapter defaults)."""
    for column, value in constants.items():
        frame[column] = value
    return frame


def targeted(genes: pd.Series) -> pd.Series:
    """Gene values with CytoImageNet's " targeted" suffix on each ``|``-separated label (added
    once; empty values stay empty): ``a|b`` becomes ``a targeted|b targeted``, the two labels
    curation.labels splits it into, not ``a`` and ``b targeted``."""
    genes = genes.astype("string").fillna("").str.strip()
    several = genes.str.contains("|", regex=False)
    if several.any():
        tokens = genes[several].str.split("|").explode().str.strip()
        tokens = targeted(tokens[tokens != ""]).astype("string")
        genes = genes.copy()
        genes[several] = tokens.groupby(level=0).agg("|".join).reindex(genes.index[several], fill_value="")
    needs = (genes != "") & ~several & ~genes.str.lower().str.endswith(" targeted")
    return genes.where(~needs, genes + " targeted").astype(object)


def read_csv_table(path: Path, required: list[str] | tuple[str, ...] = (), sep: str = ",") -> pd.DataFrame:
    """A metadata table as text ("" for empty cells); a missing required column names the file."""
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: cannot read the table: {exc}") from None
    for column in required:
        if column not in table:
            raise SourceError(f"{path}: missing column {column!r}")
    return table


def parse_numbers(values: pd.Series, path: Path, column: str) -> pd.Series:
    """Numbers of a text column ("" becomes NaN); anything else names the file and column."""
    text = values.astype("string").str.strip()
    numbers = pd.to_numeric(text.replace("", np.nan), errors="coerce").astype("float64")
    bad = numbers.isna() & text.notna() & (text != "")
    if bad.any():
        raise SourceError(f"{path}: column {column!r} holds a non-number: {values[bad].iloc[0]!r}")
    return numbers
