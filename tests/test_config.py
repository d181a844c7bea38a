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
    folder = {"path": "/data/x", "adapter": "folder", "options": {"channels": ["dapi"], "category": "gene"}}
    config = validate_config({"sources": {"mine": folder}})
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
        (
            lambda c: c["training"]["runs"]["autoencoder"]["method_options"].update(n_clusters=4),
            "training.runs.autoencoder.method_options.n_clusters",
        ),
        (lambda c: c["benchmarks"]["cyclops_demo"].update(clustering={"k": 3}), "benchmarks.cyclops_demo.clustering.k"),
        (
            lambda c: c["training"]["runs"]["autoencoder"].update(method="dec", method_options={"n_clusters": 4}),
            "training.runs.autoencoder.method_options.pretrain_steps",
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


def schema_defaults(node: dict, path: str = "", root: dict | None = None) -> dict[str, object]:
    """Every ``default`` of the schema by dotted key (``*`` for a name the user chooses),
    except the empty mappings that only open a section of named entries."""
    root = root or node
    found = {}
    for name, child in node.get("properties", {}).items():
        key = f"{path}.{name}" if path else name
        if "$ref" in child:
            child = {
                **root["$defs"][child["$ref"].rsplit("/", 1)[1]],
                **{k: v for k, v in child.items() if k != "$ref"},
            }
        entries = child.get("additionalProperties")
        opens_section = "properties" in child or (isinstance(entries, dict) and entries.get("type") == "object")
        if "default" in child and not (opens_section and child["default"] == {}):
            found[key] = child["default"]
        found.update(schema_defaults(child, key, root))
    if isinstance(node.get("additionalProperties"), dict):
        found.update(schema_defaults(node["additionalProperties"], f"{path}.*", root))
    return found


def library_defaults() -> dict[str, object]:
    """The library's own default for each config key the library reads."""
    import dataclasses
    import inspect

    from cytopretrain.curation.crops import upsample_chunk
    from cytopretrain.curation.labels import assign_weak_labels
    from cytopretrain.curation.quality import QCThresholds, drop_small_labels
    from cytopretrain.curation.shards import write_shards
    from cytopretrain.curation.standardize import standardize_chunk
    from cytopretrain.evaluation.evaluate import BENCHMARK_DEFAULTS
    from cytopretrain.evaluation.features import ExtractionOptions
    from cytopretrain.evaluation.outliers import score_crops
    from cytopretrain.evaluation.profiles import PROFILE_DEFAULTS
    from cytopretrain.evaluation.protocols import clustering
    from cytopretrain.evaluation.protocols.mean_ap import SIGNIFICANCE_DEFAULTS
    from cytopretrain.learning.checkpoints import backbone_file
    from cytopretrain.learning.models import build_backbone
    from cytopretrain.learning.settings import DEFAULTS
    from cytopretrain.learning.train import train
    from cytopretrain.synthetic import generate_collection

    def of(function, **keys) -> dict[str, object]:
        parameters = inspect.signature(function).parameters
        return {key: parameters[name].default for key, name in keys.items()}

    qc = {field.name: field.default for field in dataclasses.fields(QCThresholds)}
    extraction = {field.name: field.default for field in dataclasses.fields(ExtractionOptions)}
    found = {
        **of(generate_collection, **{f"synthetic.{k}": k for k in ("seed", "scale", "image_size")}),
        **of(
            standardize_chunk,
            **{
                "standardize.low_percentile": "low",
                "standardize.high_percentile": "high",
                "standardize.channels": "mode",
                "standardize.threads": "threads",
                "standardize.min_side": "min_side",
            },
        ),
        **of(
            assign_weak_labels,
            **{f"labels.{k}": k for k in ("columns", "min_count", "take_all_max", "prelim_max", "seed")},
        ),
        **of(
            upsample_chunk, **{f"crops.{k}": k for k in ("rules", "scales", "min_crop_side", "min_image_side", "seed")}
        ),
        **{f"quality_control.{k}": v for k, v in qc.items() if k != "dim_max_value"},
        **of(drop_small_labels, **{"quality_control.min_images_per_label": "min_images"}),
        **of(
            write_shards,
            **{
                "shards.format": "fmt",
                "shards.samples_per_shard": "samples_per_shard",
                "shards.validation_fraction": "validation_fraction",
                "shards.seed": "seed",
            },
        ),
        **of(train, **{"training.device": "device"}),
        **of(backbone_file, **{"training.runs.*.checkpoint": "checkpoint"}),
        **of(build_backbone, **{"features.external.*.pool": "pool"}),
        **{f"training.runs.*.{k}": v for k, v in DEFAULTS.items()},
        **{
            f"features.{k}": extraction[k]
            for k in ("channel_mode", "normalize", "resize", "batch_size", "precision", "num_workers")
        },
        **{f"benchmarks.*.{k}": v for k, v in BENCHMARK_DEFAULTS.items() if k not in ("map", "clustering")},
        **{
            f"{section}.map.{k}": v
            for section in ("benchmarks.*", "profiles.*")
            for k, v in SIGNIFICANCE_DEFAULTS.items()
        },
        **{f"profiles.*.replicate_map.{k}": v for k, v in SIGNIFICANCE_DEFAULTS.items()},
        **{
            f"{section}.clustering.{k}": v
            for section in ("benchmarks.*", "profiles.*")
            for k, v in of(clustering, **{k: k for k in ("n_components", "restarts", "seed")}).items()
        },
        **of(score_crops, **{"outliers.k": "k", "outliers.min_samples": "min_samples"}),
        **{
            f"profiles.*.{k}": v
            for k, v in PROFILE_DEFAULTS.items()
            if k not in ("map", "replicate_map", "clustering") and not (isinstance(v, dict) and v)
        },
        **{
            f"profiles.*.{k}.{sub}": v
            for k, d in PROFILE_DEFAULTS.items()
            if isinstance(d, dict)
            for sub, v in d.items()
        },
    }
    return found


# Keys only the workflow reads (scheduling, file layout, which models to build): no library default.
WORKFLOW_ONLY = {
    "chunk_size",
    "download_cache",
    "sources.*.role",
    "sources.*.options",
    "training.runs.*.threads",
    "training.runs.*.gpus",
    "training.runs.*.processes",
    "features.random_baseline",
    "features.external.*.in_channels",
    "features.external.*.input_norm",
    "features.fusion",
    "outliers.run",
}
# Library settings the config does not expose.
LIBRARY_ONLY = {
    "training.runs.*.schedule",
    "training.runs.*.progress",
    "training.runs.*.method",
    "training.runs.*.backbone",
}


def plain(value):
    """Tuples as lists, so (0.5, 0.25) and [0.5, 0.25] compare equal."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def test_schema_defaults_are_the_library_defaults():
    from cytopretrain.core.config import load_schema

    schema = schema_defaults(load_schema())
    library = library_defaults()
    unclassified = sorted(set(schema) - set(library) - WORKFLOW_ONLY)
    assert not unclassified, f"schema defaults with no library counterpart: {unclassified}"
    for key, value in library.items():
        if key in LIBRARY_ONLY:
            continue
        assert key in schema, f"library default {key} = {value!r} is not in the schema"
        assert plain(schema[key]) == plain(value), f"{key}: schema {schema[key]!r}, library {value!r}"


def own_folder_config(demo_config: dict) -> dict:
    """The demo plus a `folder` source on real yeast cells, as a user adds their own images."""
    from cell_images import YEAST

    demo_config["sources"]["mine"] = {
        "path": str(YEAST),
        "adapter": "folder",
        "options": {"channels": ["gfp", "rfp"], "category": "gene", "label_pattern": "^(?P<label>.+)$"},
    }
    return demo_config


FOLDER_OPTIONS = "category, cell_type, channel_names, channels, constants, database, extensions, label_pattern, "
FOLDER_OPTIONS += "microscopy, organism, z_projection"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda c: c["sources"]["mine"]["options"].update(label_patern="^x"),
            f"config key 'sources.mine.options.label_patern': unknown option; this adapter accepts: {FOLDER_OPTIONS}",
        ),
        (
            lambda c: c["training"]["runs"]["weak_label"]["method_options"].update(photometrc=True),
            "config key 'training.runs.weak_label.method_options.photometrc': unknown option; method weak_label "
            "accepts: rotate, flip, fill, photometric",
        ),
    ],
)
@pytest.mark.slow  # two `snakemake -n` runs, about 15 s each
def test_late_option_typos_fail_at_dry_run_naming_the_key(tmp_path, demo_config, mutate, message):
    """Adapter options and method_options were checked only when their job ran (after the
    download, after the whole curation): each typo now stops `snakemake -n`."""
    from workflow_helpers import snakemake, write_config

    config = own_folder_config(demo_config)
    mutate(config)
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "-n")
    assert result.returncode != 0
    assert message in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda c: c["sources"]["mine"]["options"].update(label_pattern="^(?P<lable>.+)$"),
            "sources.mine.options.label_pattern needs a named group (?P<label>...)",
        ),
        (
            lambda c: c["sources"]["mine"]["options"].update(z_projection="median"),
            "config key 'sources.mine.options.z_projection': 'median' is not max, mean or pick:<index>",
        ),
        (
            lambda c: c["sources"]["mine"]["options"].pop("channels"),
            "config key 'sources.mine.options.channels': missing required option",
        ),
        (
            lambda c: c["sources"]["rxrx1_demo"]["options"].update(incomplete_site="keep"),
            "config key 'sources.rxrx1_demo.options.incomplete_site': unknown option",
        ),
        (
            lambda c: c["sources"]["rxrx1_demo"]["options"].update(incomplete_sites="drop"),
            "sources.rxrx1_demo.options.incomplete_sites must be one of",
        ),
        (
            lambda c: c["training"]["runs"]["autoencoder"]["method_options"].update(latent_dims=8),
            "config key 'training.runs.autoencoder.method_options.latent_dims': unknown option",
        ),
        (
            lambda c: c["benchmarks"]["coos7_demo"].update(source="coos_7"),
            "config key 'benchmarks.coos7_demo.source': 'coos_7' is not a source with role 'benchmark'; sources with "
            "that role: bbbc021_demo, coos7_demo, cyclops_demo, hpa_bench",
        ),
    ],
)
def test_option_values_and_benchmark_sources_are_checked_with_the_config(demo_config, mutate, message):
    config = own_folder_config(demo_config)
    validate_config(copy.deepcopy(config))
    mutate(config)
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert message in str(error.value)
