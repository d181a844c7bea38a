"""The generic folder layout, and the file-listing machinery every file-based adapter shares.

Folder layout (users' own data)::

    <root>/<label folder>/<sample>_<channel>.<ext>

Options (``sources.<name>.options``):
    channels       ordered channel suffixes, required, e.g. [blue, green, red]
    category       label column receiving the folder's label (compound, sirna, gene, phenotype,
                   cell_visible, cell_type, organism), required; gene values get " targeted"
    label_pattern  regex with a named group ``label`` applied to the folder name
                   (default: the whole folder name), e.g. ``^(?P<label>[^_]+)_``
    channel_names  names written to ``channels`` (default: the suffixes themselves)
    microscopy     fluorescence (default) or brightfield
    organism, cell_type, database   fixed metadata ("", "", "local")
    constants      other fixed metadata {column: value}
    extensions     file extensions read (case-insensitive)
    z_projection   max | mean | pick:<index>: how a TIFF stack (e.g. a confocal Z-stack per
                   channel file) becomes one plane; unset, stacks are quarantined as ``stack``

A sample missing some channels is set aside as ``incomplete_channels``. Files with an unknown
channel suffix or another extension, and files outside ``<label folder>/``, are ignored and
counted in a warning.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cytopretrain.core.errors import SourceError
from cytopretrain.curation.sources import (
    REQUIRED,
    apply_constants,
    check_constants,
    check_extensions,
    check_label_column,
    check_microscopy,
    check_pattern,
    check_str_list,
    option_key,
    resolve_options,
    targeted,
)
from cytopretrain.curation.sources.base import AdapterResult, finish

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = [".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy"]

DEFAULTS = {
    "channels": REQUIRED,
    "category": REQUIRED,
    "label_pattern": None,
    "channel_names": None,
    "microscopy": "fluorescence",
    "organism": "",
    "cell_type": "",
    "database": "local",
    "constants": {},
    "extensions": IMAGE_EXTENSIONS,
}


@dataclass(frozen=True)
class Channels:
    """How a source names its channels and what each one shows."""

    keys: tuple[str, ...]  # name in the source: file suffix or column, one listing column each
    names: tuple[str, ...]  # canonical channel names, "|"-joined into ``channels``
    visible: tuple[str, ...] | None = None  # stained structure per channel ("" = none); None: leave cell_visible


def scan_files(root: Path, depth: int) -> pd.DataFrame:
    """Files exactly ``depth`` folders below ``root``: columns ``rel`` (relative folder), ``name``,
    ``folder`` (absolute folder).

    One ``os.scandir`` per folder and no per-file stat, so millions of files list in seconds.
    Hidden entries are skipped; other files at the wrong depth are counted in a warning.
    """
    rels: list[str] = []
    names: list[str] = []
    ignored: list[str] = []

    def walk(folder: str, rel: str, level: int) -> None:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                child = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir():
                    if level < depth:
                        walk(entry.path, child, level + 1)
                    else:
                        ignored.append(child + "/")
                elif level == depth:
                    rels.append(rel)
                    names.append(entry.name)
                else:
                    ignored.append(child)

    walk(str(root), "", 0)
    if ignored:
        log.warning(
            "%s: ignored %d entries outside the expected %d-level layout, e.g. %s",
            root,
            len(ignored),
            depth,
            ignored[:3],
        )
    files = pd.DataFrame({"rel": rels, "name": names}, dtype=object)
    base = os.path.abspath(root)
    files["folder"] = np.where(files["rel"] == "", base, base + "/" + files["rel"])
    return files.sort_values(["rel", "name"], ignore_index=True)


def channel_samples(
    files: pd.DataFrame, keys: tuple[str, ...], extensions: list[str], origin: str, sep: str = "_"
) -> pd.DataFrame:
    """Group ``<sample><sep><key><ext>`` files into one row per (folder, sample).

    Returns columns ``rel``, ``folder``, ``sample`` and one column per key holding the file's
    absolute path (NA where the sample lacks that channel), sorted by folder and sample.
    """
    ext_alternatives = "|".join(re.escape(e) for e in sorted(extensions, key=len, reverse=True))
    key_alternatives = "|".join(re.escape(k) for k in keys)
    pattern = rf"^(?P<sample>.+){re.escape(sep)}(?P<key>{key_alternatives})(?i:{ext_alternatives})$"
    names = files["name"].astype("string")
    parts = names.str.extract(pattern)
    has_extension = names.str.lower().str.endswith(tuple(extensions)).fillna(False)
    matched = parts["sample"].notna()
    _warn_ignored(files, has_extension & ~matched, f"an unknown channel suffix (known: {list(keys)})", origin)
    _warn_ignored(files, ~has_extension, f"an extension not in {extensions}", origin)
    found = pd.DataFrame(
        {
            "rel": files["rel"][matched],
            "folder": files["folder"][matched],
            "sample": parts["sample"][matched].astype(object),
            "key": parts["key"][matched].astype(object),
            "path": (files["folder"][matched] + "/" + files["name"][matched]).astype(object),
        }
    )
    _refuse_duplicate_channels(found, origin)
    wide = found.pivot(index=["rel", "folder", "sample"], columns="key", values="path")
    wide = wide.reindex(columns=list(keys)).reset_index()
    wide.columns.name = None
    return wide.sort_values(["rel", "sample"], ignore_index=True)


def _warn_ignored(files: pd.DataFrame, mask: pd.Series, why: str, origin: str) -> None:
    count = int(mask.sum())
    if count:
        examples = (files["folder"][mask] + "/" + files["name"][mask]).head(3).tolist()
        log.warning("%s: ignored %d files with %s, e.g. %s", origin, count, why, examples)


def _refuse_duplicate_channels(found: pd.DataFrame, origin: str) -> None:
    """Two files for one channel of one sample (e.g. x_red.png and x_red.tif) are ambiguous."""
    dup = found.duplicated(["folder", "sample", "key"], keep=False)
    if dup.any():
        first = found[dup].iloc[0]
        same = found[
            dup
            & (found["folder"] == first["folder"])
            & (found["sample"] == first["sample"])
            & (found["key"] == first["key"])
        ]
        raise SourceError(
            f"{origin}: several files for channel {first['key']!r} of one sample: {same['path'].tolist()}"
        )


def assemble(
    listing: pd.DataFrame,
    channels: Channels,
    source: str,
    constants: dict | None = None,
    keep_incomplete: bool = False,
) -> AdapterResult:
    """Turn an ordered listing of a source's images into its table and issues.

    ``listing`` has one row per image the source lists, in output order: one column per channel
    key with the file's absolute path (NA or "" when absent), ``where`` (folder or file naming
    the image, used in issue details), optionally ``issue_reason``/``issue_detail`` (images the
    adapter sets aside itself), and canonical metadata columns. Image ids are
    ``<source>-<position in listing>``: whether an image is kept or set aside does not change
    any id.
    Images without any channel file are ``missing_files``; with some channels missing they are
    ``incomplete_channels`` unless ``keep_incomplete`` (then kept with the channels present).
    """
    listing = listing.reset_index(drop=True)
    keys = list(channels.keys)
    paths = listing[keys].astype("string")
    present = (paths.notna() & (paths != "")).to_numpy()
    pattern = present @ (1 << np.arange(len(keys), dtype=np.int64))
    n_present = present.sum(axis=1)
    preset = (
        listing["issue_reason"].notna().to_numpy() if "issue_reason" in listing else np.zeros(len(listing), dtype=bool)
    )
    complete = n_present == len(keys)
    kept = ~preset & (complete | (keep_incomplete & (n_present > 0)))
    ids = pd.Series(source + "-" + pd.RangeIndex(len(listing)).astype(str), dtype=object)

    table = _kept_rows(listing, paths, pattern, kept, channels)
    table["idx"] = ids[table.index]
    table["name"] = source
    table["dir_name"] = source
    apply_constants(table, constants or {})
    if "gene" in table:
        table["gene"] = targeted(table["gene"])
    issues = _issue_rows(listing, pattern, preset, kept, n_present, channels)
    issues.insert(0, "idx", ids[issues.index])
    return finish(table, f"sources.{source}", issues.to_dict("records"))


def _kept_rows(
    listing: pd.DataFrame, paths: pd.DataFrame, pattern: np.ndarray, kept: np.ndarray, channels: Channels
) -> pd.DataFrame:
    """Kept images with channel_paths, channels, path, filename (and cell_visible), one pass per
    pattern of present channels (there are only a handful), never per row."""
    parts = []
    for code in np.unique(pattern[kept]):
        rows = kept & (pattern == code)
        have = [i for i in range(len(channels.keys)) if (int(code) >> i) & 1]
        part = listing.loc[rows].copy()
        chosen = paths.loc[rows, [channels.keys[i] for i in have]].astype(object)
        part["channel_paths"] = pd.Series(chosen.to_numpy().tolist(), index=part.index, dtype=object)
        part["channels"] = "|".join(channels.names[i] for i in have)
        if channels.visible is not None:
            structures = dict.fromkeys(channels.visible[i] for i in have if channels.visible[i])
            part["cell_visible"] = "|".join(structures)
        first = chosen.iloc[:, 0].str.rpartition("/")
        part["path"] = first[0]
        part["filename"] = first[2]
        parts.append(part)
    if not parts:
        return listing.iloc[:0].assign(channel_paths=pd.Series(dtype=object))
    return pd.concat(parts).sort_index()


def _issue_rows(
    listing: pd.DataFrame,
    pattern: np.ndarray,
    preset: np.ndarray,
    kept: np.ndarray,
    n_present: np.ndarray,
    channels: Channels,
) -> pd.DataFrame:
    """Reason and detail of every image not kept, indexed by listing position."""
    issues = pd.DataFrame(
        {
            "reason": pd.Series(index=listing.index, dtype=object),
            "detail": pd.Series(index=listing.index, dtype=object),
        }
    )
    if preset.any():
        issues.loc[preset, "reason"] = listing.loc[preset, "issue_reason"]
        issues.loc[preset, "detail"] = listing.loc[preset, "issue_detail"]
    where = listing["where"].astype(str)
    missing = ~preset & (n_present == 0)
    issues.loc[missing, "reason"] = "missing_files"
    issues.loc[missing, "detail"] = f"no file for any channel ({', '.join(channels.keys)}) of " + where[missing]
    partial = ~preset & ~kept & (n_present > 0)
    for code in np.unique(pattern[partial]):
        rows = partial & (pattern == code)
        absent = [k for i, k in enumerate(channels.keys) if not (int(code) >> i) & 1]
        issues.loc[rows, "reason"] = "incomplete_channels"
        issues.loc[rows, "detail"] = f"missing channel(s) {', '.join(absent)} of " + where[rows]
    return issues[~kept]


def folder_labels(rel: pd.Series, label_pattern: str | None, source: str) -> pd.Series:
    """The label of each row's folder: the folder name, or the ``label`` group of the pattern."""
    if not label_pattern:
        return rel.astype(object)
    regex = check_pattern(label_pattern, "label", source, "label_pattern")
    folders = pd.Series(rel.unique(), dtype="string")
    labels = folders.str.extract(regex)["label"]
    unmatched = labels.isna() | (labels == "")
    if unmatched.any():
        raise SourceError(
            f"{option_key(source, 'label_pattern')} {label_pattern!r} does not match folder "
            f"{folders[unmatched].iloc[0]!r}"
        )
    return rel.map(dict(zip(folders, labels, strict=True))).astype(object)


def check_options(source: str, options: dict) -> dict:
    """The options with their defaults, each checked; reads no file, so the config check runs it."""
    opts = resolve_options(options, DEFAULTS, source)
    keys = tuple(check_str_list(opts["channels"], source, "channels"))
    names = tuple(check_str_list(opts["channel_names"] or list(keys), source, "channel_names"))
    if len(names) != len(keys):
        raise SourceError(f"{option_key(source, 'channel_names')} must name each of the {len(keys)} channels")
    if opts["label_pattern"]:
        check_pattern(opts["label_pattern"], "label", source, "label_pattern")
    return {
        **opts,
        "channels": keys,
        "channel_names": names,
        "category": check_label_column(opts["category"], source, "category"),
        "microscopy": check_microscopy(opts["microscopy"], source),
        "constants": check_constants(opts["constants"], source),
        "extensions": check_extensions(opts["extensions"], source),
    }


def adapt(root: Path, source: str, options: dict) -> AdapterResult:
    opts = check_options(source, options)
    keys, names, category = opts["channels"], opts["channel_names"], opts["category"]
    microscopy, constants, extensions = opts["microscopy"], opts["constants"], opts["extensions"]

    files = scan_files(root, depth=1)
    samples = channel_samples(files, keys, extensions, f"sources.{source} ({root})")
    if samples.empty:
        raise SourceError(
            f"sources.{source}: no <label>/<sample>_<channel> files with channels {list(keys)} "
            f"and extensions {extensions} under {root}"
        )
    listing = samples.assign(
        where=samples["folder"] + "/" + samples["sample"] + "_*",
        database=opts["database"],
        organism=opts["organism"],
        cell_type=opts["cell_type"],
        microscopy=microscopy,
    )
    listing[category] = folder_labels(samples["rel"], opts["label_pattern"], source)
    return assemble(listing, Channels(keys, names), source, constants)
