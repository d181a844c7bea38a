"""Rule clean_metadata: one source's files -> the canonical table plus its set-aside images."""

from pathlib import Path

from _workflow import setup_logging

from cytopretrain.core.schema import CANONICAL_SCHEMA
from cytopretrain.core.tables import write_table
from cytopretrain.curation.sources import run_adapter

log = setup_logging(snakemake)
result = run_adapter(
    snakemake.params.adapter,
    Path(snakemake.input.root),
    snakemake.wildcards.source,
    dict(snakemake.params.options),
)
write_table(result.table, snakemake.output.table, schema=CANONICAL_SCHEMA)
write_table(result.issues, snakemake.output.issues)
log.info("%s: %d images in the table, %d set aside", snakemake.wildcards.source, len(result.table), len(result.issues))
