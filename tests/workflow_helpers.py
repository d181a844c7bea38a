"""Running the workflow from tests: the repository's Snakefile in a scratch working directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from cell_images import BBBC_CELLS_OPTIONS

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def write_config(workdir: Path, config: dict) -> Path:
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def demo_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def snakemake(workdir: Path, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    """Run snakemake on the repository's Snakefile with ``workdir/config.yaml``."""
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"snakemake failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def real_config() -> dict:
    """The real subsets of ../shared/data as local `path:` sources (test_workflow_real, test_slurm)."""
    return {
        "chunk_size": 500,
        "sources": {
            "rxrx1": {"path": str(DATA / "rxrx1"), "adapter": "rxrx1", "options": {"incomplete_sites": "keep"}},
            "yeast": {
                "path": str(DATA / "yeast_toy" / "images"),
                "adapter": "cyclops",
                "options": {"category": "gene"},
            },
            "hpa_cells": {"path": str(DATA / "hpa_toy"), "adapter": "hpa", "options": {"layout": "cells"}},
            "bbbc021_cells": {
                "path": str(DATA / "bbbc021_cells"),
                "adapter": "manifest",
                "options": BBBC_CELLS_OPTIONS,
            },
            "bbbc021": {"path": str(DATA / "bbbc021"), "adapter": "bbbc021", "role": "benchmark"},
        },
        "labels": {"min_count": 20, "take_all_max": 200, "prelim_max": 400},
        "crops": {"rules": [[200, 1], [100, 2], [50, 3], [0, 4]], "min_crop_side": 24, "min_image_side": 48},
        "quality_control": {"min_images_per_label": 30},
        "shards": {"samples_per_shard": 300},
    }
