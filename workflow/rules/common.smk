import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir).resolve()))

from cytopretrain.config import validate_config
from cytopretrain.download import load_resource, resource_from_config

validate_config(
    config, Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"
)

SOURCES = config["sources"]
for _name, _spec in SOURCES.items():
    # Resolve resource YAMLs and inline URLs now, so a broken source stops the run before any job.
    if "synthetic" not in _spec:
        resource_from_config(_name, _spec)
PRETRAIN_SOURCES = [
    name for name, spec in SOURCES.items() if spec["role"] == "pretrain"
]


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


def get_download_input(wildcards):
    spec = SOURCES[wildcards.source]
    if "synthetic" in spec:
        return f"results/synthetic/archives/{spec['synthetic']}.zip"
    return []


def get_source_root(wildcards):
    return source_root(wildcards.source)


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


def get_final_outputs():
    return [
        "results/shards/index.tsv",
        "results/funnel.tsv",
        "results/metadata/description/summary.png",
        *expand("results/metadata/sources/{source}.parquet", source=SOURCES),
    ]
