"""Rule assign_labels: CytoImageNet weak labels over the images that standardized cleanly."""

import pandas as pd
from _workflow import setup_logging

from cytopretrain.core.schema import LABEL_COLUMNS
from cytopretrain.core.tables import read_table, write_table
from cytopretrain.curation.labels import SELECTION_SCHEMA, assign_weak_labels

log = setup_logging(snakemake)
meta = read_table(snakemake.input.table, columns=["idx", "name", *LABEL_COLUMNS])
decisions = pd.concat([read_table(path, columns=["idx", "status"]) for path in snakemake.input.decisions])
usable = meta[meta["idx"].isin(decisions.loc[decisions["status"] == "kept", "idx"])]
selection, report = assign_weak_labels(
    usable,
    columns=tuple(snakemake.params.columns),
    min_count=snakemake.params.min_count,
    take_all_max=snakemake.params.take_all_max,
    prelim_max=snakemake.params.prelim_max,
    seed=snakemake.params.seed,
)
write_table(selection, snakemake.output.selection, schema=SELECTION_SCHEMA)
write_table(report, snakemake.output.report)
log.info(
    "%d usable images, %d labels taken, %d images selected",
    len(usable),
    int((report["n_selected"] > 0).sum()),
    len(selection),
)
