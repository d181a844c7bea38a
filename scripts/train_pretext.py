"""Rule train_pretext: train one pretext run on the shards, resuming from its checkpoints."""

import shutil
from pathlib import Path

import torch
from _workflow import setup_logging

from cytopretrain.train import train

log = setup_logging(snakemake)
torch.set_num_threads(snakemake.threads)
work_dir = Path(snakemake.params.work_dir)
settings = dict(snakemake.params.settings, progress=False)
result = train(
    settings,
    Path(snakemake.input.index).parent,
    work_dir,
    device=snakemake.params.device,
    resume=True,
)
if not result["finished"]:
    raise RuntimeError(f"training stopped at step {result['step']} of {settings['steps']}")
# The declared outputs are copied last, so a killed job leaves only checkpoints behind.
for name in ("backbone", "method", "metrics", "card"):
    source = work_dir / {"backbone": "backbone.pt", "method": "method.pt", "metrics": "metrics.jsonl", "card": "model_card.json"}[name]
    shutil.copyfile(source, snakemake.output[name])
log.info("trained %s: %s", snakemake.wildcards.run, result["metrics"])
