"""The data funnel: how many images or crops enter and leave every stage, and why.

Every stage must reconcile (in = kept + removed); :func:`build_funnel` raises
:class:`FunnelError` naming the stage when it does not, so a run never loses an image silently.
"""

from __future__ import annotations

import pandas as pd

from cytopretrain.core.errors import FunnelError
from cytopretrain.core.schema import QUARANTINE_FIELDS


def _row(stage: str, unit: str, n_in: int, n_kept: int, n_removed: int, removed_as: str) -> dict:
    return {
        "stage": stage,
        "unit": unit,
        "n_in": int(n_in),
        "n_kept": int(n_kept),
        "n_removed": int(n_removed),
        "removed_as": removed_as,
    }


def _reasons(frame: pd.DataFrame) -> str:
    counts = frame["reason"].value_counts()
    return ", ".join(f"{reason}: {n}" for reason, n in counts.items())


def build_funnel(
    *,
    source_rows: int,
    source_issues: pd.DataFrame,
    standardize: pd.DataFrame,
    selection: pd.DataFrame,
    crops: pd.DataFrame,
    qc: pd.DataFrame,
    dropped_labels: pd.DataFrame,
    excluded: pd.DataFrame,
    shard_index: pd.DataFrame,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Funnel table (one row per stage) and the union of all quarantined images and crops.

    Arguments are the stages' own outputs: canonical rows over all pretraining sources and
    their issues; standardize decisions (idx, status, reason, detail); the label selection
    (idx, label); the per-image crop reports (idx, selected, n_crops_written); QC decisions
    (crop_id, idx, label, status, reason, detail); labels dropped after QC; crops the shard
    writer excluded; the shard index (split, n_samples).
    """
    rows = [
        _row(
            "clean_metadata",
            "images",
            source_rows + len(source_issues),
            source_rows,
            len(source_issues),
            _reasons(source_issues),
        ),
    ]
    std_kept = int((standardize["status"] == "kept").sum())
    std_quarantined = standardize[standardize["status"] != "kept"]
    rows.append(
        _row("standardize", "images", len(standardize), std_kept, len(std_quarantined), _reasons(std_quarantined))
    )
    rows.append(
        _row(
            "assign_labels",
            "images",
            std_kept,
            len(selection),
            std_kept - len(selection),
            "not chosen by any weak label (kept out of the set, not quarantined)",
        )
    )
    labelled = crops[crops["selected"]]
    n_crops = int(labelled["n_crops_written"].sum())
    rows.append(
        _row(
            "upsample_crops",
            "images",
            len(selection),
            len(labelled),
            len(selection) - len(labelled),
            "selected images missing from the crop reports",
        )
    )
    qc_kept = int((qc["status"] == "kept").sum())
    qc_quarantined = qc[qc["status"] != "kept"]
    rows.append(_row("quality_control", "crops", n_crops, qc_kept, len(qc_quarantined), _reasons(qc_quarantined)))
    rows.append(
        _row(
            "write_shards",
            "crops",
            qc_kept,
            int(shard_index["n_samples"].sum()),
            len(excluded),
            f"labels dropped below the minimum after QC: {len(dropped_labels)}",
        )
    )
    funnel = pd.DataFrame(rows)
    broken = funnel[funnel["n_in"] != funnel["n_kept"] + funnel["n_removed"]]
    if len(broken):
        first = broken.iloc[0]
        raise FunnelError(
            f"stage {first['stage']}: {first['n_in']} in but {first['n_kept']} kept + {first['n_removed']} removed"
        )
    if len(qc) != n_crops:
        raise FunnelError(f"stage quality_control: {len(qc)} decisions for {n_crops} crops written")
    columns = [*QUARANTINE_FIELDS, "crop_id"]
    quarantine = pd.concat(
        [
            source_issues.reindex(columns=columns),
            std_quarantined.reindex(columns=columns),
            qc_quarantined.reindex(columns=columns),
            excluded.reindex(columns=columns).assign(stage="write_shards"),
        ],
        ignore_index=True,
    ).fillna("")
    return funnel, quarantine
