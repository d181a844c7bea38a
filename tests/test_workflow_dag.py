"""The DAG stays chunked: jobs grow with images / chunk_size, never one job per image.

The full 2.7 M-image plan is timed by benchmarks/bench_dag.py; here a 30,000-image
metadata-only source (the `canonical` adapter) is planned with 1,000 images per chunk.
"""

import math
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fake_metadata import make_metadata
from workflow_helpers import check, snakemake, write_config

from cytopretrain.core.schema import CANONICAL_SCHEMA

pytestmark = pytest.mark.slow


def test_dry_run_plans_one_job_per_chunk_and_stage(tmp_path):
    n_rows, chunk_size = 30_000, 1_000
    source = tmp_path / "metadata_only"
    source.mkdir()
    table = pa.Table.from_pandas(make_metadata(n_rows, seed=1), schema=CANONICAL_SCHEMA, preserve_index=False)
    pq.write_table(table, source / "metadata.parquet")
    write_config(
        tmp_path,
        {"chunk_size": chunk_size, "sources": {"big": {"adapter": "canonical", "path": str(source)}}},
    )
    check(snakemake(tmp_path, "--cores", "2", "results/metadata/chunks.json"))
    plan = check(snakemake(tmp_path, "-n", "--quiet", "rules"))
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", plan.stdout + plan.stderr, flags=re.MULTILINE))
    n_chunks = math.ceil(n_rows / chunk_size)
    for rule in ("standardize", "upsample_crops", "quality_control"):
        assert int(counts[rule]) == n_chunks, (rule, counts)
    for rule in ("assign_labels", "select_labels", "write_shards", "funnel", "describe_metadata"):
        assert int(counts[rule]) == 1, (rule, counts)
    assert int(counts["total"]) == 3 * n_chunks + 6
