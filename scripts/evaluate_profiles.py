"""Rule evaluate_profiles: one profile table (config profiles.<name>) through its protocols."""

import json

from _workflow import setup_logging

from cytopretrain.core.tables import atomic_path, write_table
from cytopretrain.evaluation.evaluate import headline
from cytopretrain.evaluation.profiles import evaluate_profiles

log = setup_logging(snakemake)
name = snakemake.wildcards.name
record, embedding = evaluate_profiles(name, dict(snakemake.params.spec), dict(snakemake.params.files))
with atomic_path(snakemake.output.result) as tmp:
    tmp.write_text(json.dumps(record, indent=1, default=float))
write_table(embedding, snakemake.output.embedding)
log.info(
    "%s: %d rows, %d of %d features (%s); %s",
    name,
    record["n_rows"],
    record["n_features"],
    record["n_features_input"],
    {reason: len(columns) for reason, columns in record["features_dropped"].items()},
    headline(record["results"]),
)
