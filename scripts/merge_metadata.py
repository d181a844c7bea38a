"""Checkpoint merge_metadata: merge the pretraining sources and plan the image chunks."""

import json
import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from _workflow import setup_logging

from cytopretrain.core.schema import CANONICAL_SCHEMA
from cytopretrain.core.tables import atomic_path, read_table, write_table
from cytopretrain.curation.metadata import merge_tables

log = setup_logging(snakemake)
tables = {path: read_table(path) for path in snakemake.input.tables}
merged = merge_tables(tables)
chunk_size = snakemake.params.chunk_size
# One Parquet row group per chunk, so a standardize job reads exactly its rows.
with atomic_path(snakemake.output.table) as tmp:
    pq.write_table(
        pa.Table.from_pandas(merged, schema=CANONICAL_SCHEMA, preserve_index=False),
        tmp,
        row_group_size=chunk_size,
        compression="zstd",
    )
issues = [read_table(path) for path in snakemake.input.issues]
write_table(pd.concat(issues, ignore_index=True), snakemake.output.issues)
plan = {"n_images": len(merged), "chunk_size": chunk_size, "n_chunks": max(1, math.ceil(len(merged) / chunk_size))}
with atomic_path(snakemake.output.plan) as tmp:
    tmp.write_text(json.dumps(plan, indent=2))
log.info("merged %d images from %d sources into %d chunks", len(merged), len(tables), plan["n_chunks"])
