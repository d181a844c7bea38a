"""End to end on the real microscopy subsets in ../shared/data, given as local `path:` sources.

RxRx1 (Kaggle layout, uint8 PNG, incomplete site 2), yeast_toy through `cyclops` (float32
TIFF), hpa_toy through `hpa` (cells layout), bbbc021_cells through `manifest` (uint16 .npy
holding three channels) go through the whole curation; BBBC021's real metadata (13,200 images,
no pixels here) is cleaned as a benchmark source.
"""

from __future__ import annotations

import os
import stat

import pandas as pd
import pyarrow.parquet as pq
import pytest
from workflow_helpers import DATA, check, real_config, snakemake, write_config

from cytopretrain.core.tables import read_table
from cytopretrain.curation.shards import iter_shard, load_index, load_labels

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} is absent"),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("real")
    write_config(workdir, real_config())
    previous = os.umask(0o022)  # the common default; every output must follow it
    try:
        check(snakemake(workdir, "--cores", "2"))
    finally:
        os.umask(previous)
    return workdir


def test_every_output_has_the_mode_the_umask_gives(run):
    """Tables, shards, manifests and logs used to be 0600 (mkstemp) and unreadable to the group."""
    modes = {
        str(path.relative_to(run)): stat.S_IMODE(path.stat().st_mode)
        for folder in ("results", "logs")
        for path in (run / folder).rglob("*")
        if path.is_file()
    }
    assert len(modes) > 50 and any(name.endswith(".parquet") for name in modes)
    assert {name: mode for name, mode in modes.items() if mode != 0o644} == {}


def test_every_real_image_is_accounted_for(run):
    results = run / "results"
    stages = (
        read_table(results / "funnel.tsv").set_index("stage").astype({"n_in": int, "n_kept": int, "n_removed": int})
    )
    assert (stages["n_in"] == stages["n_kept"] + stages["n_removed"]).all()
    listed = (
        len(list((DATA / "yeast_toy" / "images").glob("*/*_gfp.tif")))
        + len(list(DATA.glob("hpa_toy/*/*_blue.tif")))
        + len(pd.read_csv(DATA / "bbbc021_cells" / "cells.csv"))
        + len({p.name.split("_w")[0] + p.parent.as_posix() for p in (DATA / "rxrx1").glob("*/*/*/*.png")})
    )
    assert stages.loc["clean_metadata", "n_in"] == listed
    # Real images are all readable and informative: nothing is quarantined at standardize.
    assert stages.loc["standardize", "n_removed"] == 0


def test_incomplete_rxrx1_sites_are_kept_with_their_four_channels(run):
    table = read_table(run / "results" / "metadata" / "sources" / "rxrx1.parquet")
    n_channels = table["channel_paths"].map(len)
    site2 = table["filename"].str.contains("_s2_")
    assert (n_channels[site2] == 4).all() and (n_channels[~site2] == 6).all()
    assert (table.loc[site2, "channels"].str.count(r"\|") == 3).all()


def test_bbbc021_metadata_is_cleaned_with_the_moa_join(run):
    table = read_table(run / "results" / "metadata" / "sources" / "bbbc021.parquet")
    assert len(table) == 13200
    moa = pd.read_csv(DATA / "bbbc021" / "BBBC021_v1_moa.csv")
    annotated = table[table["phenotype"] != ""]
    treatments = annotated[annotated["compound"] != "dmso"].groupby(["compound", "concentration"]).ngroups
    assert treatments == len(moa[moa["compound"] != "DMSO"])
    # A benchmark source stays out of the pretraining set.
    merged = read_table(run / "results" / "metadata" / "merged.parquet", columns=["name"])
    assert "bbbc021" not in set(merged["name"])


def test_real_labels_reach_the_shards(run):
    shards = run / "results" / "shards"
    labels = load_labels(shards)
    names = set(labels["label"])
    # Each yeast protein (416 down to 203 cells) is a gene label; both BBBC021 cell classes make it.
    assert {"aac1 targeted", "aac3 targeted", "aah1 targeted", "aap1 targeted", "aar2 targeted"} <= names
    assert {"dmso", "protein synthesis"} & names
    index = load_index(shards)
    n_channels = {sample["n_channels"] for shard in index["shard"] for sample in iter_shard(shards / shard)}
    assert n_channels == {1}  # merged to grayscale, the default
    crops = sum(pq.ParquetFile(p).metadata.num_rows for p in (run / "results" / "qc").glob("chunk-*.parquet"))
    excluded = read_table(shards / "excluded.tsv")
    assert index["n_samples"].sum() + len(excluded) == crops


def test_a_broken_source_stops_the_run_naming_the_file(tmp_path):
    (tmp_path / "empty_bbbc021").mkdir()
    config = real_config()
    config["sources"] = {"broken": {"path": str(tmp_path / "empty_bbbc021"), "adapter": "bbbc021"}}
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "--cores", "1", "results/metadata/sources/broken.parquet")
    assert result.returncode != 0
    log = (tmp_path / "logs" / "clean_metadata" / "broken.log").read_text()
    assert "BBBC021_v1_image.csv" in log


def test_a_bad_config_key_stops_before_any_job(tmp_path):
    config = real_config()
    config["labels"]["min_count"] = -3
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "-n")
    assert result.returncode != 0
    assert "labels.min_count" in result.stderr + result.stdout
