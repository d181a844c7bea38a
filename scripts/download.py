"""Rule download: fetch, verify and extract one source into results/download/<source>."""

from pathlib import Path

from _workflow import setup_logging

from cytopretrain.curation.download import download_source
from cytopretrain.curation.resources import resource_from_config

log = setup_logging(snakemake)
source = snakemake.wildcards.source
spec = dict(snakemake.params.spec)
if "synthetic" in spec:
    # The demo archives are offered exactly like a remote source, through a file:// URL.
    spec = {**spec, "url": Path(snakemake.input[0]).resolve().as_uri(), "archive": "zip"}
    spec.pop("synthetic")
resource = resource_from_config(source, spec)
manifest = download_source(resource, Path(snakemake.output[0]), cache_dir=Path(snakemake.params.cache))
log.info("downloaded %s: %s", source, manifest)
