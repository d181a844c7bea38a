"""Rule upsample_crops: crops per selected image of one chunk, by its class size."""

from _workflow import setup_logging

from cytopretrain.core.tables import read_table, write_table
from cytopretrain.curation.crops import upsample_chunk

log = setup_logging(snakemake)
settings = snakemake.params.crops
selection = read_table(snakemake.input.selection)
class_sizes = selection["label"].value_counts()
report = upsample_chunk(
    snakemake.input.images,
    selection,
    class_sizes,
    snakemake.output.crops,
    seed=settings["seed"],
    rules=[tuple(rule) for rule in settings["rules"]],
    scales=tuple(settings["scales"]),
    min_crop_side=settings["min_crop_side"],
    min_image_side=settings["min_image_side"],
    low=snakemake.params.low,
    high=snakemake.params.high,
)
write_table(report, snakemake.output.images)
log.info(
    "chunk %s: %d images, %d labelled -> %d crops",
    snakemake.wildcards.chunk,
    len(report),
    int(report["selected"].sum()),
    int(report["n_crops_written"].sum()),
)
