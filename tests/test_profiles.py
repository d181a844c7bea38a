"""Profile tables (config `profiles`, rule evaluate_profiles) on the real BBBC021 tables: Ljosa
et al. 2013's CellProfiler per-well means joined to the image and MOA tables, the same wells as a
pycytominer-style table, and every kind of bad input."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics.pairwise import cosine_distances
from sklearn.preprocessing import StandardScaler
from workflow_helpers import DATA, REPO, check, snakemake, write_config

from cytopretrain.core.config import validate_config
from cytopretrain.core.errors import ConfigError, ProfileError
from cytopretrain.evaluation.profiles import evaluate_profiles, prepare_profiles

BBBC021 = DATA / "bbbc021"
WELLS = BBBC021 / "ljosa_jbiomolscreen_2013_per_well_mean.csv.gz"
IMAGES = BBBC021 / "BBBC021_v1_image.csv.gz"
MOA = BBBC021 / "BBBC021_v1_moa.csv"
needs_data = pytest.mark.skipif(not BBBC021.is_dir(), reason=f"real BBBC021 data not found at {BBBC021}")
LJOSA = yaml.safe_load((REPO / "config" / "experiments" / "bbbc021_profiles.yaml").read_text())["profiles"]
FILES = {"path": str(WELLS), "join": [str(IMAGES), str(MOA)]}


def entry(**overrides) -> dict:
    """The experiment config's Ljosa entry (mean), validated, with ``overrides``."""
    spec = {**copy.deepcopy(LJOSA["ljosa2013_cellprofiler"]), **overrides}
    config = {"sources": {"t": {"path": "/t", "role": "files"}}, "profiles": {"ljosa": spec}}
    config["profiles"]["ljosa"]["path"] = {"source": "t", "file": "wells.csv.gz"}
    for join in config["profiles"]["ljosa"]["join"]:
        join["path"] = {"source": "t", "file": "table.csv"}
    return validate_config(config)["profiles"]["ljosa"]


@needs_data
@pytest.mark.parametrize("aggregate, nsc, nscb", [("mean", 87, 65), ("median", 91, 67)])
def test_ljosa_figures_through_profiles(aggregate, nsc, nscb):
    """The documented figures of the experiment config, unchanged by the general path."""
    record, embedding = evaluate_profiles("ljosa", entry(aggregate=aggregate), FILES)
    results = record["results"]
    assert (results["nsc"]["correct"], results["nsc"]["n"]) == (nsc, 103)
    assert (results["nscb"]["correct"], results["nscb"]["n"]) == (nscb, 92)
    assert results["nscb"]["dropped_moas"] == ["Cholesterol-lowering", "Kinase inhibitors"]
    assert (record["n_rows"], record["n_features"], record["n_controls"], record["join_unmatched"]) == (
        632,
        516,
        330,
        0,
    )
    assert (record["benchmark"], record["model"], record["published"]) == ("bbbc021", "ljosa", "bbbc021_nsc")
    assert len(embedding) == 632 and np.isfinite(embedding[["x", "y"]].to_numpy()).all()
    assert results["nsc"]["chance_accuracy"] < 0.1 < results["nsc"]["accuracy"] - 2 * results["nsc"]["ci95"]


def joined_wells(how: str) -> pd.DataFrame:
    """The Ljosa wells joined by hand (pandas) to their compound, concentration and MOA."""
    images = pd.read_csv(IMAGES).drop_duplicates(["Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI"])
    return (
        pd.read_csv(WELLS)
        .merge(
            images,
            left_on=["Image_Metadata_Plate", "Image_Metadata_Well"],
            right_on=["Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI"],
        )
        .merge(
            pd.read_csv(MOA),
            how=how,
            left_on=["Image_Metadata_Compound", "Image_Metadata_Concentration"],
            right_on=["compound", "concentration"],
        )
    )


@needs_data
def test_ljosa_nsc_and_map_recomputed_independently():
    """NSC with pandas and scikit-learn from the raw tables; MOA retrieval of the treatments with
    copairs (positives: same MOA, other compound)."""
    from copairs.map import average_precision

    record, _ = evaluate_profiles("ljosa", entry(), FILES)
    wells = pd.read_csv(WELLS)
    joined = joined_wells(how="inner")
    joined = joined[joined["compound"] != "DMSO"].reset_index(drop=True)
    z = pd.DataFrame(StandardScaler().fit_transform(joined[wells.columns[2:]]))
    profiles = z.groupby([joined["compound"], joined["concentration"]]).mean()
    labels = joined.groupby(["compound", "concentration"])["moa"].first().loc[profiles.index].to_numpy()
    compounds = profiles.index.get_level_values(0).to_numpy()
    distance = cosine_distances(profiles.to_numpy())
    distance[compounds[:, None] == compounds[None, :]] = np.inf
    assert record["results"]["nsc"]["correct"] == int((labels[distance.argmin(axis=1)] == labels).sum())

    # map runs on the raw treatment means (aggregate: mean), not on nsc's z-scored ones
    raw = joined.groupby(["compound", "concentration"])[list(wells.columns[2:])].mean().loc[profiles.index]
    meta = pd.DataFrame({"moa": labels, "compound": compounds})
    ap = average_precision(
        meta,
        raw.to_numpy(),
        pos_sameby=["moa"],
        pos_diffby=["compound"],
        neg_sameby=[],
        neg_diffby=["moa"],
        progress_bar=False,
    )
    per_moa = ap.dropna(subset=["average_precision"]).groupby("moa")["average_precision"].mean()
    result = record["results"]["map"]
    assert result["n"] == int(ap["average_precision"].notna().sum())
    for moa, value in per_moa.items():
        assert result["per_class"][moa]["mean_average_precision"] == pytest.approx(value, abs=1e-9)


def pycytominer_style(tmp_path) -> str:
    """The Ljosa wells as pycytominer writes per-well profiles: Metadata_ columns (moa included,
    as pycytominer's annotate does), then features; a few undefined and constant features."""
    wells = pd.read_csv(WELLS)
    joined = joined_wells(how="left")
    table = pd.DataFrame(
        {
            "Metadata_Plate": joined["Image_Metadata_Plate"],
            "Metadata_Well": joined["Image_Metadata_Well"],
            "Metadata_broad_sample": joined["Image_Metadata_Compound"],
            "Metadata_mmoles_per_liter": joined["Image_Metadata_Concentration"],
            "Metadata_moa": joined["moa"].where(joined["Image_Metadata_Compound"] != "DMSO"),
        }
    )
    features = joined[wells.columns[2:]].copy()
    features.iloc[3, 0] = np.nan  # an undefined measurement in one well
    features.iloc[:, 1] = 0.25  # a constant feature
    path = tmp_path / "plate_profiles.csv.gz"
    pd.concat([table, features], axis=1).to_csv(path, index=False)
    return str(path)


def pycytominer_entry(**overrides) -> dict:
    spec = {
        "path": "p.csv.gz",
        "label": "Metadata_moa",
        "perturbation": ["Metadata_broad_sample", "Metadata_mmoles_per_liter"],
        "batch": {"column": "Metadata_Plate", "separator": "_"},
        "controls": {"Metadata_broad_sample": "DMSO"},
        "normalize": {"method": "robust_mad", "fit": "controls", "by_batch": True},
        "feature_select": {"variance": True, "correlation": 0.9},
        "protocols": ["nsc", "nscb", "map", "replicate_map"],
        "replicate_map": {"null_size": 1000},
        "map": {"null_size": 1000},
        **overrides,
    }
    return validate_config({"profiles": {"lincs": spec}})["profiles"]["lincs"]


@needs_data
def test_a_pycytominer_style_table_evaluates_with_every_step(tmp_path):
    from pycytominer import feature_select, normalize

    path = pycytominer_style(tmp_path)
    record, _ = evaluate_profiles("lincs", pycytominer_entry(), {"path": path})
    assert record["features_dropped"] == {
        "non_finite": [pd.read_csv(WELLS).columns[2]],
        "constant": [pd.read_csv(WELLS).columns[3]],
    }
    assert record["n_features_input"] == 516 and record["n_features"] + record["n_features_deselected"] == 514
    assert 0 < record["n_features"] < 514 and record["n_controls"] == 330
    results = record["results"]
    # the same steps by hand with pycytominer: robust MAD on each week's DMSO wells, then selection
    table, features, _ = prepare_profiles("lincs", pycytominer_entry(), {"path": path})
    raw = pd.read_csv(path).drop(
        columns=record["features_dropped"]["non_finite"] + record["features_dropped"]["constant"]
    )
    raw["Metadata_week"] = raw["Metadata_Plate"].str.split("_").str[0]
    names = [c for c in raw.columns if not c.startswith("Metadata_")]
    parts = [
        normalize(
            group,
            features=names,
            meta_features=[c for c in raw.columns if c.startswith("Metadata_")],
            samples="Metadata_broad_sample == 'DMSO'",
            method="mad_robustize",
        )
        for _, group in raw.groupby("Metadata_week", sort=False)
    ]
    normalized = pd.concat(parts).loc[raw.index]
    selected = feature_select(
        normalized, features=names, operation=["variance_threshold", "correlation_threshold"], corr_threshold=0.9
    )
    assert features == [c for c in names if c in selected.columns]
    np.testing.assert_allclose(table[features].to_numpy(), selected[features].to_numpy(), rtol=1e-10, atol=1e-12)
    assert results["nsc"]["n"] == 103 and results["nscb"]["n"] == 92
    assert results["replicate_map"]["n_groups"] == 103 and 0 < results["replicate_map"]["fraction_retrieved"] <= 1
    # MOA retrieval over wells: the wells of a compound (any dose) are never each other's hits
    assert results["map"]["pairs"]["pos_diffby"] == ["Metadata__compound"]
    assert results["map"]["rows_dropped"]["control"] == 330


@needs_data
def test_bad_tables_give_errors_that_name_the_config_key(tmp_path):
    path = pycytominer_style(tmp_path)
    files = {"path": path}
    # a column pycytominer already wrote, joined again
    moa_join = [
        {
            "path": "m.csv",
            "on": {"Metadata_broad_sample": "compound", "Metadata_mmoles_per_liter": "concentration"},
            "columns": {"moa": "Metadata_moa"},
        }
    ]
    with pytest.raises(
        ProfileError,
        match=r"'profiles\.lincs\.join\[0\]\.columns': column\(s\) \['Metadata_moa'\] already in the table",
    ):
        evaluate_profiles("lincs", pycytominer_entry(join=moa_join), {"path": path, "join": [str(MOA)]})
    with pytest.raises(
        ProfileError,
        match=r"'profiles\.lincs\.label': column\(s\) \['Metadata_mechanism'\] not in the table; "
        r"it has Metadata_Plate, Metadata_Well",
    ):
        evaluate_profiles("lincs", pycytominer_entry(label="Metadata_mechanism"), files)
    text = pd.read_csv(path)
    text.insert(5, "Cells_Note", "ok")
    text.to_csv(tmp_path / "text.csv", index=False)
    with pytest.raises(ProfileError, match=r"'profiles\.lincs': column\(s\) \['Cells_Note'\] are not numeric"):
        evaluate_profiles("lincs", pycytominer_entry(), {"path": str(tmp_path / "text.csv")})
    with pytest.raises(ProfileError, match=r"'profiles\.lincs\.path': file not found: .*absent\.csv"):
        evaluate_profiles("lincs", pycytominer_entry(), {"path": str(tmp_path / "absent.csv")})
    one_week = pd.read_csv(path)
    one_week = one_week[one_week["Metadata_Plate"].str.startswith("Week1_")]
    one_week.to_csv(tmp_path / "week1.csv", index=False)
    with pytest.raises(ProfileError, match=r"^config key 'profiles\.lincs': nscb: fewer than two treatments"):
        evaluate_profiles(
            "lincs",
            pycytominer_entry(normalize={"method": "none"}, protocols=["nscb"]),
            {"path": str(tmp_path / "week1.csv")},
        )


@needs_data
def test_rows_without_a_label_or_perturbation_are_dropped_and_counted(tmp_path):
    table = pd.read_csv(pycytominer_style(tmp_path))
    treated = table.index[table["Metadata_moa"].notna()]
    table.loc[treated[:5], "Metadata_moa"] = np.nan  # treated wells without a label
    table.loc[treated[5:8], "Metadata_broad_sample"] = np.nan  # labelled wells without a compound
    table.to_csv(tmp_path / "holes.csv", index=False)
    spec = pycytominer_entry(
        normalize={"method": "standardize"}, feature_select={}, protocols=["map", "knn_loo"], controls={}
    )
    record, _ = evaluate_profiles("lincs", spec, {"path": str(tmp_path / "holes.csv")})
    dropped = record["results"]["map"]["rows_dropped"]
    labelled = table["Metadata_moa"].notna()
    assert dropped["no label"] == int((~labelled).sum())
    assert dropped["no perturbation"] == int((labelled & table["Metadata_broad_sample"].isna()).sum()) == 3
    assert record["results"]["knn_loo"]["n"] == int(labelled.sum())


# --- config validation -----------------------------------------------------------------------


def files_config(**changes) -> dict:
    config = {
        "sources": {
            "tables": {"urls": ["https://example.org/wells.csv.gz", "https://example.org/moa.csv"], "role": "files"}
        },
        "profiles": {
            "plate": {
                "path": {"source": "tables", "file": "wells.csv.gz"},
                "join": [{"path": {"source": "tables", "file": "moa.csv"}, "on": {"Metadata_compound": "compound"}}],
                "label": "Metadata_moa",
                "perturbation": "Metadata_compound",
                "controls": {"Metadata_compound": "DMSO"},
                "protocols": ["map", "replicate_map", "nsc"],
            }
        },
    }
    config["profiles"]["plate"].update(changes)
    return config


def test_profile_defaults_come_from_the_library():
    from cytopretrain.evaluation.profiles import PROFILE_DEFAULTS

    spec = validate_config(files_config())["profiles"]["plate"]
    for key in ("benchmark", "published", "features", "batch", "aggregate", "k"):
        assert spec[key] == PROFILE_DEFAULTS[key]
    assert (
        spec["normalize"] == PROFILE_DEFAULTS["normalize"]
        and spec["feature_select"] == PROFILE_DEFAULTS["feature_select"]
    )
    assert validate_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))["profiles"] == {}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"plate_col": "Plate"}, "'profiles.plate.plate_col': unknown key"),
        ({"aggregate": "max"}, "'profiles.plate.aggregate'"),
        ({"path": {"source": "tables"}}, "'profiles.plate.path': give a file path or {source:"),
        ({"path": {"source": "nowhere", "file": "x.csv"}}, "'profiles.plate.path.source': 'nowhere' is not a source"),
        (
            {"path": {"source": "tables", "file": "../x.csv"}},
            "'profiles.plate.path.file': '../x.csv' must be a relative path",
        ),
        ({"path": "wells.xlsx"}, "'profiles.plate.path': 'wells.xlsx' is not a table"),
        ({"protocols": ["nscb"]}, "'profiles.plate.protocols': nscb needs batch"),
        ({"protocols": ["mAP"]}, "'profiles.plate.protocols.0'"),
        ({"label": None}, "'profiles.plate.protocols': map needs label"),
        ({"aggregate": "mean"}, "'profiles.plate.aggregate': replicate_map needs the replicates"),
        (
            {"normalize": {"method": "robust_mad", "fit": "controls"}, "controls": {}},
            "'profiles.plate.protocols': replicate_map needs controls",
        ),
        (
            {"normalize": {"method": "standardize", "by_batch": True}},
            "'profiles.plate.normalize.by_batch': needs `batch`",
        ),
        ({"map": {"pos_samby": ["Metadata_moa"]}}, "'profiles.plate.map.pos_samby': unknown key"),
        (
            {"join": [{"path": "moa.csv", "on": {"Metadata_compound": "compound"}, "columns": {"moa": "moa"}}]},
            "'profiles.plate.join.0.columns.moa'",
        ),
    ],
)
def test_profile_errors_name_the_key(changes, message):
    with pytest.raises(ConfigError) as error:
        validate_config(files_config(**changes))
    assert f"config key {message}" in str(error.value)


def test_a_files_source_nobody_reads_and_a_reserved_benchmark_name_are_refused():
    config = files_config()
    config["sources"]["spare"] = {"url": "https://example.org/x.csv", "role": "files"}
    with pytest.raises(ConfigError, match="'sources.spare.role': a 'files' source is only downloaded"):
        validate_config(config)
    config = files_config()
    config["benchmarks"] = {"profiles": {"source": "tables", "protocols": ["nsc"]}}
    with pytest.raises(ConfigError, match="'benchmarks.profiles': the name is reserved"):
        validate_config(config)


# --- the workflow ------------------------------------------------------------------------------


@needs_data
@pytest.mark.slow
def test_rule_evaluates_profiles_and_summarizes_them(tmp_path):
    """The Ljosa entries of the experiment config, with the tables as a `files` source served
    from file:// URLs and a pycytominer-style Parquet table beside them."""
    config = yaml.safe_load((REPO / "config" / "experiments" / "bbbc021_profiles.yaml").read_text())
    config["sources"]["bbbc021_tables"]["urls"] = [IMAGES.as_uri(), MOA.as_uri()]
    config["sources"]["ljosa2013"]["url"] = WELLS.as_uri()
    for spec in config["profiles"].values():
        spec["join"][0]["path"]["file"] = IMAGES.name
    pd.read_csv(pycytominer_style(tmp_path)).to_parquet(tmp_path / "plate.parquet", index=False)
    config["profiles"]["plate"] = {
        **pycytominer_entry(path="plate.parquet", benchmark="bbbc021", protocols=["nsc", "map"])
    }
    write_config(tmp_path, config)
    result = check(snakemake(tmp_path, "--cores", "2"))
    output = result.stdout + result.stderr
    assert "rule clean_metadata" not in output and not (tmp_path / "results" / "shards").exists()
    records = {
        name: json.loads((tmp_path / "results" / "eval" / "profiles" / f"{name}.json").read_text())
        for name in ("ljosa2013_cellprofiler", "ljosa2013_cellprofiler_median", "plate")
    }
    assert records["ljosa2013_cellprofiler"]["results"]["nsc"]["correct"] == 87
    assert records["ljosa2013_cellprofiler_median"]["results"]["nsc"]["correct"] == 91
    summary = pd.read_csv(
        tmp_path / "results" / "eval" / "summary.tsv", sep="\t", keep_default_na=False, na_values=[""]
    )
    assert set(summary["benchmark"]) == {"bbbc021"} and set(summary["model"]) == set(records)
    for row in summary.itertuples():
        truth = records[row.model]["results"][row.protocol]
        value = truth.get("accuracy", truth.get("mean_average_precision"))
        assert row.value == pytest.approx(value) and row.n == truth["n"]
        if row.protocol == "nsc" and records[row.model]["published"]:
            assert row.published_cytoimagenet == pytest.approx(0.835)
        else:
            assert math.isnan(row.published_cytoimagenet)


def test_unknown_key_and_missing_table_stop_the_dry_run(tmp_path):
    write_config(
        tmp_path,
        {
            "profiles": {
                "mine": {"path": "data/my_wells.csv", "protocols": ["map"], "label": "Metadata_moa", "plate": "P"}
            }
        },
    )
    result = snakemake(tmp_path, "-n")
    assert result.returncode != 0 and "config key 'profiles.mine.plate': unknown key" in result.stdout + result.stderr
    write_config(
        tmp_path, {"profiles": {"mine": {"path": "data/my_wells.csv", "protocols": ["map"], "label": "Metadata_moa"}}}
    )
    output = snakemake(tmp_path, "-n").stderr
    assert "config key 'profiles.mine.path': data/my_wells.csv does not exist" in output
