"""Source adapters on the real data in ../shared/data and on small trees the tests write."""

from __future__ import annotations

import gzip
import logging
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from cell_images import BBBC_CELLS_OPTIONS, DATA

from cytopretrain.core.errors import SchemaError, SourceError
from cytopretrain.core.schema import CANONICAL_FIELDS, QUARANTINE_FIELDS
from cytopretrain.curation.sources import ADAPTERS, get_adapter, run_adapter


def real(name: str) -> Path:
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (see ../shared/data/README.md)")
    return path


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def check_result(result, source: str) -> None:
    """Every adapter's output: canonical columns, ids "<source>-<n>" unique over rows + issues."""
    assert list(result.table.columns) == list(CANONICAL_FIELDS)
    assert list(result.issues.columns) == list(QUARANTINE_FIELDS)
    ids = pd.concat([result.table["idx"], result.issues["idx"]])
    assert ids.is_unique
    assert ids.str.fullmatch(rf"{source}-\d+").all()
    assert (result.issues["stage"] == "clean_metadata").all()
    for paths in result.table["channel_paths"]:
        assert all(Path(p).is_absolute() for p in paths)
    assert (result.table["name"] == source).all() and (result.table["dir_name"] == source).all()


# ---------------------------------------------------------------- registry and options


def test_registry_lists_every_adapter_and_rejects_unknown_names():
    assert set(ADAPTERS) >= {"bbbc021", "rxrx1", "hpa", "cyclops", "coos7", "synthetic", "folder", "manifest"}
    for name in ADAPTERS:
        try:
            assert callable(get_adapter(name))
        except SourceError as error:  # an adapter written elsewhere may not be there yet
            assert name == "synthetic" and "not installed" in str(error)
    with pytest.raises(SourceError) as error:
        get_adapter("bbbc022")
    assert "bbbc022" in str(error.value) and "rxrx1" in str(error.value) and "manifest" in str(error.value)


def test_missing_root_folder_is_named(tmp_path):
    with pytest.raises(SourceError, match="nowhere"):
        run_adapter("cyclops", tmp_path / "nowhere", "yeast", {})


@pytest.mark.parametrize("adapter", ["bbbc021", "rxrx1", "hpa", "cyclops", "coos7", "folder", "manifest"])
def test_unknown_option_key_is_named(tmp_path, adapter):
    with pytest.raises(SourceError, match=r"sources\.mine\.options\.colour"):
        run_adapter(adapter, tmp_path, "mine", {"colour": "red"})


# ---------------------------------------------------------------- bbbc021


def independent_moa(images: pd.DataFrame, moa: pd.DataFrame) -> pd.Series:
    """MOA per image by string keys (6 significant digits), independent of the adapter's join."""
    key = lambda compounds, concentrations: [  # noqa: E731
        f"{c.lower()}@{float(x):.6g}" for c, x in zip(compounds, concentrations, strict=True)
    ]
    lookup = dict(zip(key(moa["compound"], moa["concentration"]), moa["moa"].str.lower(), strict=True))
    keys = key(images["Image_Metadata_Compound"], images["Image_Metadata_Concentration"])
    return pd.Series([lookup.get(k, "") for k in keys])


def test_bbbc021_real_table_and_moa_join():
    root = real("bbbc021")
    images = pd.read_csv(root / "BBBC021_v1_image.csv.gz")
    moa = pd.read_csv(root / "BBBC021_v1_moa.csv")
    result = run_adapter("bbbc021", root, "bbbc021", {})
    check_result(result, "bbbc021")
    table = result.table
    assert len(table) == len(images) == 13200 and result.issues.empty

    expected = independent_moa(images, moa)
    assert (table["phenotype"] == expected).all()
    with_moa = table[table["phenotype"] != ""]
    assert len(with_moa) == (expected != "").sum()
    treatments = with_moa[with_moa["compound"] != "dmso"][["compound", "concentration"]].drop_duplicates()
    assert len(treatments) == 103
    assert with_moa["phenotype"].nunique() == 13  # 12 MOAs + DMSO

    first = images.iloc[0]
    row = table.iloc[0]
    plate_dir = first["Image_PathName_DAPI"].split("/")[-1]
    assert row["channel_paths"] == [
        str(root / plate_dir / first[f"Image_FileName_{c}"]) for c in ("DAPI", "Tubulin", "Actin")
    ]
    assert row["channels"] == "dna|tubulin|actin"
    assert row["cell_visible"] == "nucleus|microtubules|actin"
    assert row["plate"] == first["Image_Metadata_Plate_DAPI"] and row["well"] == first["Image_Metadata_Well_DAPI"]
    assert (table["batch"] == table["plate"].str.split("_").str[0]).all()
    assert table["batch"].str.fullmatch(r"Week\d+").all()
    assert (table["concentration"] == images["Image_Metadata_Concentration"]).all()

    full = run_adapter("bbbc021", root, "bbbc021", {"path_style": "full"}).table
    assert full["channel_paths"].iloc[0][0] == str(root / first["Image_PathName_DAPI"] / first["Image_FileName_DAPI"])


def write_bbbc021(root: Path, drop_column: str | None = None, concentration: str = "0.1") -> None:
    columns = {
        "Image_FileName_DAPI": "a_w1.tif",
        "Image_PathName_DAPI": "Week3/Week3_111",
        "Image_FileName_Tubulin": "a_w2.tif",
        "Image_PathName_Tubulin": "Week3/Week3_111",
        "Image_FileName_Actin": "",
        "Image_PathName_Actin": "Week3/Week3_111",
        "Image_Metadata_Plate_DAPI": "Week3_111",
        "Image_Metadata_Well_DAPI": "B02",
        "Image_Metadata_Compound": "Taxol",
        "Image_Metadata_Concentration": concentration,
    }
    second = {**columns, "Image_FileName_Actin": "b_w4.tif", "Image_Metadata_Concentration": "0.30000001"}
    frame = pd.DataFrame([columns, second])
    if drop_column:
        frame = frame.drop(columns=drop_column)
    with gzip.open(root / "BBBC021_v1_image.csv.gz", "wt") as handle:
        frame.to_csv(handle, index=False)
    (root / "BBBC021_v1_moa.csv").write_text(
        '"compound",concentration,"moa"\n"taxol",0.300000,"Microtubule stabilizers"\n'
    )


def test_bbbc021_tolerant_join_and_missing_channel_file(tmp_path):
    write_bbbc021(tmp_path)
    result = run_adapter("bbbc021", tmp_path, "b", {})
    check_result(result, "b")
    # Row 1 has no Actin file name: set aside; row 2 matches the MOA at 0.3 within tolerance.
    assert result.issues["reason"].tolist() == ["incomplete_channels"]
    assert "Actin" in result.issues["detail"].iloc[0]
    assert result.table["idx"].tolist() == ["b-1"]
    assert result.table["phenotype"].tolist() == ["microtubule stabilizers"]
    assert result.table["compound"].tolist() == ["taxol"]


def test_bbbc021_missing_column_names_file_and_column(tmp_path):
    write_bbbc021(tmp_path, drop_column="Image_Metadata_Compound")
    with pytest.raises(SourceError) as error:
        run_adapter("bbbc021", tmp_path, "b", {})
    assert "BBBC021_v1_image.csv.gz" in str(error.value) and "Image_Metadata_Compound" in str(error.value)


def test_bbbc021_non_numeric_concentration_is_named(tmp_path):
    write_bbbc021(tmp_path, concentration="high")
    with pytest.raises(SourceError, match="Image_Metadata_Concentration.*high"):
        run_adapter("bbbc021", tmp_path, "b", {})


# ---------------------------------------------------------------- rxrx1


def disk_sites(root: Path) -> dict[tuple, set[str]]:
    """(split, experiment, plate, well, site) -> channels present, by globbing the real tree."""
    sites: dict[tuple, set[str]] = {}
    for path in root.glob("*/*/Plate*/*_s*_w*.png"):
        split, experiment, plate = path.parts[-4], path.parts[-3], path.parts[-2]
        well, site, channel = path.stem.split("_")
        sites.setdefault((split, experiment, plate[5:], well, site[1:]), set()).add(channel)
    return sites


def test_rxrx1_real_incomplete_sites_quarantined_by_default():
    root = real("rxrx1")
    sites = disk_sites(root)
    complete = {k for k, v in sites.items() if len(v) == 6}
    incomplete = {k: v for k, v in sites.items() if len(v) < 6}
    assert incomplete, "the real sample has sites with only w1-w4"
    result = run_adapter("rxrx1", root, "rx", {})
    check_result(result, "rx")
    table, issues = result.table, result.issues
    assert len(table) == len(complete)
    assert len(table) + len(issues) == len(sites)  # listed images = rows + issues
    assert set(issues["reason"]) == {"incomplete_channels"}
    for detail in issues["detail"]:
        assert "w5" in detail and "w6" in detail and "w4" not in detail and str(root) in detail
    keys = set(
        zip(
            table["split"],
            table["batch"],
            table["plate"],
            table["well"],
            table["filename"].str.split("_").str[1].str[1:],
            strict=True,
        )
    )
    assert keys == complete
    assert (table["channels"] == "nucleus|er|actin|nucleoli|mitochondria|golgi").all()
    assert (table["cell_type"] == table["batch"].str.split("-").str[0].str.lower()).all()
    assert table["channel_paths"].map(len).eq(6).all()
    assert all(Path(p).name.endswith(f"_w{i + 1}.png") for ps in table["channel_paths"] for i, p in enumerate(ps))
    # All disk wells are B02, the negative control (UNTREATED): no siRNA.
    assert (table["well"] == "B02").all() and (table["sirna"] == "").all()
    assert set(table["split"]) == {s for s, *_ in sites}


def test_rxrx1_real_keep_gives_four_channel_rows_with_the_same_ids():
    root = real("rxrx1")
    sites = disk_sites(root)
    default = run_adapter("rxrx1", root, "rx", {})
    kept = run_adapter("rxrx1", root, "rx", {"incomplete_sites": "keep"})
    check_result(kept, "rx")
    assert kept.issues.empty and len(kept.table) == len(sites)
    four = kept.table[kept.table["channel_paths"].map(len) == 4]
    assert len(four) == sum(len(v) == 4 for v in sites.values())
    assert (four["channels"] == "nucleus|er|actin|nucleoli").all()
    assert (four["cell_visible"] == "nucleus|endoplasmic reticulum|actin|nucleoli").all()
    assert set(four["idx"]) == set(default.issues["idx"])


def test_rxrx1_real_only_present_false_reports_every_metadata_site():
    root = real("rxrx1")
    n_wells = sum(
        len(pd.read_csv(root / f)) for f in ("train.csv", "train_controls.csv", "test.csv", "test_controls.csv")
    )
    sites = disk_sites(root)
    result = run_adapter("rxrx1", root, "rx", {"only_present": False})
    assert len(result.table) + len(result.issues) == 2 * n_wells
    counts = result.issues["reason"].value_counts()
    assert counts["incomplete_channels"] == sum(len(v) < 6 for v in sites.values())
    assert counts["missing_files"] == 2 * n_wells - len(sites)


def write_rxrx1_site(folder: Path, well: str, site: int, channels: range) -> None:
    for c in channels:
        touch(folder / f"{well}_s{site}_w{c}.png")


def test_rxrx1_kaggle_tree_with_unlisted_site(tmp_path):
    (tmp_path / "train.csv").write_text("id_code,experiment,plate,well,sirna\nU2OS-01_1_B03,U2OS-01,1,B03,sirna_7\n")
    (tmp_path / "train_controls.csv").write_text(
        "id_code,experiment,plate,well,sirna,well_type\nU2OS-01_1_B02,U2OS-01,1,B02,UNTREATED,negative_control\n"
    )
    plate = tmp_path / "train" / "U2OS-01" / "Plate1"
    write_rxrx1_site(plate, "B03", 1, range(1, 7))
    write_rxrx1_site(plate, "B03", 2, range(1, 7))
    write_rxrx1_site(plate, "C09", 1, range(1, 7))  # not in the metadata
    result = run_adapter("rxrx1", tmp_path, "rx", {})
    check_result(result, "rx")
    # B02 has no file at all: left out (only_present). B03: two rows. C09: not_in_metadata.
    assert result.table["sirna"].tolist() == ["sirna_7", "sirna_7"]
    assert result.table["cell_type"].tolist() == ["u2os", "u2os"]
    assert result.issues["reason"].tolist() == ["not_in_metadata"]
    assert "C09_s1" in result.issues["detail"].iloc[0]
    strict = run_adapter("rxrx1", tmp_path, "rx", {"only_present": False})
    assert sorted(strict.issues["reason"]) == ["missing_files", "missing_files", "not_in_metadata"]


def test_rxrx1_official_layout(tmp_path):
    base = tmp_path / "rxrx1"
    base.mkdir()
    (base / "metadata.csv").write_text(
        "site_id,well_id,cell_type,dataset,experiment,plate,well,site,well_type,sirna,sirna_id\n"
        "HUVEC-01_1_B02_1,HUVEC-01_1_B02,HUVEC,train,HUVEC-01,1,B02,1,negative_control,EMPTY,1138\n"
        "HUVEC-01_1_B03_1,HUVEC-01_1_B03,HUVEC,test,HUVEC-01,1,B03,1,treatment,s15652,12\n"
        "HUVEC-01_1_B03_2,HUVEC-01_1_B03,HUVEC,test,HUVEC-01,1,B03,2,treatment,s15652,12\n"
    )
    plate = base / "images" / "HUVEC-01" / "Plate1"
    write_rxrx1_site(plate, "B02", 1, range(1, 7))
    write_rxrx1_site(plate, "B03", 1, range(1, 7))
    write_rxrx1_site(plate, "B03", 2, range(1, 6))
    result = run_adapter("rxrx1", tmp_path, "rx", {})
    check_result(result, "rx")
    assert result.table["split"].tolist() == ["test", "train"]
    assert result.table["sirna"].tolist() == ["s15652", ""]
    assert result.issues["reason"].tolist() == ["incomplete_channels"]
    assert "w6" in result.issues["detail"].iloc[0] and "w5" not in result.issues["detail"].iloc[0]


def test_rxrx1_bad_inputs(tmp_path):
    with pytest.raises(SourceError, match="train.csv.*metadata.csv"):
        run_adapter("rxrx1", tmp_path, "rx", {})
    (tmp_path / "train.csv").write_text("id_code,experiment,well\nx,U2OS-01,B02\n")
    with pytest.raises(SourceError) as error:
        run_adapter("rxrx1", tmp_path, "rx", {})
    assert "train.csv" in str(error.value) and "'plate'" in str(error.value)
    with pytest.raises(SourceError, match=r"sources\.rx\.options\.incomplete_sites"):
        run_adapter("rxrx1", tmp_path, "rx", {"incomplete_sites": "drop"})
    (tmp_path / "train.csv").write_text("id_code,experiment,plate,well\nx,U2OS-01,1,B02\n")
    (tmp_path / "train" / "U2OS-01").mkdir(parents=True)
    with pytest.raises(SourceError, match="no RxRx1 image files"):
        run_adapter("rxrx1", tmp_path, "rx", {})


# ---------------------------------------------------------------- hpa


def test_hpa_cells_layout_on_real_crops():
    root = real("hpa_toy")
    crops = sorted(root.glob("*/*_green.tif"))
    result = run_adapter("hpa", root, "hpa", {"layout": "cells"})
    check_result(result, "hpa")
    table = result.table
    assert len(table) == len(crops) and result.issues.empty
    per_folder = Counter(p.parent.name for p in crops)
    expected_genes = Counter()
    for folder, n in per_folder.items():
        expected_genes[folder.split("_")[0].lower() + " targeted"] += n
    assert Counter(table["gene"]) == expected_genes
    row = table[table["path"].str.endswith("/A4GALT_1645_H1_6")].iloc[0]
    assert (row["plate"], row["well"]) == ("1645", "H1")
    assert row["channels"] == "protein|nucleus|microtubules"
    assert [Path(p).name.rsplit("_", 1)[1] for p in row["channel_paths"]] == [
        "green.tif",
        "blue.tif",
        "red.tif",
    ]
    assert (table["organism"] == "human").all()


def write_hpa_kaggle(root: Path, target_b: str = "14") -> None:
    (root / "train.csv").write_text(f"Id,Target\na,25 0\nb,{target_b}\nc,2\nd,7\n")
    for sample in ("a", "b", "e"):
        for color in ("red", "green", "blue", "yellow"):
            touch(root / "train" / f"{sample}_{color}.png")
    for color in ("red", "green", "blue"):  # c lacks yellow
        touch(root / "train" / f"c_{color}.png")
    touch(root / "train" / "a_purple.png")  # unknown channel suffix: ignored, logged


def test_hpa_kaggle_layout(tmp_path, caplog):
    write_hpa_kaggle(tmp_path)
    with caplog.at_level(logging.WARNING):
        result = run_adapter("hpa", tmp_path, "hpa", {})
    check_result(result, "hpa")
    assert "1 files with an unknown channel suffix" in caplog.text
    table = result.table.set_index(result.table["filename"].str.split("_").str[0])
    assert table.loc["a", "phenotype"] == "nucleoplasm|cytosol"
    assert table.loc["b", "phenotype"] == "microtubules"
    assert table.loc["a", "channels"] == "protein|nucleus|microtubules|er"
    assert table.loc["a", "cell_visible"] == "nucleus|microtubules|endoplasmic reticulum"
    assert [Path(p).name for p in table.loc["a", "channel_paths"]] == [
        "a_green.png",
        "a_blue.png",
        "a_red.png",
        "a_yellow.png",
    ]
    issues = dict(zip(result.issues["reason"], result.issues["detail"], strict=True))
    assert set(issues) == {"incomplete_channels", "not_in_metadata"}
    assert "yellow" in issues["incomplete_channels"] and "/c_*" in issues["incomplete_channels"]
    assert "/e_*" in issues["not_in_metadata"]
    strict = run_adapter("hpa", tmp_path, "hpa", {"only_present": False})
    assert "missing_files" in set(strict.issues["reason"])
    assert len(strict.table) + len(strict.issues) == 5  # a, b, c, d listed + e on disk


def test_hpa_bad_target_names_file_and_id(tmp_path):
    write_hpa_kaggle(tmp_path, target_b="28")
    with pytest.raises(SourceError) as error:
        run_adapter("hpa", tmp_path, "hpa", {})
    assert "train.csv" in str(error.value) and "'b'" in str(error.value)
    (tmp_path / "train.csv").write_text("Id,Target\na,1\n")
    for path in (tmp_path / "train").iterdir():
        path.unlink()
    with pytest.raises(SourceError, match="no <Id>_<color> image files"):
        run_adapter("hpa", tmp_path, "hpa", {})


# ---------------------------------------------------------------- cyclops


def test_cyclops_on_real_yeast_cells_by_protein():
    root = real("yeast_toy") / "images"
    expected = Counter(p.parent.name.lower() + " targeted" for p in root.glob("*/*_gfp.tif"))
    assert sum(expected.values()) == len(list(root.glob("*/*_rfp.tif")))
    result = run_adapter("cyclops", root, "yeast", {"category": "gene"})
    check_result(result, "yeast")
    assert Counter(result.table["gene"]) == expected and result.issues.empty
    assert len(expected) == 5 and sum(expected.values()) == 1642
    assert (result.table["phenotype"] == "").all() and (result.table["organism"] == "yeast").all()
    assert result.table["channel_paths"].map(lambda ps: (ps[0].endswith("_gfp.tif"), ps[1].endswith("_rfp.tif"))).all()


def test_cyclops_drop_and_merge_labels_reconcile():
    root = real("yeast_toy") / "images"
    per_label = Counter(p.parent.name for p in root.glob("*/*_gfp.tif"))
    result = run_adapter("cyclops", root, "yeast", {"drop_labels": ["aah1"], "merge_labels": {"AAC3": "AAC1"}})
    assert len(result.table) + len(result.issues) == sum(per_label.values())
    assert (result.issues["reason"] == "excluded_label").sum() == per_label["AAH1"]
    counts = Counter(result.table["phenotype"])
    assert counts["aac1"] == per_label["AAC1"] + per_label["AAC3"] and "aac3" not in counts


def test_cyclops_default_labels(tmp_path):
    for label, n in (("SPINDLE_POLE", 1), ("SPINDLEPOLE", 2), ("SPINDLE", 1), ("DEAD", 2), ("ER", 1)):
        for i in range(n):
            touch(tmp_path / label / f"{label}_{i}_gfp.tif")
            touch(tmp_path / label / f"{label}_{i}_rfp.tif")
    result = run_adapter("cyclops", tmp_path, "cy", {})
    check_result(result, "cy")
    assert Counter(result.table["phenotype"]) == {"spindle": 3, "spindle pole": 1, "er": 1}
    assert result.issues["reason"].tolist() == ["excluded_label", "excluded_label"]
    assert "sources.cy.options.drop_labels" in result.issues["detail"].iloc[0]


# ---------------------------------------------------------------- coos7


def test_coos7_folder_export(tmp_path, caplog):
    for split, label, sample in (
        ("train", "Nuclear_Envelope", "a"),
        ("train", "Golgi", "b"),
        ("test2", "Golgi", "c"),
    ):
        touch(tmp_path / split / label / f"{sample}_protein.tif")
        touch(tmp_path / split / label / f"{sample}_nucleus.tif")
    touch(tmp_path / "test2" / "Golgi" / "d_protein.tif")
    with caplog.at_level(logging.WARNING):
        result = run_adapter("coos7", tmp_path, "coos", {})
    check_result(result, "coos")
    assert "test1" in caplog.text  # absent split folders are logged
    table = result.table
    assert list(zip(table["split"], table["phenotype"], strict=True)) == [
        ("train", "golgi"),
        ("train", "nuclear envelope"),
        ("test2", "golgi"),
    ]
    assert (table["organism"] == "mouse").all() and (table["channels"] == "protein|nucleus").all()
    assert result.issues["reason"].tolist() == ["incomplete_channels"]
    with pytest.raises(SourceError, match="none of the split folders"):
        run_adapter("coos7", tmp_path, "coos", {"splits": ["valid"]})


# ---------------------------------------------------------------- folder


def test_folder_on_real_hpa_crops_with_label_pattern():
    root = real("hpa_toy")
    expected = Counter(p.parent.name.split("_")[0].lower() + " targeted" for p in root.glob("*/*_red.tif"))
    options = {
        "channels": ["blue", "green", "red"],
        "category": "gene",
        "label_pattern": "^(?P<label>[^_]+)_",
    }
    result = run_adapter("folder", root, "cells", options)
    check_result(result, "cells")
    assert Counter(result.table["gene"]) == expected and result.issues.empty
    assert (result.table["channels"] == "blue|green|red").all()


def test_folder_tree_with_incomplete_and_unknown_files(tmp_path, caplog):
    for label, samples in (("Mitotic", ["s1", "s2"]), ("Interphase", ["s3"])):
        for sample in samples:
            touch(tmp_path / label / f"{sample}_dapi.TIF")
            touch(tmp_path / label / f"{sample}_gfp.TIF")
    (tmp_path / "Mitotic" / "s2_gfp.TIF").unlink()
    touch(tmp_path / "Mitotic" / "s1_brightfield.tif")
    touch(tmp_path / "notes.txt")
    options = {
        "channels": ["dapi", "gfp"],
        "channel_names": ["nucleus", "protein"],
        "category": "phenotype",
        "organism": "Human",
        "microscopy": "Fluorescence",
        "constants": {"cell_type": "HeLa", "concentration": 2.5},
    }
    with caplog.at_level(logging.WARNING):
        result = run_adapter("folder", tmp_path, "own", options)
    check_result(result, "own")
    assert "1 files with an unknown channel suffix" in caplog.text and "notes.txt" in caplog.text
    table = result.table
    assert table["phenotype"].tolist() == ["interphase", "mitotic"]
    assert table["idx"].tolist() == ["own-0", "own-1"]
    assert (table["channels"] == "nucleus|protein").all()
    assert (table["organism"] == "human").all() and (table["cell_type"] == "hela").all()
    assert (table["concentration"] == 2.5).all()
    assert result.issues["idx"].tolist() == ["own-2"]
    assert result.issues["reason"].tolist() == ["incomplete_channels"]
    assert "gfp" in result.issues["detail"].iloc[0] and "Mitotic/s2_*" in result.issues["detail"].iloc[0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"category": "gene"}, r"sources\.own\.options\.channels.: missing required option"),
        ({"channels": ["a"], "category": "label"}, r"sources\.own\.options\.category"),
        (
            {"channels": ["a"], "category": "gene", "microscopy": "confocal"},
            r"sources\.own\.options\.microscopy",
        ),
        ({"channels": ["a"], "category": "gene", "constants": {"idx": "x"}}, r"options\.constants\.idx"),
        ({"channels": "a", "category": "gene"}, r"options\.channels must be a list"),
        ({"channels": ["a"], "category": "gene", "label_pattern": "^x"}, r"named group"),
        (
            {"channels": ["a"], "category": "gene", "label_pattern": "^zz(?P<label>.)"},
            r"does not match folder",
        ),
    ],
)
def test_folder_bad_options(tmp_path, options, message):
    touch(tmp_path / "lab" / "s_a.png")
    with pytest.raises(SourceError, match=message):
        run_adapter("folder", tmp_path, "own", options)


def test_folder_duplicate_channel_files_are_refused(tmp_path):
    touch(tmp_path / "lab" / "s_a.png")
    touch(tmp_path / "lab" / "s_a.tif")
    with pytest.raises(SourceError, match="s_a.png.*s_a.tif|s_a.tif.*s_a.png"):
        run_adapter("folder", tmp_path, "own", {"channels": ["a"], "category": "gene"})


# ---------------------------------------------------------------- manifest


def test_manifest_on_real_bbbc021_cells():
    root = real("bbbc021_cells")
    cells = pd.read_csv(root / "cells.csv")
    result = run_adapter("manifest", root, "cells", BBBC_CELLS_OPTIONS)
    check_result(result, "cells")
    table = result.table
    assert len(table) == len(cells) == 599 and result.issues.empty
    assert Counter(table["phenotype"]) == Counter(cells["moa"].str.lower())
    assert (table["concentration"].to_numpy() == cells["concentration"].to_numpy()).all()
    # One .npy holds the three channels: one path carrying the three names in plane order.
    assert (table["channels"] == "dna|tubulin|actin").all()
    for paths, file in zip(table["channel_paths"], cells["file"], strict=True):
        assert paths == [str(root / file)] and Path(paths[0]).is_file()
    assert (table["cell_type"] == "mcf7").all()
    imageio = pytest.importorskip("cytopretrain.core.imageio")
    assert imageio.read_channels(table["channel_paths"].iloc[0]).shape == (68, 68, 3)


def test_manifest_path_column_names_channels_of_one_file(tmp_path):
    (tmp_path / "manifest.csv").write_text("path\nx.npy\n")
    result = run_adapter("manifest", tmp_path, "m", {"path_column": "path", "channels": ["dna", "actin"]})
    assert result.table["channels"].tolist() == ["dna|actin"]
    assert result.table["channel_paths"].tolist() == [[str(tmp_path / "x.npy")]]
    with pytest.raises(SourceError, match=r"sources\.m\.options\.channels"):
        run_adapter("manifest", tmp_path, "m", {"path_column": "path", "channels": "dna"})


def test_manifest_tsv_with_channel_columns(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "list.tsv").write_text(
        f"DNA\tGFP\tTreatment\tGene\na_dna.tif\ta_gfp.tif\tTaxol\tTP53\n{tmp_path}/b_dna.tif\t\tnone\t\n"
    )
    options = {
        "file": "sub/list.tsv",
        "channel_columns": ["DNA", "GFP"],
        "columns": {"compound": "Treatment", "gene": "Gene"},
        "microscopy": "brightfield",
    }
    result = run_adapter("manifest", tmp_path, "m", options)
    check_result(result, "m")
    row = result.table.iloc[0]
    assert row["channel_paths"] == [str(tmp_path / "sub" / "a_dna.tif"), str(tmp_path / "sub" / "a_gfp.tif")]
    assert (row["channels"], row["compound"], row["gene"], row["microscopy"]) == (
        "dna|gfp",
        "taxol",
        "tp53 targeted",
        "brightfield",
    )
    assert result.issues["reason"].tolist() == ["incomplete_channels"]
    assert "list.tsv row 3" in result.issues["detail"].iloc[0]


def test_manifest_missing_column_names_file_and_column(tmp_path):
    (tmp_path / "manifest.csv").write_text("path,Compound\nx.npy,taxol\n")
    with pytest.raises(SourceError) as error:
        run_adapter("manifest", tmp_path, "m", {"path_column": "path", "columns": {"compound": "Treatment"}})
    assert "manifest.csv" in str(error.value) and "'Treatment'" in str(error.value)
    with pytest.raises(SourceError, match="exactly one of"):
        run_adapter("manifest", tmp_path, "m", {"columns": {"compound": "Compound"}})


def test_manifest_wrong_microscopy_value_is_a_schema_error(tmp_path):
    (tmp_path / "manifest.csv").write_text("path,mode\nx.npy,confocal\n")
    with pytest.raises(SchemaError, match="microscopy.*confocal"):
        run_adapter("manifest", tmp_path, "m", {"path_column": "path", "columns": {"microscopy": "mode"}})


# ---------------------------------------------------------------- the embedded synthetic collection

SYNTHETIC_LAYOUTS = ["bbbc021", "rxrx1", "hpa", "cyclops", "coos7"]


@pytest.fixture(scope="module")
def synthetic_collection(demo_collection):
    return demo_collection


@pytest.mark.parametrize("layout", SYNTHETIC_LAYOUTS)
def test_adapters_read_the_synthetic_layouts(synthetic_collection, layout):
    out, summary = synthetic_collection
    result = run_adapter(layout, out / layout, layout, {})
    check_result(result, layout)
    assert len(result.table) + len(result.issues) == summary["layouts"][layout]["images"]
    assert all(Path(p).is_file() for paths in result.table["channel_paths"] for p in paths)
    truth = pd.read_csv(out / "ground_truth.csv")
    missing = truth[(truth["layout"] == layout) & (truth["defect"] == "missing")]["path"]
    incomplete = result.issues[result.issues["reason"] == "incomplete_channels"]["detail"]
    # Each site with missing files is set aside, and its detail names the site.
    sites = {p.rsplit("_w", 1)[0] for p in missing}
    assert sites or layout != "rxrx1"  # the generator always drops w5/w6 of one RxRx1 site
    assert len(incomplete) == len(sites)
    for site in sites:
        assert incomplete.str.contains(site, regex=False).any()


# ---------------------------------------------------------------- canonical


def test_canonical_table_keeps_rows_and_anchors_relative_paths(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from fake_metadata import make_metadata

    from cytopretrain.core.schema import CANONICAL_SCHEMA

    frame = make_metadata(500, seed=2)
    frame.at[0, "channel_paths"] = ["rel/a.tif", "/abs/b.tif"]
    frame.at[0, "channels"] = "a|b"
    pq.write_table(
        pa.Table.from_pandas(frame, schema=CANONICAL_SCHEMA, preserve_index=False), tmp_path / "metadata.parquet"
    )
    table = run_adapter("canonical", tmp_path, "c", {}).table
    assert len(table) == 500 and list(table["idx"]) == list(frame["idx"])
    assert table.at[0, "channel_paths"] == [str(tmp_path.resolve() / "rel" / "a.tif"), "/abs/b.tif"]
    assert table.at[1, "channel_paths"] == list(frame.at[1, "channel_paths"])
    csv = frame.head(3).assign(channel_paths=lambda f: f["channel_paths"].map(";".join))
    csv.to_csv(tmp_path / "meta.tsv", sep="\t", index=False)
    from_tsv = run_adapter("canonical", tmp_path, "c", {"file": "meta.tsv"}).table
    assert from_tsv.at[0, "channel_paths"] == table.at[0, "channel_paths"]
    with pytest.raises(SourceError, match=r"sources\.c\.options\.sheet"):
        run_adapter("canonical", tmp_path, "c", {"sheet": 1})
