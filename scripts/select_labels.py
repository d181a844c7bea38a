"""Rule select_labels: drop labels left with too few crops after quality control."""

import pandas as pd
from _workflow import setup_logging

from cytopretrain.core.tables import read_table, write_table
from cytopretrain.curation.quality import drop_small_labels

log = setup_logging(snakemake)
decisions = pd.concat([read_table(path) for path in snakemake.input.decisions], ignore_index=True)
kept, dropped = drop_small_labels(decisions, min_images=snakemake.params.min_images)
write_table(kept, snakemake.output.kept)
write_table(dropped, snakemake.output.dropped)
log.info("%d labels kept, %d dropped below %d crops", len(kept), len(dropped), snakemake.params.min_images)
