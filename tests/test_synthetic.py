"""The synthetic collection: determinism, layouts, hidden factors in the pixels, defects, adapter."""

from __future__ import annotations

import csv
import hashlib
import math
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from cytopretrain import synthetic
from cytopretrain.core.errors import SourceError
from cytopretrain.core.schema import CANONICAL_FIELDS, LOWERCASE_COLUMNS
from cytopretrain.curation.sources.synthetic import NATIVE_COLUMNS, adapt
from cytopretrain.synthetic.collection import plan_layout
from cytopretrain.synthetic.layouts import COOS7_CLASSES

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def collection(demo_collection) -> tuple[Path, dict]:
    return demo_collection


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _read(path: Path) -> np.ndarray:
    if path.suffix == ".png":
        return np.asarray(Image.open(path))
    return tifffile.imread(path)


def _ground_truth(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "ground_truth.csv", dtype=str, keep_default_na=False)


# -- determinism --------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    layouts = ["hpa", "cyclops", "synthetic"]
    kwargs = dict(scale=0.1, image_size=64, layouts=layouts)
    synthetic.generate_collection(tmp_path / "a", seed=5, **kwargs)
    synthetic.generate_collection(tmp_path / "b", seed=5, workers=2, **kwargs)
    synthetic.generate_collection(tmp_path / "c", seed=6, **kwargs)
    a, b, c = (_hashes(tmp_path / x) for x in "abc")
    assert a == b  # same bytes, zips included, whatever the number of worker processes
    assert len(a) > 100
    # Another seed changes the pixels: no healthy image has the same content (blank or
    # saturated defects can coincide).
    defective = {f"{row.layout}/{row.path}" for row in _ground_truth(tmp_path / "a").itertuples()}
    healthy_a = {h for name, h in a.items() if name.endswith((".tif", ".png")) and name not in defective}
    images_c = {h for name, h in c.items() if name.endswith((".tif", ".png"))}
    assert len(healthy_a) > 100 and not healthy_a & images_c


def test_rerun_replaces_a_layout_folder(tmp_path):
    synthetic.generate_collection(tmp_path, seed=1, scale=0.1, image_size=64, layouts=["cyclops"])
    stale = tmp_path / "cyclops" / "STALE" / "x_gfp.tif"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    synthetic.generate_collection(tmp_path, seed=1, scale=0.1, image_size=64, layouts=["cyclops"])
    assert not stale.exists()
    with zipfile.ZipFile(tmp_path / "archives" / "cyclops.zip") as zf:
        assert not any(n.startswith("STALE/") for n in zf.namelist())


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic layout"):
        synthetic.generate_collection(tmp_path, layouts=["bbbc022"])
    with pytest.raises(ValueError, match="scale"):
        synthetic.generate_collection(tmp_path, scale=0)
    with pytest.raises(ValueError, match="image_size"):
        synthetic.generate_collection(tmp_path, image_size=32)


# -- counts and layouts ---------------------------------------------------------------------------


def test_documented_counts_at_scale_one(tmp_path):
    """The module docstring's table, checked on the plans (no rendering needed)."""
    doc = synthetic.__doc__
    expected = {
        layout: int(re.search(rf"^{layout}\s.*?\s(\d+) (?:fields|cells)", doc, re.M | re.S).group(1))
        for layout in synthetic.LAYOUTS
    }
    plans = {layout: plan_layout(layout, tmp_path / layout, 0, 1.0, 256) for layout in synthetic.LAYOUTS}
    assert {k: p.images for k, p in plans.items()} == expected
    fields = sum(plans[k].images for k in ("bbbc021", "rxrx1", "hpa", "synthetic"))
    cells = sum(plans[k].images for k in ("cyclops", "coos7"))
    assert f"{fields} fields" in doc and f"{cells} single-cell crops" in doc
    assert 600 <= fields <= 1000 and 900 <= cells <= 1300
    # The native layout has weak-label classes to find at min_count 30.
    rows = plans["synthetic"].tables["metadata.csv"]
    meta = pd.DataFrame(rows[1:], columns=rows[0])
    big = {
        col: (meta[col][meta[col] != ""].value_counts() >= 30).sum()
        for col in ("compound", "gene", "phenotype", "cell_type", "organism", "cell_visible")
    }
    assert big["compound"] >= 6 and big["gene"] >= 3 and big["phenotype"] >= 5 and big["cell_type"] >= 4
    assert big["organism"] >= 2 and big["cell_visible"] >= 1


def test_summary_matches_the_files_on_disk(collection):
    out, summary = collection
    assert set(summary["layouts"]) == set(synthetic.LAYOUTS)
    for layout, info in summary["layouts"].items():
        root = Path(info["root"])
        on_disk = [p for p in root.rglob("*") if p.is_file()]
        assert info["files"] == len(on_disk), layout
        assert Path(info["archive"]).is_file()
    gt = _ground_truth(out)
    for layout, info in summary["layouts"].items():
        assert info["defects"] == (gt.layout == layout).sum()


def test_bbbc021_tables_files_and_design(collection):
    out, summary = collection
    root = out / "bbbc021"
    images = pd.read_csv(root / "BBBC021_v1_image.csv")
    moa = pd.read_csv(root / "BBBC021_v1_moa.csv")
    compounds = pd.read_csv(root / "BBBC021_v1_compound.csv")
    assert list(moa.columns) == ["compound", "concentration", "moa"]
    assert list(compounds.columns) == ["compound", "smiles"]
    assert ((moa.compound == "DMSO") & (moa.concentration == 0) & (moa.moa == "DMSO")).sum() == 1
    assert len(images) == summary["layouts"]["bbbc021"]["images"]
    # Every image's three channel files exist at <plate>/<file>; PathName is Week/plate.
    pattern = re.compile(r"^[B-G]\d\d_s\d+_w[124][0-9A-F]{8}(-[0-9A-F]{4}){3}-[0-9A-F]{12}\.tif$")
    for row in images.itertuples():
        assert (
            row.Image_PathName_DAPI == f"{row.Image_Metadata_Plate_DAPI.split('_')[0]}/{row.Image_Metadata_Plate_DAPI}"
        )
        for name in (row.Image_FileName_DAPI, row.Image_FileName_Tubulin, row.Image_FileName_Actin):
            assert pattern.match(name), name
            assert (root / row.Image_PathName_DAPI.split("/")[1] / name).is_file()
    # Treatments join the MOA table; DMSO on every plate; batches as in the real set.
    joined = images.merge(
        moa,
        left_on=["Image_Metadata_Compound", "Image_Metadata_Concentration"],
        right_on=["compound", "concentration"],
        how="left",
    )
    assert joined.moa.notna().all()
    assert (
        images.groupby("Image_Metadata_Plate_DAPI").Image_Metadata_Compound.apply(lambda c: (c == "DMSO").any())
    ).all()
    joined["week"] = joined.Image_Metadata_Plate_DAPI.str.split("_").str[0]
    treated = joined[joined.moa != "DMSO"]
    weeks_per_moa = treated.groupby("moa").week.nunique()
    assert (weeks_per_moa == 1).sum() == 2 and len(weeks_per_moa) >= 7
    single = set(weeks_per_moa[weeks_per_moa == 1].index)
    weeks_per_compound = treated[~treated.moa.isin(single)].groupby("compound").week.nunique()
    assert (weeks_per_compound >= 2).all()
    assert (treated.groupby("moa").compound.nunique() >= 2).all()  # NSC needs other compounds
    assert (treated.groupby("compound").concentration.nunique() >= 3).all()


def test_bbbc021_columns_match_the_real_table(collection):
    real = REAL_DATA / "bbbc021" / "BBBC021_v1_image.csv.gz"
    if not real.is_file():
        pytest.skip(f"real BBBC021 metadata not found at {real}")
    out, _ = collection
    with open(out / "bbbc021" / "BBBC021_v1_image.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header == list(pd.read_csv(real, nrows=1).columns)
    real_moa = pd.read_csv(REAL_DATA / "bbbc021" / "BBBC021_v1_moa.csv", nrows=1)
    assert list(pd.read_csv(out / "bbbc021" / "BBBC021_v1_moa.csv", nrows=1).columns) == list(real_moa.columns)


def test_rxrx1_layout_has_sites_channels_and_one_incomplete_site(collection):
    out, summary = collection
    root = out / "rxrx1"
    train = pd.read_csv(root / "train.csv")
    controls = pd.read_csv(root / "train_controls.csv")
    test = pd.read_csv(root / "test.csv")
    test_controls = pd.read_csv(root / "test_controls.csv")
    assert list(train.columns) == ["id_code", "experiment", "plate", "well", "sirna"]
    assert (
        list(controls.columns)
        == list(test_controls.columns)
        == ["id_code", "experiment", "plate", "well", "sirna", "well_type"]
    )
    assert list(test.columns) == ["id_code", "experiment", "plate", "well"]
    assert set(controls.well_type) == {"negative_control", "positive_control"}
    cell_types = {e.split("-")[0] for e in pd.concat([train, controls]).experiment}
    assert cell_types == {"HEPG2", "HUVEC", "RPE", "U2OS"}
    incomplete = []
    for split, frame in (("train", pd.concat([train, controls])), ("test", pd.concat([test, test_controls]))):
        for row in frame.itertuples():
            assert row.id_code == f"{row.experiment}_{row.plate}_{row.well}"
            for site in (1, 2):
                folder = root / split / row.experiment / f"Plate{row.plate}"
                present = [c for c in range(1, 7) if (folder / f"{row.well}_s{site}_w{c}.png").is_file()]
                if present != list(range(1, 7)):
                    incomplete.append((folder / f"{row.well}_s{site}", present))
    assert len(incomplete) == 1 and incomplete[0][1] == [1, 2, 3, 4]
    gt = _ground_truth(out)
    missing = gt[gt.defect == "missing"].path.tolist()
    stem = incomplete[0][0].relative_to(root).as_posix()
    assert sorted(missing) == [f"{stem}_w5.png", f"{stem}_w6.png"]
    sample = np.asarray(Image.open(next(root.glob("train/*/Plate1/*_s1_w1.png"))))
    size = summary["image_size"]
    assert sample.dtype == np.uint8 and sample.shape == (size, size)


def test_hpa_cyclops_coos7_layouts(collection):
    out, _ = collection
    hpa = pd.read_csv(out / "hpa" / "train.csv", dtype=str)
    assert list(hpa.columns) == ["Id", "Target"]
    labels = [[int(t) for t in target.split()] for target in hpa.Target]
    assert all(0 <= t < 28 for ts in labels for t in ts)
    assert any(len(ts) > 1 for ts in labels) and len({t for ts in labels for t in ts}) >= 8
    for image_id in hpa.Id:
        for colour in ("red", "green", "blue", "yellow"):
            assert (out / "hpa" / "train" / f"{image_id}_{colour}.png").is_file()

    cyclops = out / "cyclops"
    labels = {p.name for p in cyclops.iterdir()}
    assert {"DEAD", "GHOST", "SPINDLE", "SPINDLEPOLE"} <= labels and len(labels) >= 14
    assert all(name == name.upper() for name in labels)
    gfp = sorted(cyclops.rglob("*_gfp.tif"))
    assert all(p.with_name(p.name.replace("_gfp.tif", "_rfp.tif")).is_file() for p in gfp)
    cell = tifffile.imread(next(p for p in cyclops.glob("NUCLEI/*_rfp.tif")))
    assert cell.dtype == np.float32 and cell.shape == (64, 64) and 0 < cell.max() < 1

    coos7 = out / "coos7"
    assert sorted(p.name for p in coos7.iterdir()) == ["test1", "test2", "test3", "test4", "train"]
    for split in coos7.iterdir():
        assert sorted(p.name for p in split.iterdir()) == sorted(COOS7_CLASSES)
    protein = sorted(coos7.rglob("*_protein.tif"))
    assert all(p.with_name(p.name.replace("_protein.tif", "_nucleus.tif")).is_file() for p in protein)
    assert tifffile.imread(protein[0]).dtype == np.uint16


def test_synthetic_native_layout_mixes_formats(collection):
    out, summary = collection
    root = out / "synthetic"
    meta = pd.read_csv(root / "metadata.csv", dtype=str, keep_default_na=False)
    assert list(meta.columns) == list(NATIVE_COLUMNS)
    assert len(meta) == summary["layouts"]["synthetic"]["images"]
    files = meta.files.str.split(";")
    suffixes = {Path(f).suffix for fs in files for f in fs}
    assert suffixes == {".tif", ".png"}
    stacks = meta[(files.map(len) == 1) & meta.channels.str.contains("|", regex=False)]
    assert len(stacks) > 0
    for row in stacks.itertuples():
        pages = tifffile.imread(root / row.files)
        assert pages.shape[0] == len(row.channels.split("|"))
    assert set(meta.microscopy) == {"fluorescence", "brightfield"}
    assert (meta[meta.microscopy == "brightfield"].channels == "brightfield").all()
    assert meta.batch.nunique() >= 2 and meta.plate.nunique() >= 4
    assert set(meta.organism) == {"human", "mouse"}
    for fs in files:
        assert all((root / f).is_file() for f in fs)


def test_sixteen_bit_tiffs_use_the_dynamic_range(collection):
    out, _ = collection
    gt = set(_ground_truth(out).path)
    checked = 0
    for layout, pattern in (("bbbc021", "*/*_w1*.tif"), ("synthetic", "images/*/*_dna.tif")):
        for path in sorted((out / layout).glob(pattern))[:10]:
            if path.relative_to(out / layout).as_posix() in gt:
                continue
            image = tifffile.imread(path)
            assert image.dtype == np.uint16
            assert len(np.unique(image)) > 256, path
            assert 200 < np.median(image) < 2000 and image.max() < 30000  # a part of the range
            checked += 1
    assert checked >= 10


def test_zips_extract_to_the_layout_roots(collection, tmp_path):
    out, summary = collection
    for layout, info in summary["layouts"].items():
        with zipfile.ZipFile(info["archive"]) as zf:
            names = zf.namelist()
            assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in zf.infolist())
            zf.extractall(tmp_path / layout)
        assert not any(n.startswith((layout + "/", "/")) for n in names)
        assert _hashes(tmp_path / layout) == _hashes(Path(info["root"]))


# -- hidden factors in the pixels -----------------------------------------------------------------


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist)
    mean = np.cumsum(hist * centres)
    between = (mean[-1] * weight / weight[-1] - mean) ** 2 / np.maximum(weight * (weight[-1] - weight), 1)
    return float(centres[np.argmax(between)])


def _bbbc021_features(out: Path) -> pd.DataFrame:
    root = out / "bbbc021"
    images = pd.read_csv(root / "BBBC021_v1_image.csv")
    moa = pd.read_csv(root / "BBBC021_v1_moa.csv")
    images = images.merge(
        moa, left_on=["Image_Metadata_Compound", "Image_Metadata_Concentration"], right_on=["compound", "concentration"]
    )
    defective = {Path(p).name for p in _ground_truth(out).path}
    rows = []
    for row in images.itertuples():
        names = (row.Image_FileName_DAPI, row.Image_FileName_Actin)
        if defective & set(names):
            continue
        folder = root / row.Image_Metadata_Plate_DAPI
        dna, actin = (tifffile.imread(folder / n).astype(float) for n in names)
        nuclei = dna > _otsu(dna)
        _, n_nuclei = ndimage.label(nuclei)
        cells = actin > _otsu(actin)
        rows.append(
            dict(
                plate=row.Image_Metadata_Plate_DAPI,
                week=row.Image_Metadata_Plate_DAPI.split("_")[0],
                compound=row.compound,
                concentration=row.concentration,
                moa=row.moa,
                nuclear_area=nuclei.sum() / max(n_nuclei, 1),
                actin_in_cells=actin[cells].mean() - np.percentile(actin, 2),
                dna_background=np.percentile(dna, 2),
                actin_background=np.percentile(actin, 2),
            )
        )
    return pd.DataFrame(rows)


def test_moa_effects_are_measurable_in_the_pixels(collection):
    """Top-dose DNA damage enlarges nuclei, protein-synthesis inhibitors dim the actin channel,
    both against the DMSO images of the same plate (as image-based profiling normalises)."""
    out, _ = collection
    feats = _bbbc021_features(out)
    dmso = feats[feats.moa == "DMSO"].groupby("plate")[["nuclear_area", "actin_in_cells"]].mean()
    feats = feats.merge(dmso, left_on="plate", right_index=True, suffixes=("", "_dmso"))
    top = feats.concentration == feats.groupby("compound").concentration.transform("max")

    def ratio(moa: str, column: str) -> float:
        chosen = feats[top & (feats.moa == moa)]
        return float((chosen[column] / chosen[column + "_dmso"]).mean())

    assert ratio("DNA damage", "nuclear_area") > 1.4
    assert ratio("Aurora kinase inhibitors", "nuclear_area") > 1.4
    assert ratio("Protein synthesis", "actin_in_cells") < 0.8
    # The effect grows with dose: lowest dose of DNA damage compounds changes nuclei less.
    low = feats.concentration == feats.groupby("compound").concentration.transform("min")
    damage = feats.moa == "DNA damage"
    low_ratio = (feats[low & damage].nuclear_area / feats[low & damage].nuclear_area_dmso).mean()
    assert low_ratio < ratio("DNA damage", "nuclear_area")


def test_batch_effect_is_measurable(collection):
    """DMSO images differ more between weeks than within a week (one-way ANOVA F)."""
    out, _ = collection
    dmso = _bbbc021_features(out).query("moa == 'DMSO'")
    for column in ("dna_background", "actin_background"):
        groups = [g[column].to_numpy() for _, g in dmso.groupby("week")]
        grand = dmso[column].mean()
        between = sum(len(g) * (g.mean() - grand) ** 2 for g in groups) / (len(groups) - 1)
        within = sum(((g - g.mean()) ** 2).sum() for g in groups) / (len(dmso) - len(groups))
        assert between / within > 10, column


def test_localisation_shows_in_single_cells(collection):
    """COOS-7-like crops: a nuclear protein follows the nucleus channel, a membrane one does not."""
    out, _ = collection
    defective = set(_ground_truth(out).path)

    def correlation(loc: str) -> float:
        values = []
        for protein in sorted((out / "coos7" / "train" / loc).glob("*_protein.tif")):
            if protein.relative_to(out / "coos7").as_posix() in defective:
                continue
            a = tifffile.imread(protein).astype(float).ravel()
            b = tifffile.imread(protein.with_name(protein.name.replace("_protein", "_nucleus"))).astype(float).ravel()
            values.append(np.corrcoef(a, b)[0, 1])
        return float(np.mean(values))

    assert correlation("nucleus") > 0.6
    assert correlation("plasma_membrane") < 0.3


# -- defects ---------------------------------------------------------------------------------------


def test_defects_are_real_and_listed(collection):
    out, _ = collection
    gt = _ground_truth(out)
    assert list(gt.columns) == list(synthetic.GROUND_TRUTH_COLUMNS)
    assert set(gt.defect) <= set(synthetic.DEFECT_KINDS)
    assert set(gt.layout) == set(synthetic.LAYOUTS)
    assert {"blank", "saturated", "binary", "text", "truncated", "empty_file", "missing"} == set(gt.defect)
    for row in gt.itertuples():
        path = out / row.layout / row.path
        if row.defect == "missing":
            assert not path.exists()
            continue
        if row.defect == "empty_file":
            assert path.stat().st_size == 0
            continue
        if row.defect == "truncated":
            assert path.stat().st_size > 0
            with pytest.raises((ValueError, OSError, IndexError, EOFError)):  # tifffile's errors for a cut file
                tifffile.imread(path)
            continue
        image = _read(path)
        top = np.iinfo(image.dtype).max if image.dtype.kind == "u" else None
        if row.defect == "blank":
            assert image.min() == image.max()
        elif row.defect == "binary":
            assert len(np.unique(image)) == 2
        elif row.defect == "saturated":
            assert np.mean(image == top) > 0.999
        elif row.defect == "text":
            # Lettering: many pixels share one bright value that natural pixels rarely hit,
            # all of them in the listed box, which they fill to each edge.
            x_min, y_min, x_max, y_max = (int(getattr(row, name)) for name in ("x_min", "y_min", "x_max", "y_max"))
            letters = image == image.max()
            inside = letters[y_min:y_max, x_min:x_max]
            assert inside.sum() > 0.003 * image.size
            assert letters.sum() - inside.sum() < 0.05 * inside.sum()
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        else:
            assert row.x_min == row.y_min == row.x_max == row.y_max == ""
    # The defective images stay listed in the layouts' own metadata, like real ones.
    listed = (out / "bbbc021" / "BBBC021_v1_image.csv").read_text()
    assert all(Path(p).name in listed for p in gt[gt.layout == "bbbc021"].path)
    meta = (out / "synthetic" / "metadata.csv").read_text()
    assert all(p in meta for p in gt[gt.layout == "synthetic"].path)


def test_healthy_images_are_not_flagged_by_the_defect_checks(collection):
    out, _ = collection
    defective = set(zip(_ground_truth(out).layout, _ground_truth(out).path))
    for layout, pattern in (
        ("bbbc021", "*/*.tif"),
        ("rxrx1", "train/*/*/*.png"),
        ("hpa", "train/*.png"),
        ("cyclops", "*/*.tif"),
        ("coos7", "*/*/*.tif"),
        ("synthetic", "images/*/*"),
    ):
        paths = [
            p
            for p in sorted((out / layout).glob(pattern))
            if (layout, p.relative_to(out / layout).as_posix()) not in defective
        ][:40]
        assert paths, layout
        for path in paths:
            image = _read(path)
            assert len(np.unique(image)) > 2, path


# -- native adapter ---------------------------------------------------------------------------------


def test_native_adapter_returns_the_canonical_table(collection):
    out, _ = collection
    root = out / "synthetic"
    meta = pd.read_csv(root / "metadata.csv", dtype=str, keep_default_na=False)
    result = adapt(root, "demo", {})
    table = result.table
    assert list(table.columns) == list(CANONICAL_FIELDS)
    assert len(table) == len(meta) and len(result.issues) == 0
    assert table.idx.tolist() == [f"demo-{i}" for i in range(len(meta))]
    assert (table.database == "synthetic").all() and (table.name == "demo").all() and (table.dir_name == "demo").all()
    assert (table.split == "").all()
    for row, native in zip(table.itertuples(), meta.itertuples()):
        expected = [str((root / f).resolve()) for f in native.files.split(";")]
        assert list(row.channel_paths) == expected
        assert row.path == str(Path(expected[0]).parent) and row.filename == Path(expected[0]).name
        assert row.channels == native.channels
        assert row.gene == (f"{native.gene.lower()} targeted" if native.gene else "")
        assert row.compound == native.compound.lower() and row.plate == native.plate
        if native.concentration:
            assert row.concentration == float(native.concentration)
        else:
            assert math.isnan(row.concentration)
    for column in LOWERCASE_COLUMNS:
        assert (table[column] == table[column].str.lower()).all()


def _write_metadata(root: Path, rows: list[list[str]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)


GOOD = [
    "a1",
    "images/p/a1_dna.tif;images/p/a1_actin.tif",
    "dna|actin",
    "human",
    "u2os",
    "nucleus|actin",
    "",
    "taxol",
    "0.1",
    "",
    "",
    "fluorescence",
    "p",
    "B02",
    "b1",
]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([list(NATIVE_COLUMNS) + ["colour"], GOOD + ["red"]], r"metadata\.csv: unknown column.*colour"),
        ([list(NATIVE_COLUMNS), GOOD[:-1]], r"metadata\.csv line 2: 14 fields"),
        ([list(NATIVE_COLUMNS), GOOD[:8] + ["lots"] + GOOD[9:]], r"metadata\.csv row 1 .*'a1'.*concentration 'lots'"),
        ([list(NATIVE_COLUMNS), GOOD[:2] + ["dna|actin|tubulin"] + GOOD[3:]], r"row 1 .*3 channel names for 2 files"),
        ([list(NATIVE_COLUMNS), GOOD[:11] + ["phase"] + GOOD[12:]], r"row 1 .*microscopy"),
        ([list(NATIVE_COLUMNS), GOOD, GOOD], r"metadata\.csv: duplicate image_id 'a1'"),
        ([list(NATIVE_COLUMNS), GOOD[:1] + ["../outside.tif"] + ["dna"] + GOOD[3:]], r"relative to the layout root"),
        ([list(NATIVE_COLUMNS)], r"no image rows"),
        ([["image_id", "files"]], r"missing required column.*microscopy"),
    ],
)
def test_native_adapter_rejects_bad_metadata(tmp_path, rows, message):
    _write_metadata(tmp_path, rows)
    with pytest.raises(SourceError, match=message):
        adapt(tmp_path, "demo", {})


def test_native_adapter_rejects_missing_metadata_and_options(tmp_path):
    with pytest.raises(SourceError, match="metadata.csv"):
        adapt(tmp_path, "demo", {})
    _write_metadata(tmp_path, [list(NATIVE_COLUMNS), GOOD])
    with pytest.raises(SourceError, match="unknown option; this adapter accepts: z_projection"):
        adapt(tmp_path, "demo", {"extensions": [".tif"]})
    assert len(adapt(tmp_path, "demo", {}).table) == 1  # missing image files are not checked here


# -- the default run -------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_generation_time(tmp_path):
    start = time.perf_counter()
    summary = synthetic.generate_collection(tmp_path, seed=7)
    elapsed = time.perf_counter() - start
    counts = {k: v["images"] for k, v in summary["layouts"].items()}
    print(f"default synthetic collection: {elapsed:.1f} s, {counts}")
    assert counts == {k: plan_layout(k, tmp_path / k, 7, 1.0, 256).images for k in synthetic.LAYOUTS}
