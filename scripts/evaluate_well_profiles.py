"""Rule evaluate_well_profiles: BBBC021 NSC / NSCB on one precomputed per-well profile table."""

import json

from _workflow import setup_logging

from cytopretrain.core.tables import atomic_path, write_table
from cytopretrain.evaluation.well_profiles import evaluate_well_profiles

log = setup_logging(snakemake)
name = snakemake.wildcards.name
record, embedding = evaluate_well_profiles(name, dict(snakemake.params.spec), dict(snakemake.params.files))
with atomic_path(snakemake.output.result) as tmp:
    tmp.write_text(json.dumps(record, indent=1, default=float))
write_table(embedding, snakemake.output.embedding)
results = record["results"]
log.info(
    "%s: %d wells, %d features; NSC %d/%d, NSCB %d/%d",
    name,
    record["n_profiles"],
    record["n_features"],
    results["nsc"]["correct"],
    results["nsc"]["n"],
    results["nscb"]["correct"],
    results["nscb"]["n"],
)
