"""Rule standardize: read and normalize the images of one chunk of the merged table."""

from _workflow import setup_logging

from cytopretrain.core.tables import read_row_group, write_table
from cytopretrain.curation.standardize import standardize_chunk

log = setup_logging(snakemake)
chunk = read_row_group(snakemake.input.table, int(snakemake.wildcards.chunk))
decisions = standardize_chunk(
    chunk,
    snakemake.output.images,
    low=snakemake.params.low,
    high=snakemake.params.high,
    mode=snakemake.params.mode,
    z_projections=snakemake.params.z_projections,
    min_side=snakemake.params.min_side,
    threads=snakemake.threads,
)
write_table(decisions, snakemake.output.decisions)
kept = int((decisions["status"] == "kept").sum())
log.info(
    "chunk %s: %d images in, %d kept, %d quarantined", snakemake.wildcards.chunk, len(chunk), kept, len(chunk) - kept
)
