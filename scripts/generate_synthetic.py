"""Rule generate_synthetic: write the embedded demo collection and its per-layout archives."""

from pathlib import Path

from _workflow import setup_logging

from cytopretrain.synthetic import generate_collection

log = setup_logging(snakemake)
out_dir = Path(snakemake.output.ground_truth).parent
summary = generate_collection(
    out_dir,
    seed=snakemake.params.seed,
    scale=snakemake.params.scale,
    image_size=snakemake.params.image_size,
    layouts=snakemake.params.layouts,
    workers=snakemake.threads,
)
log.info("generated %s", summary)
