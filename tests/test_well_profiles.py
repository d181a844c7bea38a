"""Precomputed per-well profiles (config `well_profiles`, rule evaluate_well_profiles) on the real
BBBC021 tables: Ljosa et al. 2013's CellProfiler per-well means, the image and MOA tables."""

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from workflow_helpers import DATA, REPO, check, snakemake, write_config

from cytopretrain.core.config import validate_config
from cytopretrain.core.errors import ConfigError, WellProfileError
from cytopretrain.evaluation import protocols as ev
from cytopretrain.evaluation.well_profiles import evaluate_well_profiles

BBBC021 = DATA / "bbbc021"
WELLS = BBBC021 / "ljosa_jbiomolscreen_2013_per_well_mean.csv.gz"
IMAGES = BBBC021 / "BBBC021_v1_image.csv.gz"
MOA = BBBC021 / "BBBC021_v1_moa.csv"
needs_data = pytest.mark.skipif(not BBBC021.is_dir(), reason=f"real BBBC021 data not found at {BBBC021}")


def local_entry(**overrides) -> dict:
    return {"path": str(WELLS), "image_csv": str(IMAGES), "moa_csv": str(MOA), **overrides}


def as_json(value):
    """What a result looks like once written by the rule (tuples become lists, numbers floats)."""
    return json.loads(json.dumps(value, default=float))


@needs_data
@pytest.mark.slow
def test_rule_evaluates_ljosa_profiles_and_summarizes_them(tmp_path):
    # The same Ljosa table three ways: local CSV files with mean aggregation, a Parquet copy
    # with the image and MOA tables downloaded by a `files` source, and median aggregation.
    wells = pd.read_csv(WELLS)
    wells.to_parquet(tmp_path / "wells.parquet", index=False)
    downloaded = {
        "image_csv": {"source": "bbbc021_tables", "file": IMAGES.name},
        "moa_csv": {"source": "bbbc021_tables", "file": MOA.name},
    }
    config = {
        "sources": {"bbbc021_tables": {"urls": [IMAGES.as_uri(), MOA.as_uri()], "archive": "none", "role": "files"}},
        "well_profiles": {
            "ljosa_mean": local_entry(),
            "ljosa_parquet": {"path": "wells.parquet", **downloaded},
            "ljosa_median": local_entry(aggregate="median"),
        },
    }
    write_config(tmp_path, config)
    result = check(snakemake(tmp_path, "--cores", "2"))
    output = result.stdout + result.stderr
    # Nothing but the evaluation: no curation, training or report without pretrain sources.
    assert "rule clean_metadata" not in output and "rule merge_metadata" not in output
    assert not (tmp_path / "results" / "shards").exists() and not (tmp_path / "results" / "report").exists()
    downloads = tmp_path / "results" / "download" / "bbbc021_tables"
    assert (downloads / IMAGES.name).read_bytes() == IMAGES.read_bytes()
    assert (downloads / MOA.name).read_bytes() == MOA.read_bytes()

    expected = {
        aggregate: as_json(ev.bbbc021_from_well_profiles(WELLS, IMAGES, MOA, aggregate=aggregate))
        for aggregate in ("mean", "median")
    }
    # Known figures of these profiles with mean aggregation.
    assert (expected["mean"]["nsc"]["correct"], expected["mean"]["nsc"]["n"]) == (87, 103)
    assert (expected["mean"]["nscb"]["correct"], expected["mean"]["nscb"]["n"]) == (65, 92)
    records = {}
    for name, aggregate in (("ljosa_mean", "mean"), ("ljosa_parquet", "mean"), ("ljosa_median", "median")):
        record = json.loads((tmp_path / "results" / "eval" / "well_profiles" / f"{name}.json").read_text())
        records[name] = record
        assert (record["benchmark"], record["model"], record["published"], record["label"]) == (
            "bbbc021",
            name,
            "bbbc021_nsc",
            "moa",
        )
        assert (record["n_profiles"], record["n_features"]) == (632, 516)
        assert record["settings"]["aggregate"] == aggregate
        assert record["results"] == {"nsc": expected[aggregate]["nsc"], "nscb": expected[aggregate]["nscb"]}
        for protocol in ("nsc", "nscb"):
            assert {"n", "correct", "accuracy", "ci95", "per_class", "confusion"} <= set(record["results"][protocol])
    assert records["ljosa_parquet"]["settings"]["files"] == {
        "path": "wells.parquet",
        "image_csv": f"results/download/bbbc021_tables/{IMAGES.name}",
        "moa_csv": f"results/download/bbbc021_tables/{MOA.name}",
    }

    summary = pd.read_csv(
        tmp_path / "results" / "eval" / "summary.tsv", sep="\t", keep_default_na=False, na_values=[""]
    )
    assert len(summary) == 6 and set(summary["benchmark"]) == {"bbbc021"}
    for row in summary.itertuples():
        truth = records[row.model]["results"][row.protocol]
        assert (row.metric, row.value, row.n, row.correct) == (
            "accuracy",
            truth["accuracy"],
            truth["n"],
            truth["correct"],
        )
        assert row.ci95 == pytest.approx(truth["ci95"])
        if row.protocol == "nsc":
            # CytoImageNet's Table 2 (random init, ImageNet, CytoImageNet, both) beside ours.
            assert (
                row.published_random_init,
                row.published_imagenet,
                row.published_cytoimagenet,
                row.published_both,
            ) == pytest.approx((0.2718, 0.835, 0.835, 0.8641))
        else:
            assert math.isnan(row.published_cytoimagenet)


@needs_data
def test_tsv_table_and_errors_naming_key_and_file(tmp_path):
    wells = pd.read_csv(WELLS)
    wells.rename(columns={"Image_Metadata_Plate": "Plate"}).to_csv(tmp_path / "wells.tsv", sep="\t", index=False)
    spec = {"plate_col": "Plate", "well_col": "Image_Metadata_Well", "aggregate": "mean"}
    files = {"path": str(tmp_path / "wells.tsv"), "image_csv": str(IMAGES), "moa_csv": str(MOA)}
    record, embedding = evaluate_well_profiles("renamed", spec, files)
    assert (record["results"]["nsc"]["correct"], record["results"]["nscb"]["correct"]) == (87, 65)
    # The embedding holds the wells NSC uses: treated, with an MOA (its n_rows_used).
    assert len(embedding) == record["results"]["nsc"]["n_rows_used"] > 0
    assert list(embedding.columns) == ["idx", "label", "x", "y"] and embedding["idx"].is_unique
    assert set(embedding["label"]) == {t["moa"] for t in record["results"]["nsc"]["treatments"]}
    assert np.isfinite(embedding[["x", "y"]].to_numpy()).all()

    with pytest.raises(
        WellProfileError,
        match=r"^well_profiles\.renamed\.plate_col: column "
        r"'Image_Metadata_Plate' is not in .*wells\.tsv",
    ):
        evaluate_well_profiles("renamed", {**spec, "plate_col": "Image_Metadata_Plate"}, files)
    with pytest.raises(WellProfileError, match=r"^well_profiles\.renamed\.moa_csv: file not found: .*absent\.csv"):
        evaluate_well_profiles("renamed", spec, {**files, "moa_csv": str(tmp_path / "absent.csv")})
    pd.read_csv(MOA).drop(columns="moa").to_csv(tmp_path / "moa.csv", index=False)
    with pytest.raises(
        WellProfileError, match=r"^well_profiles\.renamed\.moa_csv \(.*moa\.csv\): column\(s\) \['moa'\]"
    ):
        evaluate_well_profiles("renamed", spec, {**files, "moa_csv": str(tmp_path / "moa.csv")})


@needs_data
@pytest.mark.slow
def test_rule_fails_naming_the_plate_column_key_and_file(tmp_path):
    pd.read_csv(WELLS).drop(columns="Image_Metadata_Plate").to_csv(tmp_path / "no_plate.csv.gz", index=False)
    write_config(tmp_path, {"well_profiles": {"broken": local_entry(path="no_plate.csv.gz")}})
    result = snakemake(tmp_path, "--cores", "1")
    assert result.returncode != 0
    message = "well_profiles.broken.plate_col: column 'Image_Metadata_Plate' is not in no_plate.csv.gz"
    assert message in result.stdout + result.stderr
    assert message in (tmp_path / "logs" / "evaluate_well_profiles" / "broken.log").read_text()
    assert not (tmp_path / "results" / "eval" / "well_profiles" / "broken.json").exists()


def test_unknown_well_profiles_key_stops_the_dry_run(tmp_path):
    write_config(tmp_path, {"well_profiles": {"ljosa": local_entry(plate_column="Plate")}})
    result = snakemake(tmp_path, "-n")
    assert result.returncode != 0
    assert "config key 'well_profiles.ljosa.plate_column': unknown key" in result.stdout + result.stderr


def test_missing_local_table_is_announced_with_its_key(tmp_path):
    write_config(tmp_path, {"well_profiles": {"mine": local_entry(path="data/my_wells.csv")}})
    result = snakemake(tmp_path, "-n")
    output = result.stdout + result.stderr
    assert "config key 'well_profiles.mine.path': data/my_wells.csv does not exist" in output
    assert "per-well profile table" in output


@needs_data
def test_demo_with_well_profiles_plans_them_beside_the_cnn_evaluations(tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["well_profiles"] = {"ljosa": local_entry()}
    write_config(tmp_path, config)
    plan = check(snakemake(tmp_path, "-n", "--quiet", "rules"))
    counts = dict(
        line.split()
        for line in (plan.stdout + plan.stderr).splitlines()
        if len(line.split()) == 2 and line.split()[1].isdigit()
    )
    assert counts["evaluate_well_profiles"] == "1" and counts["summarize_evaluation"] == "1"
    # The demo's curation, training and report stay; the report draws the per-well profiles'
    # embedding and confusion matrix beside the CNN models'.
    assert {"write_shards", "train_pretext", "evaluate", "report"} <= set(counts)
    plan = check(snakemake(tmp_path, "-n", "results/report/report.html"))
    report_job = (plan.stdout + plan.stderr).split("rule report:")[1].split("\n\n")[0]
    assert "results/eval/well_profiles/ljosa.json" in report_job


# --- config validation -----------------------------------------------------------------------


def profiles_config(**entry) -> dict:
    return {
        "sources": {
            "tables": {
                "urls": ["https://example.org/BBBC021_v1_image.csv", "https://example.org/BBBC021_v1_moa.csv"],
                "role": "files",
            }
        },
        "well_profiles": {
            "ljosa": {
                "path": "wells.csv.gz",
                "image_csv": {"source": "tables", "file": "BBBC021_v1_image.csv"},
                "moa_csv": {"source": "tables", "file": "BBBC021_v1_moa.csv"},
                **entry,
            }
        },
    }


def test_well_profiles_defaults():
    config = validate_config(profiles_config())
    assert config["sources"]["tables"]["role"] == "files"
    assert {k: config["well_profiles"]["ljosa"][k] for k in ("plate_col", "well_col", "aggregate")} == {
        "plate_col": "Image_Metadata_Plate",
        "well_col": "Image_Metadata_Well",
        "aggregate": "mean",
    }
    demo = validate_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    assert demo["well_profiles"] == {}


def _set(path, value):
    def mutate(config):
        *parents, last = path
        node = config
        for key in parents:
            node = node[key]
        node[last] = value

    return mutate


def _runs(config):
    config["training"] = {"runs": {"weak": {"method": "weak_label", "backbone": "resnet18"}}}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_set(["well_profiles", "ljosa", "plate_column"], "Plate"), "'well_profiles.ljosa.plate_column': unknown key"),
        (_set(["well_profiles", "ljosa", "aggregate"], "max"), "'well_profiles.ljosa.aggregate'"),
        (
            _set(["well_profiles", "ljosa", "image_csv"], {"source": "tables"}),
            "'well_profiles.ljosa.image_csv': give a file path or {source:",
        ),
        (_set(["well_profiles", "Ljosa!"], {}), "'well_profiles'"),
        (
            _set(["well_profiles", "ljosa", "moa_csv", "source"], "nowhere"),
            "'well_profiles.ljosa.moa_csv.source': 'nowhere' is not a source",
        ),
        (
            _set(["well_profiles", "ljosa", "moa_csv", "file"], "../moa.csv"),
            "'well_profiles.ljosa.moa_csv.file': '../moa.csv' must be a relative path",
        ),
        (
            _set(["well_profiles", "ljosa", "path"], "wells.xlsx"),
            "'well_profiles.ljosa.path': 'wells.xlsx' is not a table",
        ),
        (_set(["well_profiles", "ljosa", "well_col"], "Image_Metadata_Plate"), "'well_profiles.ljosa.well_col'"),
        (
            _set(["sources", "spare"], {"url": "https://example.org/x.csv", "role": "files"}),
            "'sources.spare.role': a 'files' source is only downloaded",
        ),
        (lambda c: c.clear(), "'sources': nothing to do"),
        (_runs, "'sources': training.runs train on the curated set"),
        (
            lambda c: [_runs(c), c["well_profiles"].update(random_weak=c["well_profiles"].pop("ljosa"))],
            "'well_profiles.random_weak': the name is already a model",
        ),
        (
            _set(["benchmarks"], {"well_profiles": {"source": "tables", "protocols": ["nsc"]}}),
            "'benchmarks.well_profiles': the name is reserved",
        ),
    ],
)
def test_well_profiles_errors_name_the_key(mutate, message):
    config = copy.deepcopy(profiles_config())
    mutate(config)
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert f"config key {message}" in str(error.value)
