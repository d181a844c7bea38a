"""Human Protein Atlas images, in two layouts (option ``layout``).

``kaggle`` (default), the Human Protein Atlas Image Classification competition:
``<root>/train.csv`` (Id, Target = space-separated class numbers 0-27) and
``<root>/train/<Id>_{red,green,blue,yellow}.<ext>``. phenotype = the localization names of
the targets, "|"-joined in class order. Ids listed in the CSV with no file at all are
``missing_files`` issues unless ``only_present`` (default true: a downloaded subset is not an
error; their count is logged); files whose Id the CSV does not list are ``not_in_metadata``
issues.

``cells``, single-cell crops sorted by field of view:
``<root>/<PROTEIN>_<plate>_<well>[_<field>]/<...>_<n>_{blue,green,red}.tif``;
gene = the protein (+ " targeted"), plate and well from the folder name.

Channels are ordered protein (green), nucleus (blue), microtubules (red), er (yellow).

Options: layout, colors (default all four for kaggle, [green, blue, red] for cells),
csv (kaggle, default train.csv), images (kaggle, default train), only_present, extensions,
constants, z_projection (max | mean | pick:<index>; how TIFF stacks become one plane, see curation.sources).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from cytopretrain.core.errors import SourceError
from cytopretrain.curation.sources import (
    check_choice,
    check_constants,
    check_extensions,
    check_str_list,
    read_csv_table,
    resolve_options,
)
from cytopretrain.curation.sources.base import AdapterResult, require_file
from cytopretrain.curation.sources.folder import Channels, assemble, channel_samples, scan_files

log = logging.getLogger(__name__)

# The 28 classes of the competition, by class number.
LOCALIZATIONS = (
    "nucleoplasm",
    "nuclear membrane",
    "nucleoli",
    "nucleoli fibrillar center",
    "nuclear speckles",
    "nuclear bodies",
    "endoplasmic reticulum",
    "golgi apparatus",
    "peroxisomes",
    "endosomes",
    "lysosomes",
    "intermediate filaments",
    "actin filaments",
    "focal adhesion sites",
    "microtubules",
    "microtubule ends",
    "cytokinetic bridge",
    "mitotic spindle",
    "microtubule organizing center",
    "centrosome",
    "lipid droplets",
    "plasma membrane",
    "cell junctions",
    "mitochondria",
    "aggresome",
    "cytosol",
    "cytoplasmic bodies",
    "rods & rings",
)

# color -> (channel name, stained structure); dict order is the channel order.
COLORS = {
    "green": ("protein", ""),
    "blue": ("nucleus", "nucleus"),
    "red": ("microtubules", "microtubules"),
    "yellow": ("er", "endoplasmic reticulum"),
}
DEFAULT_COLORS = {"kaggle": ["green", "blue", "red", "yellow"], "cells": ["green", "blue", "red"]}

CELL_FOLDER = r"^(?P<protein>[^_]+)_(?P<plate>[^_]+)_(?P<well>[A-Za-z]+\d+)(?:_(?P<field>.+))?$"

DEFAULTS = {
    "layout": "kaggle",
    "colors": None,
    "csv": "train.csv",
    "images": "train",
    "only_present": True,
    "extensions": [".png", ".tif", ".tiff", ".jpg"],
    "constants": {},
}


def check_options(source: str, options: dict) -> dict:
    """The options with their defaults, each checked; reads no file, so the config check runs it."""
    opts = resolve_options(options, DEFAULTS, source)
    layout = check_choice(opts["layout"], ("kaggle", "cells"), source, "layout")
    colors = check_str_list(opts["colors"] or DEFAULT_COLORS[layout], source, "colors")
    for color in colors:
        check_choice(color, tuple(COLORS), source, "colors")
    return {
        **opts,
        "layout": layout,
        "colors": colors,
        "extensions": check_extensions(opts["extensions"], source),
        "constants": check_constants(opts["constants"], source),
    }


def adapt(root: Path, source: str, options: dict) -> AdapterResult:
    opts = check_options(source, options)
    layout, colors = opts["layout"], opts["colors"]
    ordered = [c for c in COLORS if c in colors]
    channels = Channels(
        keys=tuple(ordered),
        names=tuple(COLORS[c][0] for c in ordered),
        visible=tuple(COLORS[c][1] for c in ordered),
    )
    extensions, constants = opts["extensions"], opts["constants"]
    common = {"database": "human protein atlas", "organism": "human", "microscopy": "fluorescence"}
    if layout == "cells":
        listing = _cells_listing(root, channels, extensions, source)
    else:
        listing = _kaggle_listing(root, channels, extensions, source, opts)
    return assemble(listing.assign(**common), channels, source, constants)


def _cells_listing(root: Path, channels: Channels, extensions: list[str], source: str) -> pd.DataFrame:
    samples = channel_samples(scan_files(root, depth=1), channels.keys, extensions, f"sources.{source} ({root})")
    if samples.empty:
        raise SourceError(f"sources.{source}: no <PROTEIN>_<plate>_<well>/<...>_<color> files under {root}")
    folders = pd.Series(samples["rel"].unique(), dtype="string")
    parsed = folders.str.extract(CELL_FOLDER)
    bad = parsed["protein"].isna()
    if bad.any():
        raise SourceError(
            f"sources.{source}: folder {root / folders[bad].iloc[0]} is not named "
            "<PROTEIN>_<plate>_<well>[_<field>] (layout: cells)"
        )
    parsed.index = folders
    info = parsed.loc[samples["rel"]].reset_index(drop=True)
    return samples.assign(
        where=samples["folder"] + "/" + samples["sample"] + "_*",
        gene=info["protein"].astype(object),
        plate=info["plate"].astype(object),
        well=info["well"].astype(object),
    )


def _kaggle_listing(root: Path, channels: Channels, extensions: list[str], source: str, opts: dict) -> pd.DataFrame:
    csv = require_file(root / opts["csv"], f"sources.{source}: HPA label table")
    images = root / opts["images"]
    if not images.is_dir():
        raise SourceError(f"sources.{source}: HPA image folder not found: {images}")
    labels = _read_targets(csv)
    samples = channel_samples(scan_files(images, depth=0), channels.keys, extensions, f"sources.{source} ({images})")
    if samples.empty:
        raise SourceError(f"sources.{source}: no <Id>_<color> image files in {images}")
    listing = labels.merge(samples.rename(columns={"sample": "Id"}), on="Id", how="outer", indicator=True)
    on_disk = listing["_merge"] != "left_only"
    if opts["only_present"]:
        absent = int((~on_disk).sum())
        if absent:
            log.info(
                "sources.%s: %d of %d ids in %s have no file in %s (only_present: not reported)",
                source,
                absent,
                len(labels),
                csv,
                images,
            )
        listing = listing[on_disk]
    unlisted = listing["_merge"] == "right_only"
    listing = listing.assign(
        where=str(images.absolute()) + "/" + listing["Id"] + "_*",
        split="train",
        issue_reason=pd.Series("not_in_metadata", index=listing.index).where(unlisted),
        issue_detail=f"id not listed in {csv}: " + str(images.absolute()) + "/" + listing["Id"] + "_*",
    )
    return listing.drop(columns="_merge").sort_values("Id", ignore_index=True)


def _read_targets(csv: Path) -> pd.DataFrame:
    """Id and phenotype ("|"-joined localization names) from the competition's label table."""
    table = read_csv_table(csv, ["Id", "Target"])
    tokens = table["Target"].str.split().explode()
    numbers = pd.to_numeric(tokens, errors="coerce")
    bad = tokens.notna() & ~numbers.isin(range(len(LOCALIZATIONS)))
    if bad.any():
        row = bad[bad].index[0]
        raise SourceError(
            f"{csv}: Target of id {table.loc[row, 'Id']!r} must be class numbers 0-27, got {table.loc[row, 'Target']!r}"
        )
    names = pd.Series(LOCALIZATIONS)
    ordered = numbers.dropna().astype(int).reset_index().sort_values(["index", "Target"], kind="stable")
    ordered = ordered.drop_duplicates()
    phenotype = names[ordered["Target"]].set_axis(ordered["index"]).groupby(level=0).agg("|".join)
    duplicated = table["Id"].duplicated()
    if duplicated.any():
        raise SourceError(f"{csv}: id {table.loc[duplicated, 'Id'].iloc[0]!r} listed twice")
    return pd.DataFrame({"Id": table["Id"], "phenotype": phenotype.reindex(table.index).fillna("")})
