"""Rule evaluate: every protocol of one benchmark on one model's profiles, plus a 2-D embedding."""

import json

import pandas as pd
from _workflow import setup_logging

from cytopretrain.evaluate import embedding_2d
from cytopretrain.summary import run_protocols
from cytopretrain.tables import atomic_path, read_table, write_table

log = setup_logging(snakemake)
benchmark = snakemake.params.benchmark
profiles = read_table(snakemake.input.profiles).sort_values("Metadata_idx", ignore_index=True)
results = run_protocols(profiles, benchmark)
record = {
    "benchmark": snakemake.wildcards.benchmark,
    "model": snakemake.wildcards.model,
    "published": benchmark["published"],
    "label": benchmark["label"],
    "n_profiles": len(profiles),
    "results": results,
}
with atomic_path(snakemake.output.result) as tmp:
    tmp.write_text(json.dumps(record, indent=1, default=float))
label = f"Metadata_{benchmark['label']}"
coordinates = embedding_2d(profiles, method=benchmark["embedding"], seed=0)
embedding = pd.DataFrame(
    {"idx": profiles["Metadata_idx"], "label": profiles[label], "x": coordinates[:, 0], "y": coordinates[:, 1]}
)
write_table(embedding, snakemake.output.embedding)
log.info("%s / %s: %s", record["benchmark"], record["model"], {p: r.get("accuracy", r.get("mean_average_precision", r.get("macro_f1"))) for p, r in results.items()})
