"""Rule assign_clusters: a clustering run's (DEC) own cluster of every image of one benchmark."""

import torch
from _workflow import extraction_options, setup_logging

from cytopretrain.core.tables import read_table, write_table
from cytopretrain.evaluation.features import own_clusters
from cytopretrain.learning.train import load_trained_method

log = setup_logging(snakemake)
torch.set_num_threads(snakemake.threads)
method, card = load_trained_method(snakemake.input.method, snakemake.input.card)
table = read_table(snakemake.input.table)
clusters, failures = own_clusters(table, method, **extraction_options(snakemake))
write_table(clusters, snakemake.output.clusters)
log.info(
    "%s / %s: %d images in %d clusters, %d without features (%s)",
    snakemake.wildcards.benchmark,
    snakemake.wildcards.model,
    len(clusters),
    card["method_details"]["n_clusters"],
    len(failures),
    ", ".join(sorted(set(failures["reason"]))) or "none",
)
