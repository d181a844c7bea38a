"""Rule assign_labels: CytoImageNet weak labels over the images that standardized cleanly."""

import pandas as pd
from _workflow import setup_logging

from cytopretrain.core.schema import LABEL_COLUMNS
from cytopretrain.core.tables import read_table, write_table
from cytopretrain.curation.labels import SELECTION_SCHEMA, assign_weak_labels, labels_below_min

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
below = labels_below_min(usable, columns=tuple(snakemake.params.columns), min_count=snakemake.params.min_count)
write_table(selection, snakemake.output.selection, schema=SELECTION_SCHEMA)
write_table(pd.concat([report, below], ignore_index=True), snakemake.output.report)
if len(below):
    examples = ", ".join(f"{row.label} ({row.category}, {row.n_total})" for row in below.head(5).itertuples())
    log.warning(
        "%d labels are held by fewer than labels.min_count = %d images and are not used for pretraining, "
        "e.g. %s; all are listed in %s (outcome below_min_count). To keep an own collection's rarer classes, "
        "lower labels.min_count below their image count (with take_all_max and prelim_max at least as large)",
        len(below),
        snakemake.params.min_count,
        examples,
        snakemake.output.report,
    )
log.info(
    "%d usable images, %d labels taken, %d images selected",
    len(usable),
    int((report["n_selected"] > 0).sum()),
    len(selection),
)
