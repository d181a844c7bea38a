"""A manifest table listing users' images, one row per image.

Options:
    file             the manifest, relative to the source folder (default manifest.csv);
                     tab-separated if its name ends in .tsv/.tab (optionally .gz), else comma
    columns          {canonical column: manifest column}, e.g. {compound: Treatment}; every
                     mapped column must exist
    channel_columns  ordered manifest columns, each holding one channel's file, or
    path_column      one column holding a file with all channels (e.g. an HxWxC .npy or a
                     multi-page TIFF): ``channel_paths`` is that one file, which the image
                     reader splits into channels, and ``channels`` stays "" because the
                     canonical schema pairs each channel name with one path
    channels         names of the channel_columns' channels (default: the column names,
                     lowercase); not accepted with path_column (see above)
    microscopy       fluorescence (default) or brightfield, unless mapped in ``columns``
    database         default "local"
    constants        other fixed metadata {column: value}
    z_projection     max | mean | pick:<index>: how a TIFF stack becomes one plane (a ZCYX
                     path_column file keeps its channels); unset, stacks are ``stack``
Relative file paths are relative to the manifest's folder. A row with an empty file cell is an
issue (``missing_files`` or ``incomplete_channels``); the row number is the id.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from cytopretrain.core.errors import SourceError
from cytopretrain.curation.sources import (
    SETTABLE_COLUMNS,
    check_constants,
    check_mapping,
    check_microscopy,
    check_str_list,
    option_key,
    parse_numbers,
    read_csv_table,
    resolve_options,
)
from cytopretrain.curation.sources.base import AdapterResult, require_file
from cytopretrain.curation.sources.folder import Channels, assemble

DEFAULTS = {
    "file": "manifest.csv",
    "columns": {},
    "channel_columns": None,
    "path_column": None,
    "channels": None,
    "microscopy": "fluorescence",
    "database": "local",
    "constants": {},
}


def check_options(source: str, options: dict) -> dict:
    """The options with their defaults, each checked; reads no file, so the config check runs it."""
    opts = resolve_options(options, DEFAULTS, source)
    file_columns, channels = _channel_layout(opts, source)
    return {
        **opts,
        "columns": _check_columns(opts["columns"], source),
        "constants": check_constants(opts["constants"], source),
        "microscopy": check_microscopy(opts["microscopy"], source),
        "file_columns": file_columns,
        "layout": channels,
    }


def adapt(root: Path, source: str, options: dict) -> AdapterResult:
    opts = check_options(source, options)
    columns, constants, microscopy = opts["columns"], opts["constants"], opts["microscopy"]
    file_columns, channels = opts["file_columns"], opts["layout"]
    manifest_path = require_file(root / opts["file"], f"sources.{source}: manifest")
    manifest = _read_manifest(manifest_path)
    for column in dict.fromkeys([*columns.values(), *file_columns]):
        if column not in manifest:
            raise SourceError(f"{manifest_path}: missing column {column!r} (named in sources.{source}.options)")

    folder = str(manifest_path.parent.absolute())
    listing = pd.DataFrame(index=manifest.index)
    for key, column in zip(channels.keys, file_columns, strict=True):
        listing[key] = _absolute(manifest[column], folder)
    listing["where"] = f"{manifest_path} row " + (manifest.index + 2).astype(str)
    listing["database"] = opts["database"]
    listing["microscopy"] = microscopy
    for canonical, column in columns.items():
        listing[canonical] = manifest[column]
    if "concentration" in columns:
        listing["concentration"] = parse_numbers(
            manifest[columns["concentration"]], manifest_path, columns["concentration"]
        )
    return assemble(listing, channels, source, constants)


def _check_columns(columns, source: str) -> dict[str, str]:
    columns = check_mapping(columns, source, "columns")
    for canonical, column in columns.items():
        if canonical not in SETTABLE_COLUMNS:
            raise SourceError(
                f"{option_key(source, f'columns.{canonical}')}: not a canonical column a manifest may "
                f"set; choose from {', '.join(SETTABLE_COLUMNS)}"
            )
        if not isinstance(column, str) or not column:
            raise SourceError(f"{option_key(source, f'columns.{canonical}')} must name a manifest column")
    return columns


def _channel_layout(opts: dict, source: str) -> tuple[list[str], Channels]:
    """The manifest column holding each channel's file, and the channels."""
    by_columns, by_path = opts["channel_columns"], opts["path_column"]
    if (by_columns is None) == (by_path is None):
        raise SourceError(
            f"give exactly one of {option_key(source, 'channel_columns')} and {option_key(source, 'path_column')}"
        )
    if by_columns is not None:
        file_columns = check_str_list(by_columns, source, "channel_columns")
        names = check_str_list(opts["channels"] or [c.lower() for c in file_columns], source, "channels")
        if len(names) != len(file_columns):
            raise SourceError(
                f"{option_key(source, 'channels')} must name each of the {len(file_columns)} channel_columns"
            )
        keys = tuple(f"channel_{i}" for i in range(len(names)))
        return file_columns, Channels(keys, tuple(names))
    if not isinstance(by_path, str) or not by_path:
        raise SourceError(f"{option_key(source, 'path_column')} must name a manifest column")
    # One file holds every channel (.npy H×W×C, multi-page TIFF): the names, if given, describe
    # its planes in order and standardize checks the file has that many.
    names = check_str_list(opts["channels"], source, "channels") if opts["channels"] is not None else []
    return [by_path], Channels(keys=("file",), names=("|".join(names),))


def _read_manifest(path: Path) -> pd.DataFrame:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    separator = "\t" if suffixes and suffixes[-1] in (".tsv", ".tab") else ","
    return read_csv_table(path, sep=separator)


def _absolute(paths: pd.Series, folder: str) -> pd.Series:
    """Absolute file paths ("" becomes NA); relative ones are taken from ``folder``."""
    paths = paths.str.strip()
    return paths.where(paths.str.startswith(os.sep), folder + os.sep + paths).where(paths != "")
