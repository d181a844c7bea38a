"""Shared set-up for rule scripts: make the project's package importable and log to the rule's log."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def setup_logging(snakemake) -> logging.Logger:
    """Send the package's log records (and uncaught errors) to the rule's log file."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if snakemake.log:
        handlers.append(logging.FileHandler(snakemake.log[0], mode="w"))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    logger = logging.getLogger(f"cytopretrain.rule.{snakemake.rule}")

    def log_uncaught(exc_type, exc, tb):
        logger.error("rule %s failed", snakemake.rule, exc_info=(exc_type, exc, tb))

    sys.excepthook = log_uncaught
    return logger


def extraction_options(snakemake) -> dict:
    """extract_features' options (evaluation.features.ExtractionOptions) from a rule's params:
    the ``features`` section, the ``device`` and the benchmark source's ``z_projection``."""
    settings = snakemake.params.features
    return {
        **{k: settings[k] for k in ("channel_mode", "normalize", "resize", "batch_size", "precision", "num_workers")},
        "device": snakemake.params.device,
        "z_projection": snakemake.params.z_projection,
    }
