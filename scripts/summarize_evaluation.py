"""Rule summarize_evaluation: one row per benchmark x model x protocol, published figures beside."""

import json

from _workflow import setup_logging

from cytopretrain.core.tables import write_table
from cytopretrain.evaluation.summary import summarize

log = setup_logging(snakemake)
records = [json.loads(open(path).read()) for path in snakemake.input]
summary = summarize(records)
write_table(summary, snakemake.output.summary)
log.info("summary:\n%s", summary.to_string(index=False))
