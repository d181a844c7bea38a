"""Rule outliers: autoencoder-latent outlier scores of the curated crops (seed 004)."""

from pathlib import Path

import pandas as pd
import torch
from _workflow import setup_logging

from cytopretrain.outliers import crop_latents, defect_images, load_autoencoder, score_crops
from cytopretrain.tables import read_table, write_table

log = setup_logging(snakemake)
torch.set_num_threads(snakemake.threads)
settings = snakemake.params.settings
method, card = load_autoencoder(snakemake.input.method, snakemake.input.card)
latents = crop_latents(method, card, Path(snakemake.input.index).parent)
marked = set()
if snakemake.input.get("ground_truth"):
    metadata = read_table(snakemake.input.table, columns=["idx", "channel_paths"])
    marked = defect_images(metadata, pd.read_csv(snakemake.input.ground_truth))
scores = score_crops(latents, k=settings["k"], min_samples=settings["min_samples"], marked=marked)
write_table(scores, snakemake.output.scores)
text = scores[scores["injected_text"]]
log.info(
    "%d crops scored; %d from images with injected text, ranks %s",
    len(scores),
    len(text),
    text["rank"].tolist(),
)
