"""Rule describe_metadata: counts per database, source, microscopy and label column, and a plot."""

import pandas as pd
from _workflow import setup_logging

from cytopretrain.core.tables import read_table, write_table
from cytopretrain.curation.metadata import describe, plot_description

log = setup_logging(snakemake)
description = describe(read_table(snakemake.input.table))
counts = pd.concat([frame.assign(table=name) for name, frame in description.items()], ignore_index=True)
write_table(counts, snakemake.output.counts)
plot_description(description, snakemake.output.summary)
log.info("described %d count tables", len(description))
