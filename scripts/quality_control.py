"""Rule quality_control: CytoImageNet's filters on the crops of one chunk."""

from _workflow import setup_logging

from cytopretrain.core.tables import write_table
from cytopretrain.curation.quality import qc_chunk

log = setup_logging(snakemake)
decisions = qc_chunk(snakemake.input.crops, snakemake.output.crops, thresholds=dict(snakemake.params.thresholds))
write_table(decisions, snakemake.output.decisions)
log.info("chunk %s: %s", snakemake.wildcards.chunk, decisions["reason"].replace("", "kept").value_counts().to_dict())
