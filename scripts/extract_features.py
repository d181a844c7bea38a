"""Rule extract_features: one model's features for every image of one benchmark."""

import torch
from _workflow import extraction_options, setup_logging

from cytopretrain.core.tables import read_table, write_table
from cytopretrain.evaluation.features import extract_features_to_parquet, random_init_backbone
from cytopretrain.learning.models import build_backbone

log = setup_logging(snakemake)
torch.set_num_threads(snakemake.threads)
spec = snakemake.params.model
if spec["weights"]:
    backbone = build_backbone(
        spec["backbone"], in_channels=spec["in_channels"], weights=spec["weights"], pool=spec["pool"]
    )
else:
    backbone = random_init_backbone(
        spec["backbone"], in_channels=spec["in_channels"], seed=spec["seed"], pool=spec["pool"]
    )
table = read_table(snakemake.input.table)
failures = extract_features_to_parquet(
    table, backbone, snakemake.output.profiles, **extraction_options(snakemake), input_norm=spec["input_norm"]
)
write_table(failures, snakemake.output.failures)
log.info(
    "%s / %s: %d images, %d failed",
    snakemake.wildcards.benchmark,
    snakemake.wildcards.model,
    len(table),
    len(failures),
)
