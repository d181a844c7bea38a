"""Rule fuse_features: two models' z-scored features side by side (the fusion baseline)."""

from _workflow import setup_logging

from cytopretrain.core.tables import read_table
from cytopretrain.evaluation.profile_tables import fuse_profiles, write_profiles

log = setup_logging(snakemake)
first, second = read_table(snakemake.input.first), read_table(snakemake.input.second)
fused = fuse_profiles(first, second, suffixes=("first", "second"))
write_profiles(fused, snakemake.output.profiles)
log.info("fused %d profiles: %d features", len(fused), fused.shape[1])
