"""Rule funnel: reconcile counts across all stages and gather every quarantined image."""

import pandas as pd
import pyarrow.parquet as pq
from _workflow import setup_logging

from cytopretrain.core.tables import read_table, write_table
from cytopretrain.curation.funnel import build_funnel


def concat(paths):
    return pd.concat([read_table(path) for path in paths], ignore_index=True)


def crop_reports(paths):
    reports = concat(paths)
    # TSV cells are text: parse the flag explicitly ("False" is truthy as a string).
    reports["selected"] = reports["selected"].map({"True": True, "False": False})
    return reports.astype({"n_crops_written": int})


log = setup_logging(snakemake)
inputs = snakemake.input
funnel, quarantine = build_funnel(
    source_rows=sum(pq.ParquetFile(path).metadata.num_rows for path in inputs.tables),
    source_issues=concat(inputs.source_issues),
    standardize=concat(inputs.standardize),
    selection=read_table(inputs.selection, columns=["idx", "label"]),
    crops=crop_reports(inputs.crops),
    qc=concat(inputs.qc),
    dropped_labels=read_table(inputs.dropped),
    excluded=read_table(inputs.excluded),
    shard_index=read_table(inputs.index).astype({"n_samples": int}),
)
write_table(funnel, snakemake.output.funnel)
write_table(quarantine, snakemake.output.quarantine)
log.info("funnel:\n%s", funnel.to_string(index=False))
