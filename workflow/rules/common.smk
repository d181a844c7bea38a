import json
import os
import re
import sys
from pathlib import Path

# The repository root, also when this workflow is used as a module of another one.
REPO_ROOT = Path(workflow.current_basedir).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from cytopretrain.core.config import random_baselines, validate_config
from cytopretrain.core.errors import SourceError
from cytopretrain.curation.download import transport_problem
from cytopretrain.curation.listing import refresh_listing
from cytopretrain.curation.resources import load_resource, resource_from_config
from cytopretrain.learning.checkpoints import backbone_file
from cytopretrain.curation.sources import folder_problem
from cytopretrain.learning.pretext import METHODS
from cytopretrain.synthetic.layouts import LAYOUTS

validate_config(config, REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml")

SOURCES = config["sources"]
for _name, _spec in SOURCES.items():
    if "path" in _spec and not os.path.isdir(_spec["path"]):
        raise SourceError(folder_problem(Path(_spec["path"]), f"sources.{_name}.path"))
    # Resolve resource YAMLs and inline URLs now, so a broken source stops the run before any job.
    if "synthetic" not in _spec:
        _problem = transport_problem(resource_from_config(_name, _spec))
        if _problem:
            print(f"NOTE before downloading: {_problem}", file=sys.stderr)
PRETRAIN_SOURCES = [
    name for name, spec in SOURCES.items() if spec["role"] == "pretrain"
]
# Files sources are only downloaded (for profiles); every other source is cleaned.
CLEANED_SOURCES = [name for name, spec in SOURCES.items() if spec["role"] != "files"]


wildcard_constraints:
    source="[a-z0-9][a-z0-9_]*",
    chunk="[0-9]{5}",
    layout="[a-z0-9]+",


def source_adapter(source):
    spec = SOURCES[source]
    return spec.get("adapter") or load_resource(spec["resource"])["adapter"]


def source_root(source):
    """Folder the adapter reads: the user's local path, or the download rule's output."""
    spec = SOURCES[source]
    if "path" in spec:
        return spec["path"]
    return f"results/download/{source}"


def get_z_projections():
    """Each source's z_projection option (how its TIFF stacks become one plane), when set."""
    return {
        name: spec["options"]["z_projection"]
        for name, spec in SOURCES.items()
        if spec["options"].get("z_projection")
    }


def get_download_input(wildcards):
    spec = SOURCES[wildcards.source]
    if "synthetic" in spec:
        return f"results/synthetic/archives/{spec['synthetic']}.zip"
    return []


def get_source_root(wildcards):
    return source_root(wildcards.source)


_REFRESHED_LISTINGS = set()


def get_source_listing(wildcards):
    """A path source's listing (cytopretrain.curation.listing): refreshed once per job graph
    the main process builds (also by -n), rewritten only when a file under the folder was
    added, removed or rewritten, so that clean_metadata and what follows rerun exactly then.
    """
    spec = SOURCES[wildcards.source]
    if "path" not in spec:
        return []
    listing = f"results/metadata/sources/{wildcards.source}.listing.tsv"
    if workflow.is_main_process and wildcards.source not in _REFRESHED_LISTINGS:
        refresh_listing(spec["path"], listing)
        _REFRESHED_LISTINGS.add(wildcards.source)
    return listing


def get_merge_inputs(wildcards):
    return {
        "tables": expand(
            "results/metadata/sources/{source}.parquet", source=PRETRAIN_SOURCES
        ),
        "issues": expand(
            "results/metadata/sources/{source}.issues.tsv", source=PRETRAIN_SOURCES
        ),
    }


def chunk_ids():
    """Chunk ids of the merged table, known once the merge_metadata checkpoint has run."""
    plan = checkpoints.merge_metadata.get().output.plan
    with open(plan) as handle:
        n_chunks = json.load(handle)["n_chunks"]
    return [f"{k:05d}" for k in range(n_chunks)]


def get_standardize_decisions(wildcards):
    return expand("results/standardize/decisions/chunk-{chunk}.tsv", chunk=chunk_ids())


def get_qc_decisions(wildcards):
    return expand("results/qc/decisions/chunk-{chunk}.tsv", chunk=chunk_ids())


def get_crop_reports(wildcards):
    return expand("results/crops/images/chunk-{chunk}.tsv", chunk=chunk_ids())


def get_qc_crops(wildcards):
    return expand("results/qc/chunk-{chunk}.parquet", chunk=chunk_ids())


def get_curation_outputs():
    """The curated training set and its accounts, only when some source feeds it."""
    if not PRETRAIN_SOURCES:
        return []
    return [
        "results/shards/index.tsv",
        "results/funnel.tsv",
        "results/metadata/description/summary.png",
    ]


def get_final_outputs():
    """What the config asks for: curation, cleaned sources, training and evaluations."""
    return [
        *get_curation_outputs(),
        *expand("results/metadata/sources/{source}.parquet", source=CLEANED_SOURCES),
        *get_learning_outputs(),
    ]


# ----------------------------------------------------------------- learning half

RUNS = config["training"]["runs"]
# Runs whose method assigns clusters (DEC): their training also writes clusters and centres.
CLUSTERING_RUNS = [
    run for run, spec in RUNS.items() if METHODS[spec["method"]].assigns_clusters
]
BENCHMARKS = config["benchmarks"]
FEATURES = config["features"]
EXTERNAL_MODELS = FEATURES["external"]
FUSIONS = FEATURES["fusion"]
RANDOM_BASELINES = random_baselines(RUNS) if FEATURES["random_baseline"] else {}
EXTRACTED_MODELS = [*RUNS, *RANDOM_BASELINES, *EXTERNAL_MODELS]
ALL_MODELS = [*EXTRACTED_MODELS, *FUSIONS]


def name_pattern(names):
    """A wildcard constraint matching exactly these names (never matches if empty)."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


def run_settings(run):
    """Training settings of one run: its config entry minus the scheduling keys and the
    choice of the evaluated checkpoint."""
    scheduling = ("threads", "gpus", "processes", "checkpoint")
    return {key: value for key, value in RUNS[run].items() if key not in scheduling}


def model_spec(model):
    """How extract_features builds a model: backbone, channels, weights, input normalization."""
    if model in RUNS:
        spec = RUNS[model]
        return {
            "backbone": spec["backbone"],
            "in_channels": spec["in_channels"],
            "weights": str(backbone_file(f"results/train/{model}", spec["checkpoint"])),
            "input_norm": None,
            "pool": spec["pool"],
        }
    if model in RANDOM_BASELINES:
        spec = RUNS[RANDOM_BASELINES[model]]
        return {
            "backbone": spec["backbone"],
            "in_channels": spec["in_channels"],
            "weights": None,
            "input_norm": None,
            "seed": spec["seed"],
            "pool": spec["pool"],
        }
    spec = EXTERNAL_MODELS[model]
    return {
        "backbone": spec["backbone"],
        "in_channels": spec["in_channels"],
        "weights": spec["weights"],
        "input_norm": None if spec["input_norm"] == "none" else spec["input_norm"],
        "pool": spec["pool"],
    }


def get_model_weights(wildcards):
    weights = model_spec(wildcards.model)["weights"]
    return [weights] if weights else []


def get_benchmark_table(wildcards):
    source = BENCHMARKS[wildcards.benchmark]["source"]
    return f"results/metadata/sources/{source}.parquet"


def get_evaluate_inputs(wildcards):
    """The profiles, and a clustering run's own clusters when the benchmark scores clustering."""
    inputs = {
        "profiles": f"results/features/{wildcards.benchmark}/{wildcards.model}.parquet"
    }
    protocols = BENCHMARKS[wildcards.benchmark]["protocols"]
    if wildcards.model in CLUSTERING_RUNS and "clustering" in protocols:
        inputs["clusters"] = (
            f"results/features/{wildcards.benchmark}/{wildcards.model}.clusters.parquet"
        )
    return inputs


def get_fusion_inputs(wildcards):
    first, second = FUSIONS[wildcards.model]
    return {
        "first": f"results/features/{wildcards.benchmark}/{first}.parquet",
        "second": f"results/features/{wildcards.benchmark}/{second}.parquet",
    }


def get_evaluations(wildcards=None):
    return expand(
        "results/eval/{benchmark}/{model}.json", benchmark=BENCHMARKS, model=ALL_MODELS
    )


def get_outlier_inputs(wildcards):
    run = config["outliers"]["run"]
    inputs = {
        "method": f"results/train/{run}/method.pt",
        "card": f"results/train/{run}/model_card.json",
        "index": "results/shards/index.tsv",
        "table": "results/metadata/merged.parquet",
    }
    if any("synthetic" in SOURCES[source] for source in PRETRAIN_SOURCES):
        # The demo's injected defects, to mark the annotation-text tiles among the outliers.
        inputs["ground_truth"] = "results/synthetic/ground_truth.csv"
    return inputs


def get_training_outputs():
    return expand("results/train/{run}/model_card.json", run=RUNS)


def get_outlier_outputs():
    return ["results/eval/outliers.tsv"] if config["outliers"]["run"] else []


def get_summary_inputs(wildcards=None):
    """Every result summary.tsv tabulates: benchmark x model, then the profile tables."""
    return [*get_evaluations(), *get_profile_results()]


def get_learning_outputs():
    outputs = [*get_training_outputs(), *get_outlier_outputs()]
    if get_summary_inputs():
        outputs.append("results/eval/summary.tsv")
        # The report opens with the curated set (funnel, labels, shards): none without one.
        if PRETRAIN_SOURCES:
            outputs.append("results/report/report.html")
    return outputs


# ------------------------------------------------ profile tables (config profiles:)

PROFILES = config["profiles"]
for _name, _spec in PROFILES.items():
    # Not an error here: another workflow using this one as a module may produce the file.
    for _key, _table in [("path", _spec["path"])] + [
        (f"join[{_n}].path", _join["path"]) for _n, _join in enumerate(_spec["join"])
    ]:
        if isinstance(_table, str) and not os.path.exists(_table):
            print(
                f"NOTE: config key 'profiles.{_name}.{_key}': {_table} does not exist; provide the "
                "table there, or {source: <name>, file: <path>} to download it",
                file=sys.stderr,
            )


def profile_file(table):
    """Path of a profiles table: as given, or inside the folder of the source it names."""
    if isinstance(table, dict):
        return os.path.join(source_root(table["source"]), table["file"])
    return table


def profile_tables(spec):
    """The entry's tables: its profile table, then each joined table."""
    return [spec["path"], *(join["path"] for join in spec["join"])]


def get_profile_inputs(wildcards):
    """What the job waits for: each local table, or the folder of the source holding it."""
    tables = profile_tables(PROFILES[wildcards.name])
    return {
        f"table{number}": (
            source_root(table["source"]) if isinstance(table, dict) else table
        )
        for number, table in enumerate(tables)
    }


def get_profile_files(wildcards):
    spec = PROFILES[wildcards.name]
    return {
        "path": profile_file(spec["path"]),
        "join": [profile_file(join["path"]) for join in spec["join"]],
    }


def get_profile_results(wildcards=None):
    return expand("results/eval/profiles/{name}.json", name=PROFILES)
