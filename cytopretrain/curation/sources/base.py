"""What every source adapter returns, and the helpers adapters share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cytopretrain.core.errors import SourceError
from cytopretrain.core.schema import QUARANTINE_FIELDS, conform


@dataclass
class AdapterResult:
    """A canonical table (see schema.py) plus the images the adapter set aside, with reasons.

    ``issues`` has the quarantine columns (idx, stage, reason, detail) with stage
    "clean_metadata": images the source lists that cannot enter the table (for example an
    RxRx1 site missing channels). Images listed by the source = rows of ``table`` + rows of
    ``issues``.
    """

    table: pd.DataFrame
    issues: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame({c: pd.Series(dtype=object) for c in QUARANTINE_FIELDS})
    )


def issues_frame(rows: list[dict]) -> pd.DataFrame:
    """Quarantine rows (dicts with idx, reason, detail) for stage clean_metadata."""
    frame = pd.DataFrame(rows, columns=["idx", "reason", "detail"])
    frame.insert(1, "stage", "clean_metadata")
    return frame.astype(object)


def finish(frame: pd.DataFrame, origin: str, issues: list[dict] | None = None) -> AdapterResult:
    """Conform an adapter's table to the canonical schema and attach its issues."""
    return AdapterResult(conform(frame, origin), issues_frame(issues or []))


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise SourceError(f"{what} not found: {path}")
    return path
