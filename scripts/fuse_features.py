"""Rule fuse_features: two models' z-scored features side by side (the fusion baseline)."""

from _workflow import setup_logging

from cytopretrain.features import fuse_profiles, write_profiles
from cytopretrain.tables import read_table

log = setup_logging(snakemake)
first, second = read_table(snakemake.input.first), read_table(snakemake.input.second)
fused = fuse_profiles(first, second, suffixes=("first", "second"))
write_profiles(fused, snakemake.output.profiles)
log.info("fused %d profiles: %d features", len(fused), fused.shape[1])
