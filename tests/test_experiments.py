"""Every experiment config plans (dry run) with the real source URLs, and says up front what a
source needs from the user (Kaggle token, Aspera client, a manual download)."""

import re

import pytest
import yaml
from workflow_helpers import REPO, check, snakemake

EXPERIMENTS = sorted((REPO / "config" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_dry_runs_with_real_sources(experiment, tmp_path, monkeypatch):
    # No Kaggle token on this machine, whatever the developer's home holds.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    (tmp_path / "config.yaml").write_text(experiment.read_text())
    result = check(snakemake(tmp_path, "-n"))
    output = result.stdout + result.stderr
    config = yaml.safe_load(experiment.read_text())
    for name, spec in config["sources"].items():
        if "resource" in spec:
            resource = yaml.safe_load((REPO / "resources" / "sources" / f"{spec['resource']}.yaml").read_text())
            assert f"wildcards: source={name}" in output or f"results/download/{name}" in output, name
            if resource["transport"] == "kaggle":
                assert "kaggle.json" in output and f"sources.{name}" in output
            if resource["transport"] == "manual":
                assert f"source {name!r} must be downloaded by hand" in output


def test_cytoimagenet_experiment_uses_the_published_settings():
    config = yaml.safe_load((REPO / "config" / "experiments" / "cytoimagenet.yaml").read_text())
    labels = config["labels"]
    assert (labels["min_count"], labels["take_all_max"], labels["prelim_max"]) == (287, 1000, 10000)
    run = config["training"]["runs"]["cytoimagenet"]
    assert (run["method"], run["backbone"], run["image_size"], run["batch_size"], run["lr"]) == (
        "weak_label",
        "efficientnet_b0",
        224,
        64,
        0.001,
    )
    assert {b["published"] for b in config["benchmarks"].values()} == {"bbbc021_nsc", "coos7", "cyclops"}


def test_bbbc021_profiles_experiment_plans_only_its_evaluation(tmp_path):
    # As from the repository root, where the Snakefile's demo config exists: a config named on
    # the command line replaces it, so no demo source, training run or benchmark joins the plan.
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text((REPO / "config" / "config.yaml").read_text())
    (tmp_path / "config.yaml").write_text((REPO / "config" / "experiments" / "bbbc021_profiles.yaml").read_text())
    plan = check(snakemake(tmp_path, "-n", "--quiet", "rules"))
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", plan.stdout + plan.stderr, flags=re.MULTILINE))
    assert counts == {
        "download": "2",
        "evaluate_profiles": "2",
        "summarize_evaluation": "1",
        "all": "1",
        "total": "6",
    }


def test_dino_vit_experiment_sits_beside_cytoimagenet_on_the_same_shards():
    dino = yaml.safe_load((REPO / "config" / "experiments" / "dino_vit.yaml").read_text())
    reference = yaml.safe_load((REPO / "config" / "experiments" / "cytoimagenet.yaml").read_text())
    # Same sources, curation, shards, features and benchmarks: only the training runs differ.
    assert {key: value for key, value in dino.items() if key != "training"} == {
        key: value for key, value in reference.items() if key != "training"
    }
    runs = dino["training"]["runs"]
    assert runs["cytoimagenet"] == reference["training"]["runs"]["cytoimagenet"]
    run = runs["dino_vit_s16"]
    assert (run["method"], run["backbone"], run["image_size"]) == ("dino", "vit_small_patch16", 224)
    assert (run["method_options"]["global_size"], run["method_options"]["local_size"]) == (224, 96)
