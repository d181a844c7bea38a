"""CyCLOPS-style yeast single cells: ``<root>/<LABEL>/<name>_{gfp,rfp}.tif``.

The folder is the label: a protein localization in the CyCLOPS release (category phenotype),
the tagged protein in protein-sorted collections such as the paired-cell-inpainting yeast
cells (set ``category: gene``). The GFP channel shows the tagged protein, the RFP channel
the cytoplasmic marker of the screen's strains.

Options:
    category       label column receiving the label (default phenotype)
    label_from     folder (default): the folder name; filename: the file name up to its first "_"
    drop_labels    labels set aside as ``excluded_label`` (default [DEAD, GHOST], as in CytoImageNet)
    merge_labels   {label: replacement}, applied before dropping (default {SPINDLEPOLE: SPINDLE});
                   giving it replaces the default mapping
    gene_pattern   optional regex with a named group ``gene`` applied to the sample's file name;
                   the match fills ``gene`` (+ " targeted") besides the category label
    extensions, constants
    z_projection max | mean | pick:<index>: how TIFF stacks become one plane (curation.sources)
Labels are compared case-insensitively; stored labels are lowercase with "_" read as a space.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cytopretrain.core.errors import SourceError
from cytopretrain.curation.sources import (
    check_choice,
    check_constants,
    check_extensions,
    check_label_column,
    check_mapping,
    check_pattern,
    check_str_list,
    option_key,
    resolve_options,
)
from cytopretrain.curation.sources.base import AdapterResult
from cytopretrain.curation.sources.folder import Channels, assemble, channel_samples, scan_files

CHANNELS = Channels(keys=("gfp", "rfp"), names=("protein", "cytoplasm"), visible=("", "cytoplasm"))

DEFAULTS = {
    "category": "phenotype",
    "label_from": "folder",
    "drop_labels": ["DEAD", "GHOST"],
    "merge_labels": {"SPINDLEPOLE": "SPINDLE"},
    "gene_pattern": None,
    "extensions": [".tif", ".tiff", ".png"],
    "constants": {},
}


def check_options(source: str, options: dict) -> dict:
    """The options with their defaults, each checked; reads no file, so the config check runs it."""
    opts = resolve_options(options, DEFAULTS, source)
    drop = check_str_list(opts["drop_labels"], source, "drop_labels", allow_empty=True)
    merge = check_mapping(opts["merge_labels"], source, "merge_labels")
    if opts["gene_pattern"]:
        check_pattern(opts["gene_pattern"], "gene", source, "gene_pattern")
    return {
        **opts,
        "category": check_label_column(opts["category"], source, "category"),
        "label_from": check_choice(opts["label_from"], ("folder", "filename"), source, "label_from"),
        "drop_labels": {label.upper() for label in drop},
        "merge_labels": {str(k).upper(): str(v).upper() for k, v in merge.items()},
        "constants": check_constants(opts["constants"], source),
        "extensions": check_extensions(opts["extensions"], source),
    }


def adapt(root: Path, source: str, options: dict) -> AdapterResult:
    opts = check_options(source, options)
    category, label_from, drop, merge = opts["category"], opts["label_from"], opts["drop_labels"], opts["merge_labels"]
    constants, extensions = opts["constants"], opts["extensions"]

    samples = channel_samples(scan_files(root, depth=1), CHANNELS.keys, extensions, f"sources.{source} ({root})")
    if samples.empty:
        raise SourceError(f"sources.{source}: no <LABEL>/<name>_{{gfp,rfp}} files under {root}")
    raw = samples["rel"] if label_from == "folder" else samples["sample"].str.split("_").str[0]
    labels = raw.astype("string").str.upper().replace(merge)
    excluded = labels.isin(drop)
    listing = samples.assign(
        where=samples["folder"] + "/" + samples["sample"] + "_*",
        database="cyclops",
        organism="yeast",
        microscopy="fluorescence",
        issue_reason=pd.Series("excluded_label", index=samples.index).where(excluded),
        issue_detail=(
            "label "
            + labels
            + " excluded by "
            + option_key(source, "drop_labels")
            + ": "
            + samples["folder"]
            + "/"
            + samples["sample"]
            + "_*"
        ),
    )
    listing[category] = labels.str.lower().str.replace("_", " ").astype(object)
    if opts["gene_pattern"]:
        listing["gene"] = _genes(samples["sample"], opts["gene_pattern"], source)
    return assemble(listing, CHANNELS, source, constants)


def _genes(samples: pd.Series, gene_pattern: str, source: str) -> pd.Series:
    regex = check_pattern(gene_pattern, "gene", source, "gene_pattern")
    return samples.astype("string").str.extract(regex)["gene"].fillna("").astype(object)
