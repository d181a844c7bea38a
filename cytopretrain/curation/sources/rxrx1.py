"""RxRx1 (Recursion): siRNA-treated human cells, six channels per site, in two layouts.

Kaggle layout: ``<root>/{train,test}/<experiment>/Plate<p>/<well>_s<site>_w<c>.png`` with the
metadata tables ``train.csv``, ``train_controls.csv``, ``test.csv``, ``test_controls.csv``
(one row per well; the split is the table's). Official layout (rxrx1-images.zip +
rxrx1-metadata.zip): ``<root>[/rxrx1]/images/<experiment>/Plate<p>/...`` with ``metadata.csv``
(one row per site; the split is its ``dataset`` column).

Channels w1..w6 are named nucleus (Hoechst), er (concanavalin A: endoplasmic reticulum),
actin (phalloidin), nucleoli (SYTO 14), mitochondria (MitoTracker), golgi (WGA).
sirna = the metadata's siRNA, except negative controls (UNTREATED in the Kaggle tables,
EMPTY in metadata.csv), which carry no siRNA and get ""; the Kaggle test table has no siRNA.
cell_type = the experiment's prefix (hepg2, huvec, rpe, u2os), batch = the experiment.

Presence is decided from one directory listing per plate folder; files are not opened.
Images listed = one per metadata site (Kaggle: each metadata well x ``sites``) plus every site
found on disk that the metadata does not list (issue ``not_in_metadata``):
- all 6 channels on disk: a row;
- some channels missing: issue ``incomplete_channels`` (``incomplete_sites: quarantine``,
  default), or a row with the channels present (``incomplete_sites: keep``);
- no channel on disk: issue ``missing_files``. With ``only_present: true`` (default) sites of
  wells with no file at all are left out and only counted in the log, because a download of
  a few plates is a normal subset, not an error; ``only_present: false`` reports every
  absent well's sites, to check a full download.
Listed images = rows + issues.
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
    option_key,
    read_csv_table,
    resolve_options,
)
from cytopretrain.curation.sources.base import AdapterResult
from cytopretrain.curation.sources.folder import Channels, assemble, channel_samples, scan_files

log = logging.getLogger(__name__)

CHANNELS = Channels(
    keys=("w1", "w2", "w3", "w4", "w5", "w6"),
    names=("nucleus", "er", "actin", "nucleoli", "mitochondria", "golgi"),
    visible=("nucleus", "endoplasmic reticulum", "actin", "nucleoli", "mitochondria", "golgi apparatus"),
)
KAGGLE_TABLES = {
    "train.csv": "train",
    "train_controls.csv": "train",
    "test.csv": "test",
    "test_controls.csv": "test",
}
NO_SIRNA = ("untreated", "empty")
KEY = ["split", "experiment", "plate", "well", "site"]

DEFAULTS = {
    "incomplete_sites": "quarantine",
    "only_present": True,
    "sites": [1, 2],
    "extensions": [".png"],
    "constants": {},
}


def check_options(source: str, options: dict) -> dict:
    """The options with their defaults, each checked; reads no file, so the config check runs it."""
    opts = resolve_options(options, DEFAULTS, source)
    return {
        **opts,
        "incomplete_sites": check_choice(opts["incomplete_sites"], ("quarantine", "keep"), source, "incomplete_sites"),
        "sites": _check_sites(opts["sites"], source),
        "extensions": check_extensions(opts["extensions"], source),
        "constants": check_constants(opts["constants"], source),
    }


def adapt(root: Path, source: str, options: dict) -> AdapterResult:
    opts = check_options(source, options)
    incomplete, sites = opts["incomplete_sites"], opts["sites"]
    extensions, constants = opts["extensions"], opts["constants"]

    if (root / "train.csv").is_file():
        metadata, image_dirs = _kaggle_metadata(root, sites), {s: root / s for s in ("train", "test")}
    else:
        base = root if (root / "metadata.csv").is_file() else root / "rxrx1"
        if not (base / "metadata.csv").is_file():
            raise SourceError(
                f"sources.{source}: no RxRx1 metadata under {root}: expected train.csv "
                "(Kaggle layout) or metadata.csv (official layout)"
            )
        metadata, image_dirs = _official_metadata(base), {None: base / "images"}
    disk = _disk_sites(image_dirs, extensions, source)
    listing = _listing(metadata, disk, image_dirs, bool(opts["only_present"]), source)
    return assemble(listing, CHANNELS, source, constants, keep_incomplete=incomplete == "keep")


def _check_sites(sites, source: str) -> list[str]:
    if not isinstance(sites, list) or not sites or not all(isinstance(s, int) and s > 0 for s in sites):
        raise SourceError(f"{option_key(source, 'sites')} must be a list of positive integers, got {sites!r}")
    return [str(s) for s in sites]


def _kaggle_metadata(root: Path, sites: list[str]) -> pd.DataFrame:
    """One row per (well, site) of the Kaggle tables found (train.csv must exist)."""
    parts = []
    for name, split in KAGGLE_TABLES.items():
        path = root / name
        if not path.is_file():
            log.warning("RxRx1 Kaggle table %s not found; its wells are not listed", path)
            continue
        table = read_csv_table(path, ["experiment", "plate", "well"])
        parts.append(
            pd.DataFrame(
                {
                    "split": split,
                    "experiment": table["experiment"],
                    "plate": table["plate"],
                    "well": table["well"],
                    "sirna": table["sirna"] if "sirna" in table else "",
                    "table": str(path),
                }
            )
        )
    wells = pd.concat(parts, ignore_index=True)
    _refuse_duplicates(wells, ["experiment", "plate", "well"])
    wells["cell_type"] = wells["experiment"].str.split("-").str[0]
    per_site = wells.loc[wells.index.repeat(len(sites))].reset_index(drop=True)
    per_site["site"] = sites * len(wells)
    return per_site


def _official_metadata(base: Path) -> pd.DataFrame:
    path = base / "metadata.csv"
    table = read_csv_table(path, ["dataset", "experiment", "plate", "well", "site", "sirna"])
    cell_type = table["cell_type"] if "cell_type" in table else table["experiment"].str.split("-").str[0]
    frame = pd.DataFrame(
        {
            "split": table["dataset"],
            "experiment": table["experiment"],
            "plate": table["plate"],
            "well": table["well"],
            "site": table["site"],
            "sirna": table["sirna"],
            "cell_type": cell_type,
            "table": str(path),
        }
    )
    _refuse_duplicates(frame, ["experiment", "plate", "well", "site"])
    return frame


def _refuse_duplicates(frame: pd.DataFrame, columns: list[str]) -> None:
    dup = frame.duplicated(columns, keep=False)
    if dup.any():
        rows = frame[dup].sort_values(columns).head(2)
        raise SourceError(
            f"RxRx1 metadata lists {dict(rows.iloc[0][columns])} twice "
            f"(in {rows['table'].iloc[0]} and {rows['table'].iloc[1]})"
        )


def _disk_sites(image_dirs: dict, extensions: list[str], source: str) -> pd.DataFrame:
    """Sites found on disk with one path column per channel, from one listing per plate folder."""
    parts = []
    for split, folder in image_dirs.items():
        if not folder.is_dir():
            log.warning("sources.%s: RxRx1 image folder %s not found", source, folder)
            continue
        samples = channel_samples(
            scan_files(folder, depth=2), CHANNELS.keys, extensions, f"sources.{source} ({folder})"
        )
        place = samples["rel"].str.extract(r"^(?P<experiment>[^/]+)/Plate(?P<plate>\d+)$")
        spot = samples["sample"].str.extract(r"^(?P<well>[A-Za-z]+\d+)_s(?P<site>\d+)$")
        parsed = place["experiment"].notna() & spot["well"].notna()
        if not parsed.all():
            log.warning(
                "sources.%s: ignored %d sites not named <experiment>/Plate<p>/<well>_s<site>_w<c>, e.g. %s",
                source,
                int((~parsed).sum()),
                (samples["folder"] + "/" + samples["sample"])[~parsed].head(3).tolist(),
            )
        found = pd.concat([samples, place, spot], axis=1)[parsed]
        parts.append(found.assign(split=split))
    disk = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if disk.empty:
        raise SourceError(f"sources.{source}: no RxRx1 image files in {[str(f) for f in image_dirs.values()]}")
    disk["plate"] = disk["plate"].str.lstrip("0")
    disk["site"] = disk["site"].str.lstrip("0")
    return disk.drop(columns=["rel", "sample"])


def _listing(
    metadata: pd.DataFrame, disk: pd.DataFrame, image_dirs: dict, only_present: bool, source: str
) -> pd.DataFrame:
    """Metadata sites joined to disk sites (outer), ordered, with issue and where columns."""
    if None in image_dirs:  # official layout: the split is not part of the folder
        disk = disk.drop(columns="split").merge(
            metadata[["experiment", "plate", "well", "site", "split"]], how="left", on=KEY[1:]
        )
        disk["split"] = disk["split"].fillna("")
    listing = metadata.drop(columns="table").merge(disk, how="outer", on=KEY, indicator=True)
    if only_present:
        wells_on_disk = disk[KEY[:4]].drop_duplicates().assign(_well_on_disk=True)
        listing = listing.merge(wells_on_disk, how="left", on=KEY[:4])
        absent = listing["_well_on_disk"].isna()
        if absent.any():
            log.info(
                "sources.%s: %d metadata sites belong to wells with no file on disk (only_present: not reported)",
                source,
                int(absent.sum()),
            )
        listing = listing[~absent].drop(columns="_well_on_disk")
    unlisted = listing["_merge"] == "right_only"
    folder = listing["split"].map({s: str(f.absolute()) for s, f in image_dirs.items()})
    if None in image_dirs:
        folder = pd.Series(str(image_dirs[None].absolute()), index=listing.index)
    where = (
        folder
        + "/"
        + listing["experiment"]
        + "/Plate"
        + listing["plate"]
        + "/"
        + listing["well"]
        + "_s"
        + listing["site"]
        + "_w*"
    )
    sirna = listing["sirna"].fillna("").str.strip()
    listing = listing.assign(
        where=where,
        sirna=sirna.where(~sirna.str.lower().isin(NO_SIRNA), ""),
        cell_type=listing["cell_type"].fillna(listing["experiment"].str.split("-").str[0]),
        batch=listing["experiment"],
        database="recursion",
        organism="human",
        microscopy="fluorescence",
        issue_reason=pd.Series("not_in_metadata", index=listing.index).where(unlisted),
        issue_detail="site on disk but not in the RxRx1 metadata: " + where,
        _plate=pd.to_numeric(listing["plate"]),
        _site=pd.to_numeric(listing["site"]),
    )
    order = ["split", "experiment", "_plate", "well", "_site"]
    return listing.sort_values(order, ignore_index=True).drop(columns=["_merge", "_plate", "_site"])
