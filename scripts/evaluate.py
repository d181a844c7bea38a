"""Rule evaluate: every protocol of one benchmark on one model's profiles, plus a 2-D embedding."""

import json

from _workflow import setup_logging

from cytopretrain.core.tables import atomic_path, read_table, write_table
from cytopretrain.evaluation.evaluate import evaluate_benchmark, headline

log = setup_logging(snakemake)
record, embedding = evaluate_benchmark(
    read_table(snakemake.input.profiles),
    snakemake.params.benchmark,
    snakemake.wildcards.benchmark,
    snakemake.wildcards.model,
    clusters=read_table(snakemake.input.clusters) if "clusters" in snakemake.input.keys() else None,
)
with atomic_path(snakemake.output.result) as tmp:
    tmp.write_text(json.dumps(record, indent=1, default=float))
write_table(embedding, snakemake.output.embedding)
log.info("%s / %s: %s", record["benchmark"], record["model"], headline(record["results"]))
