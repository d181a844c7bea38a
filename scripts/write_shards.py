"""Rule write_shards: stratified train / validation split written as Parquet or TFRecord shards."""

from _workflow import setup_logging

from cytopretrain.core.tables import read_table
from cytopretrain.curation.shards import write_shards

log = setup_logging(snakemake)
settings = snakemake.params.shards
index = write_shards(
    list(snakemake.input.crops),
    read_table(snakemake.input.labels),
    read_table(snakemake.input.table),
    snakemake.params.out_dir,
    samples_per_shard=settings["samples_per_shard"],
    fmt=settings["format"],
    validation_fraction=settings["validation_fraction"],
    seed=settings["seed"],
)
log.info("%d shards, %d samples", len(index), int(index["n_samples"].sum()))
