"""COOS-7 (mouse cells, 7 protein localizations) from a folder export:
``<root>/<split>/<LOCALIZATION>/<name>_{protein,nucleus}.<ext>``, splits train, test1..test4.

The public COOS-7 release is a set of HDF5 files; this adapter reads images exported from them
into the folder layout above. Reading the HDF5 files directly is not supported yet.

Options:
    splits       split folders read (default train, test1..test4); a missing one is logged,
                 none found is an error
    extensions, constants
    z_projection max | mean | pick:<index>: how TIFF stacks become one plane (curation.sources)
phenotype = the localization (lowercase, "_" read as a space), split = the split folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from cytopretrain.core.errors import SourceError
from cytopretrain.curation.sources import check_constants, check_extensions, check_str_list, resolve_options
from cytopretrain.curation.sources.base import AdapterResult
from cytopretrain.curation.sources.folder import Channels, assemble, channel_samples, scan_files

log = logging.getLogger(__name__)

CHANNELS = Channels(keys=("protein", "nucleus"), names=("protein", "nucleus"), visible=("", "nucleus"))

DEFAULTS = {
    "splits": ["train", "test1", "test2", "test3", "test4"],
    "extensions": [".tif", ".tiff", ".png"],
    "constants": {},
}


def check_options(source: str, options: dict) -> dict:
    """The options with their defaults, each checked; reads no file, so the config check runs it."""
    opts = resolve_options(options, DEFAULTS, source)
    return {
        **opts,
        "splits": check_str_list(opts["splits"], source, "splits"),
        "constants": check_constants(opts["constants"], source),
        "extensions": check_extensions(opts["extensions"], source),
    }


def adapt(root: Path, source: str, options: dict) -> AdapterResult:
    opts = check_options(source, options)
    splits, constants, extensions = opts["splits"], opts["constants"], opts["extensions"]

    present = [s for s in splits if (root / s).is_dir()]
    absent = [s for s in splits if s not in present]
    if not present:
        raise SourceError(f"sources.{source}: none of the split folders {splits} found under {root}")
    if absent:
        log.warning("sources.%s: split folders %s not found under %s", source, absent, root)
    parts = []
    for split in present:
        samples = channel_samples(
            scan_files(root / split, depth=1), CHANNELS.keys, extensions, f"sources.{source} ({root / split})"
        )
        parts.append(samples.assign(split=split))
    samples = pd.concat(parts, ignore_index=True)
    if samples.empty:
        raise SourceError(f"sources.{source}: no <LOCALIZATION>/<name>_{{protein,nucleus}} files under {root}")
    listing = samples.assign(
        where=samples["folder"] + "/" + samples["sample"] + "_*",
        phenotype=samples["rel"].str.lower().str.replace("_", " "),
        database="coos-7",
        organism="mouse",
        microscopy="fluorescence",
    )
    return assemble(listing, CHANNELS, source, constants)
