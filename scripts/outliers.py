"""Rule outliers: autoencoder-latent outlier scores of the curated crops (seed 004)."""

from pathlib import Path

import pandas as pd
import torch
from _workflow import setup_logging

from cytopretrain.core.tables import read_table, write_table
from cytopretrain.evaluation.outliers import encode_crops, load_autoencoder, score_crops, text_boxes

log = setup_logging(snakemake)
torch.set_num_threads(snakemake.threads)
settings = snakemake.params.settings
method, card = load_autoencoder(snakemake.input.method, snakemake.input.card)
encoded = encode_crops(method, card, Path(snakemake.input.index).parent)
boxes = {}
if snakemake.input.get("ground_truth"):
    metadata = read_table(snakemake.input.table, columns=["idx", "channel_paths"])
    boxes = text_boxes(metadata, pd.read_csv(snakemake.input.ground_truth))
scores = score_crops(encoded, k=settings["k"], min_samples=settings["min_samples"], boxes=boxes)
write_table(scores, snakemake.output.scores)
text = scores[scores["injected_text"]]
log.info(
    "%d crops scored; %d overlap injected annotation text, ranks %s (latent distance: %s)",
    len(scores),
    len(text),
    text["rank"].tolist(),
    sorted(text["latent_rank"].tolist()),
)
