"""A user's own `path:` folder: the workflow notices added, removed and rewritten images, and
a wrong path names its config key; real yeast cells (../shared/data) copied to a scratch folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import tifffile
from cell_images import YEAST
from workflow_helpers import check, snakemake, write_config

from cytopretrain.curation.listing import list_tree, refresh_listing

needs_data = pytest.mark.skipif(not YEAST.is_dir(), reason=f"real data folder {YEAST} is absent")


def own_tree(root: Path, per_protein: int = 4) -> Path:
    """<root>/<protein>/<cell>_{gfp,rfp}.tif: a few real yeast cells per protein folder."""
    for folder in sorted(YEAST.iterdir())[:3]:
        for gfp in sorted(folder.glob("*_gfp.tif"))[:per_protein]:
            (root / folder.name).mkdir(parents=True, exist_ok=True)
            for channel in ("gfp", "rfp"):
                source = gfp.with_name(gfp.name.replace("_gfp", f"_{channel}"))
                shutil.copy2(source, root / folder.name / source.name)
    return root


def own_config(path: Path) -> dict:
    return {
        "sources": {
            "mine": {
                "path": str(path),
                "adapter": "folder",
                "options": {"channels": ["gfp", "rfp"], "category": "gene"},
            }
        },
        "labels": {"min_count": 2, "take_all_max": 10, "prelim_max": 20},
    }


@needs_data
def test_listing_changes_exactly_when_a_file_is_added_removed_or_rewritten(tmp_path):
    tree = own_tree(tmp_path / "own")
    listing = tmp_path / "listing.tsv"
    assert refresh_listing(tree, listing)
    lines = listing.read_text().splitlines()
    assert lines[0] == "path\tsize\tmtime_ns" and len(lines) == 1 + 3 * 4 * 2
    first = lines[1].split("\t")
    assert int(first[1]) == (tree / first[0]).stat().st_size
    written = listing.stat().st_mtime_ns
    assert not refresh_listing(tree, listing) and listing.stat().st_mtime_ns == written  # unchanged: not rewritten

    (tree / ".DS_Store").write_text("x")  # hidden entries are skipped, as the adapters skip them
    assert not refresh_listing(tree, listing)
    cell = next(tree.glob("*/*_gfp.tif"))
    shutil.copy2(cell, cell.parent / "newcell_gfp.tif")
    assert refresh_listing(tree, listing) and "newcell_gfp.tif" in listing.read_text()
    (cell.parent / "newcell_gfp.tif").unlink()
    assert refresh_listing(tree, listing) and "newcell_gfp.tif" not in listing.read_text()
    plane = tifffile.imread(cell)
    tifffile.imwrite(cell, plane[::-1].copy())  # same size, new pixels
    os.utime(cell, ns=(cell.stat().st_atime_ns, cell.stat().st_mtime_ns + 1_000_000))
    assert refresh_listing(tree, listing)
    assert list_tree(tree) == listing.read_text()


@pytest.mark.slow
@needs_data
def test_a_tree_edited_between_two_dry_runs_reruns_its_source(tmp_path):
    """Adding AAC1/newcell_{gfp,rfp}.tif used to leave `snakemake -n` at "Nothing to be done"
    (the folder's own mtime does not change); now the source is cleaned again, and only then."""
    tree = own_tree(tmp_path / "own")
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, own_config(tree))
    target = "results/metadata/sources/mine.parquet"
    check(snakemake(work, "--cores", "1", target))
    assert "Nothing to be done" in check(snakemake(work, "-n", target)).stdout

    folder = next(tree.iterdir())
    for channel in ("gfp", "rfp"):
        shutil.copy2(next(folder.glob(f"*_{channel}.tif")), folder / f"newcell_{channel}.tif")
    assert "clean_metadata" in check(snakemake(work, "-n", target)).stdout
    check(snakemake(work, "--cores", "1", target))
    assert "Nothing to be done" in check(snakemake(work, "-n", target)).stdout


@pytest.mark.slow
@needs_data
def test_a_path_that_is_a_file_or_missing_names_its_config_key(tmp_path):
    for path, problem in (
        (YEAST / "AAC1" / "AAC1_1_rfp_10_gfp.tif", "is a file, not a folder"),
        (tmp_path / "nowhere", "does not exist"),
    ):
        write_config(tmp_path, own_config(path))
        result = snakemake(tmp_path, "-n")
        assert result.returncode != 0
        assert f"config key 'sources.mine.path': {path}" in result.stdout + result.stderr
        assert problem in result.stdout + result.stderr


@needs_data
def test_a_pipe_in_a_gene_folder_gives_two_targeted_labels(tmp_path):
    """A folder `aac1|aac3` with category gene used to become `aac1|aac3 targeted`, which the
    label stage splits into `aac1` and `aac3 targeted`; each token now gets the suffix."""
    from cytopretrain.curation.labels import assign_weak_labels
    from cytopretrain.curation.sources import run_adapter

    tree = own_tree(tmp_path / "own", per_protein=3)
    first, second, third = (name.lower() + " targeted" for name in sorted(p.name for p in tree.iterdir()))
    pair = tree / sorted(p.name for p in tree.iterdir())[0]
    pair.rename(pair.with_name(f"{pair.name}|{sorted(p.name for p in tree.iterdir())[1]}"))
    table = run_adapter("folder", tree, "mine", {"channels": ["gfp", "rfp"], "category": "gene"}).table
    assert set(table["gene"]) == {f"{first}|{second}", second, third}
    selection, report = assign_weak_labels(table, columns=("gene",), min_count=1, take_all_max=10, prelim_max=10)
    assert dict(zip(report["token"], report["n_total"])) == {first: 3, second: 6, third: 3}


@needs_data
def test_classes_under_min_count_are_listed_with_their_outcome(tmp_path):
    """Real cells, 3 classes of 12, 4 and 2 images; with min_count 5 the two rare classes used
    to vanish without a word. They are listed (outcome below_min_count) and the images add up."""
    from cytopretrain.curation.labels import BELOW_MIN_COUNT, assign_weak_labels, labels_below_min
    from cytopretrain.curation.sources import run_adapter

    tree = own_tree(tmp_path / "own", per_protein=12)
    folders = sorted(tree.iterdir())
    for folder, keep in zip(folders[1:], (4, 2)):
        for extra in sorted(folder.glob("*_gfp.tif"))[keep:]:
            extra.unlink()
            extra.with_name(extra.name.replace("_gfp", "_rfp")).unlink()
    table = run_adapter("folder", tree, "mine", {"channels": ["gfp", "rfp"], "category": "gene"}).table
    selection, report = assign_weak_labels(table, columns=("gene",), min_count=5, take_all_max=20, prelim_max=20)
    below = labels_below_min(table, columns=("gene",), min_count=5)
    assert below["token"].tolist() == [f"{folders[1].name.lower()} targeted", f"{folders[2].name.lower()} targeted"]
    assert below["n_total"].tolist() == [4, 2] and (below["outcome"] == BELOW_MIN_COUNT).all()
    assert (below["n_selected"] == 0).all() and below["order"].isna().all()
    assert list(below.columns) == list(report.columns)
    assert len(selection) + below["n_total"].sum() == len(table) == 18
