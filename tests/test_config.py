"""Config validation: defaults are filled, and every error names the offending key."""

import copy
from pathlib import Path

import pytest
import yaml

from cytopretrain.core.config import random_baselines, validate_config
from cytopretrain.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def demo_config():
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_demo_config_is_valid_and_gets_defaults(demo_config):
    config = validate_config(copy.deepcopy(demo_config))
    assert config["sources"]["synthetic_cells"]["role"] == "pretrain"
    assert config["sources"]["bbbc021_demo"]["role"] == "benchmark"
    assert config["sources"]["hpa_demo"]["options"] == {}
    # A default the demo does not set comes from the schema.
    assert config["standardize"]["threads"] == 1
    assert config["shards"]["format"] == "parquet"


def test_minimal_config_gets_cytoimagenet_thresholds():
    config = validate_config({"sources": {"mine": {"path": "/data/x", "adapter": "folder"}}})
    assert (config["labels"]["min_count"], config["labels"]["take_all_max"], config["labels"]["prelim_max"]) == (
        287,
        1000,
        10000,
    )
    assert config["quality_control"]["min_images_per_label"] == 500
    assert config["crops"]["rules"] == [[1000, 1], [550, 2], [400, 3], [0, 4]]


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda c: c["sources"]["rxrx1_demo"].update(adapter="nonsense"), "sources.rxrx1_demo.adapter"),
        (lambda c: c["sources"]["rxrx1_demo"].update(url="http://x/y.zip"), "sources.rxrx1_demo"),
        (lambda c: c["sources"]["hpa_demo"].pop("synthetic"), "sources.hpa_demo"),
        (lambda c: c["labels"].update(min_count="many"), "labels.min_count"),
        (lambda c: c["shards"].update(format="hdf5"), "shards.format"),
        (lambda c: c.update(chunk_sise=10), "chunk_sise"),
        (lambda c: c["standardize"].update(low_percentile=99.95), "standardize.low_percentile"),
        (lambda c: c["labels"].update(take_all_max=10), "labels"),
        (lambda c: c["crops"].update(rules=[[10, 1], [5, 2]]), "crops.rules"),
        (lambda c: c["sources"].update({"Bad-Name": {"path": "/x", "adapter": "folder"}}), "sources"),
        (lambda c: [s.update(role="benchmark") for s in c["sources"].values()], "sources"),
        (
            lambda c: c["training"]["runs"]["weak_label"].update(gpus=1, processes=2),
            "training.runs.weak_label.processes",
        ),
    ],
)
def test_errors_name_the_key(demo_config, mutate, key):
    mutate(demo_config)
    with pytest.raises(ConfigError) as error:
        validate_config(demo_config)
    assert f"'{key}" in str(error.value)


def test_runs_share_a_random_baseline_only_when_its_weights_would_be_identical(demo_config):
    runs = validate_config(copy.deepcopy(demo_config))["training"]["runs"]
    assert {runs[r]["backbone"] for r in runs} == {"resnet18"} and {runs[r]["seed"] for r in runs} == {0}
    assert random_baselines(runs) == {"random_weak_label": "weak_label"}
    for key, value in (("seed", 1), ("in_channels", 3), ("backbone", "resnet50")):
        changed = copy.deepcopy(runs)
        changed["autoencoder"][key] = value
        assert random_baselines(changed) == {"random_weak_label": "weak_label", "random_autoencoder": "autoencoder"}
    # A fusion may only name a baseline that exists.
    demo_config["features"]["fusion"] = {"mix": ["weak_label", "random_autoencoder"]}
    with pytest.raises(ConfigError, match="features.fusion.mix"):
        validate_config(demo_config)
