"""cytopretrain: curate weakly labelled microscopy collections, pretrain and evaluate models."""

from pathlib import Path

__version__ = "0.1.0"

# The repository root: the workflow's schema and the source descriptions live beside the package.
REPO_ROOT = Path(__file__).resolve().parents[1]
