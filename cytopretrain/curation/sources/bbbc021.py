"""BBBC021 (MCF7 cells, compound screen): one row per image, channels dna|tubulin|actin.

Reads ``BBBC021_v1_image.csv`` (or ``.csv.gz``) and ``BBBC021_v1_moa.csv`` from ``<root>``.
Images are expected at ``<root>/<basename of Image_PathName_X>/<file>``, the layout of the
extracted per-plate zips (``Week1_22123/...``); ``path_style: full`` uses
``<root>/<Image_PathName_X>/<file>`` instead. ``BBBC021_v1_compound.csv`` (SMILES) has no
canonical column and is not read.

phenotype = the MOA of (compound, concentration), concentrations compared with a relative
tolerance; treatments without an MOA annotation keep phenotype "" (the MOA table covers 103
treatments plus DMSO). batch = the plate's ``WeekN`` prefix.

Options: path_style (basename | full), constants, z_projection (max | mean | pick:<index>: how
TIFF stacks become one plane, see curation.sources).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cytopretrain.core.errors import SourceError
from cytopretrain.curation.sources import check_choice, check_constants, parse_numbers, read_csv_table, resolve_options
from cytopretrain.curation.sources.base import AdapterResult, require_file
from cytopretrain.curation.sources.folder import Channels, assemble

CHANNELS = Channels(
    keys=("DAPI", "Tubulin", "Actin"),
    names=("dna", "tubulin", "actin"),
    visible=("nucleus", "microtubules", "actin"),
)
IMAGE_COLUMNS = [
    *(f"Image_{kind}_{channel}" for channel in CHANNELS.keys for kind in ("FileName", "PathName")),
    "Image_Metadata_Plate_DAPI",
    "Image_Metadata_Well_DAPI",
    "Image_Metadata_Compound",
    "Image_Metadata_Concentration",
]
MOA_COLUMNS = ["compound", "concentration", "moa"]
RELATIVE_TOLERANCE = 1e-6

DEFAULTS = {"path_style": "basename", "constants": {}}


def check_options(source: str, options: dict) -> dict:
    """The options with their defaults, each checked; reads no file, so the config check runs it."""
    opts = resolve_options(options, DEFAULTS, source)
    return {
        **opts,
        "path_style": check_choice(opts["path_style"], ("basename", "full"), source, "path_style"),
        "constants": check_constants(opts["constants"], source),
    }


def adapt(root: Path, source: str, options: dict) -> AdapterResult:
    opts = check_options(source, options)
    path_style, constants = opts["path_style"], opts["constants"]
    image_csv = _image_table_path(root)
    images = read_csv_table(image_csv, IMAGE_COLUMNS)
    moa_csv = require_file(root / "BBBC021_v1_moa.csv", f"sources.{source}: BBBC021 MOA table")
    moa = read_csv_table(moa_csv, MOA_COLUMNS)

    base = str(root.absolute())
    listing = pd.DataFrame(index=images.index)
    for channel in CHANNELS.keys:
        folder = images[f"Image_PathName_{channel}"].str.strip("/")
        if path_style == "basename":
            folder = folder.str.rsplit("/", n=1).str[-1]
        name = images[f"Image_FileName_{channel}"]
        listing[channel] = (base + "/" + folder + "/" + name).where(name.str.strip() != "")
    plate = images["Image_Metadata_Plate_DAPI"]
    compound = images["Image_Metadata_Compound"].str.lower().str.strip()
    concentration = parse_numbers(images["Image_Metadata_Concentration"], image_csv, "Image_Metadata_Concentration")
    listing = listing.assign(
        where=f"{image_csv} row " + (images.index + 2).astype(str) + ": " + base + "/" + plate,
        compound=compound,
        concentration=concentration,
        phenotype=_moa_per_image(compound, concentration, moa, moa_csv),
        plate=plate,
        well=images["Image_Metadata_Well_DAPI"],
        batch=plate.str.extract(r"^(Week\d+)", expand=False).fillna(""),
        database="broad bioimage benchmark collection",
        organism="human",
        cell_type="mcf7",
        microscopy="fluorescence",
    )
    return assemble(listing, CHANNELS, source, constants)


def _image_table_path(root: Path) -> Path:
    for name in ("BBBC021_v1_image.csv", "BBBC021_v1_image.csv.gz"):
        if (root / name).is_file():
            return root / name
    raise SourceError(f"BBBC021 image table not found: {root / 'BBBC021_v1_image.csv'} (or .csv.gz)")


def _moa_per_image(compound: pd.Series, concentration: pd.Series, moa: pd.DataFrame, moa_csv: Path) -> pd.Series:
    """The lowercase MOA of each image's treatment, "" where the MOA table has none."""
    treatments = pd.DataFrame({"row": compound.index, "compound": compound, "concentration": concentration})
    annotations = pd.DataFrame(
        {
            "compound": moa["compound"].str.lower().str.strip(),
            "moa_concentration": parse_numbers(moa["concentration"], moa_csv, "concentration"),
            "moa": moa["moa"].str.lower().str.strip(),
        }
    )
    pairs = treatments.merge(annotations, on="compound")
    same = np.isclose(pairs["concentration"], pairs["moa_concentration"], rtol=RELATIVE_TOLERANCE, atol=0)
    matches = pairs[same]
    conflicting = matches.groupby("row")["moa"].nunique() > 1
    if conflicting.any():
        row = conflicting[conflicting].index[0]
        raise SourceError(
            f"{moa_csv}: several MOAs for compound {treatments.loc[row, 'compound']!r} at "
            f"concentration {treatments.loc[row, 'concentration']}"
        )
    per_row = matches.drop_duplicates("row").set_index("row")["moa"]
    return per_row.reindex(compound.index).fillna("").astype(object)
