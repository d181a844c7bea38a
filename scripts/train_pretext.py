"""Rule train_pretext: train one pretext run on the shards, resuming from its checkpoints."""

import shutil
from pathlib import Path

import torch
from _workflow import setup_logging

from cytopretrain.learning.distributed import launch
from cytopretrain.learning.train import discard_stale_checkpoints, train

log = setup_logging(snakemake)
work_dir = Path(snakemake.params.work_dir)
settings = dict(snakemake.params.settings, progress=False)
shards_dir = Path(snakemake.input.index).parent
processes = snakemake.params.processes
stale = discard_stale_checkpoints(work_dir, settings, shards_dir, world_size=processes)
if stale:
    log.warning("starting over: the checkpoints of %s do not fit this run: %s", snakemake.wildcards.run, stale)
if processes > 1:  # torchrun: DistributedDataParallel over `processes` ranks on this node
    result = launch(
        settings,
        shards_dir,
        work_dir,
        processes=processes,
        device=snakemake.params.device,
        threads=snakemake.threads,
    )
else:
    torch.set_num_threads(snakemake.threads)
    result = train(settings, shards_dir, work_dir, device=snakemake.params.device, resume=True)
if not result["finished"]:
    raise RuntimeError(f"training stopped at step {result['step']} of {settings['steps']}")
# The declared outputs (each named as the training writes it) are copied last, so a killed job
# leaves only checkpoints behind.
for output in snakemake.output:
    shutil.copyfile(work_dir / Path(output).name, output)
if processes > 1:  # the ranks logged to the job's stderr: repeat the monitors' warnings here
    for warning in result["warnings"]:
        log.warning("%s", warning)
log.info("trained %s: %s; best: %s", snakemake.wildcards.run, result["metrics"], result["best"])
