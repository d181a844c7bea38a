"""BBBC021 mechanism-of-action protocols: not-same-compound (NSC) and not-same-compound-or-batch
(NSCB) 1-NN, on image profiles or on per-well tables (Ljosa et al. 2013)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cytopretrain.core.errors import EvaluationError
from cytopretrain.core.numerics import zscore
from cytopretrain.evaluation.knn import knn
from cytopretrain.evaluation.protocols.common import (
    accuracy_result,
    decode,
    feature_matrix,
    require_columns,
)


def nsc(
    profiles: pd.DataFrame,
    *,
    moa_col: str = "Metadata_moa",
    compound_col: str = "Metadata_compound",
    concentration_col: str = "Metadata_concentration",
    control: str = "DMSO",
    control_mask: np.ndarray | None = None,
    aggregate: str = "mean",
) -> dict:
    """BBBC021 MOA accuracy, not-same-compound (Ljosa 2013; CytoImageNet Table 2).

    1. Control rows are dropped — those whose compound equals ``control`` (case-insensitive),
       or those of ``control_mask`` when it is given — then rows without a MOA (compounds
       outside BBBC021_v1_moa.csv); both counts are reported.
    2. Features are z-scored with a StandardScaler fit on the remaining rows (images, wells or
       treatments, whatever the table holds).
    3. Treatment = (compound, concentration), sorted by compound then concentration; its profile
       is the ``aggregate`` ("mean" or "median", per feature) of its z-scored rows. A table that is
       already one row per treatment passes through unchanged. A treatment must have one MOA.
    4. Each treatment's prediction is the MOA of its nearest other treatment by cosine distance
       among treatments of a different compound (1-NN; ties to the earlier treatment in the
       sorted order). Accuracy over all treatments (103 in BBBC021).

    Details: n_rows_input / _control / _unlabelled / _used, aggregate, chance_accuracy (mean
    over treatments of the fraction of eligible neighbours sharing the MOA: the expected
    accuracy of a random eligible neighbour), treatments (one record per treatment: compound,
    concentration, moa, predicted, neighbour compound and concentration, cosine distance).
    """
    return _moa_protocol(
        "nsc", profiles, moa_col, compound_col, concentration_col, None, control, control_mask, aggregate
    )


def nscb(
    profiles: pd.DataFrame,
    *,
    moa_col: str = "Metadata_moa",
    compound_col: str = "Metadata_compound",
    concentration_col: str = "Metadata_concentration",
    batch_col: str = "Metadata_batch",
    control: str = "DMSO",
    control_mask: np.ndarray | None = None,
    aggregate: str = "mean",
) -> dict:
    """BBBC021 MOA accuracy, not-same-compound-or-batch (Ando et al. 2017).

    As ``nsc``, with two changes after step 3: MOAs whose rows all lie in one batch are dropped
    (in BBBC021: Cholesterol-lowering and Kinase inhibitors, leaving 92 treatments), and a
    neighbour is also excluded when it shares a batch with the query. A treatment's batches are
    all batches of its rows: in the image-level BBBC021 table taxol 0.3 µM, the positive control
    of every plate, spans all ten batches, so it has no eligible neighbour and counts as wrong
    (prediction None, counted in n_without_neighbour); the Ljosa per-well table keeps only its
    Week1 wells. Batch = the value of ``batch_col`` (for BBBC021 the plate's ``WeekN`` prefix).
    Details add dropped_moas; the z-scoring still uses every labelled non-control row, as in
    ``nsc``.
    """
    return _moa_protocol(
        "nscb", profiles, moa_col, compound_col, concentration_col, batch_col, control, control_mask, aggregate
    )


def _moa_protocol(
    protocol: str,
    profiles: pd.DataFrame,
    moa_col: str,
    compound_col: str,
    concentration_col: str,
    batch_col: str | None,
    control: str,
    control_mask: np.ndarray | None,
    aggregate: str,
) -> dict:
    columns = [moa_col, compound_col, concentration_col] + ([batch_col] if batch_col else [])
    require_columns(profiles, columns, protocol)
    if aggregate not in ("mean", "median"):
        raise EvaluationError(f"{protocol}: aggregate must be 'mean' or 'median', got {aggregate!r}")
    if control_mask is None:
        is_control = profiles[compound_col].astype(str).str.strip().str.casefold() == control.casefold()
    else:
        is_control = pd.Series(np.asarray(control_mask, dtype=bool), index=profiles.index)
    unlabelled = ~is_control & profiles[moa_col].isna()
    rows = profiles[~is_control & ~unlabelled].reset_index(drop=True)
    if rows.empty:
        raise EvaluationError(f"{protocol}: no labelled non-{control} rows")
    if rows[columns].isna().any().any():
        raise EvaluationError(f"{protocol}: missing values in {columns} among labelled rows")
    z = zscore(feature_matrix(rows, protocol))

    key = [compound_col, concentration_col]
    grouped = pd.DataFrame(z).groupby([rows[compound_col], rows[concentration_col]], sort=True)
    info = rows.groupby(key, sort=True).agg(moa=(moa_col, "unique"))
    treatment_profiles = (grouped.mean() if aggregate == "mean" else grouped.median()).loc[info.index]
    several = info[info["moa"].map(len) > 1]
    if len(several):
        raise EvaluationError(f"{protocol}: treatment(s) with several MOAs in {moa_col!r}: {list(several.index[:3])}")
    info["moa"] = info["moa"].map(lambda values: str(values[0]))
    details: dict = {
        "n_rows_input": len(profiles),
        "n_rows_control": int(is_control.sum()),
        "n_rows_unlabelled": int(unlabelled.sum()),
        "n_rows_used": len(rows),
        "aggregate": aggregate,
    }
    group_codes = [pd.factorize(info.index.get_level_values(0))[0][:, None]]
    if batch_col:
        info["batches"] = rows.groupby(key, sort=True)[batch_col].apply(lambda s: sorted(set(map(str, s))))
        moa_batches = rows.groupby(moa_col)[batch_col].nunique()
        dropped = sorted(str(m) for m in moa_batches[moa_batches < 2].index)
        keep = ~info["moa"].isin(dropped).to_numpy()
        info, treatment_profiles = info[keep], treatment_profiles[keep]
        if len(info) < 2:
            raise EvaluationError(f"{protocol}: fewer than two treatments of MOAs seen in two batches")
        group_codes = [pd.factorize(info.index.get_level_values(0))[0][:, None], _batch_codes(info["batches"])]
        details["dropped_moas"] = dropped
    if len(info) < 2:
        raise EvaluationError(f"{protocol}: fewer than two treatments to compare")
    codes = np.hstack(group_codes)
    distances, neighbours = knn(treatment_profiles.to_numpy(), None, 1, metric="cosine", query_groups=codes)
    moas = info["moa"].to_numpy()
    predicted = decode(neighbours[:, 0], moas)
    details["chance_accuracy"] = _chance_accuracy(codes, moas)
    details["treatments"] = [
        {
            "compound": str(c),
            "concentration": float(conc),
            "moa": moa,
            "predicted": pred,
            "neighbour_compound": None if j < 0 else str(info.index[j][0]),
            "neighbour_concentration": None if j < 0 else float(info.index[j][1]),
            "distance": None if j < 0 else float(d),
        }
        for (c, conc), moa, pred, j, d in zip(info.index, moas, predicted, neighbours[:, 0], distances[:, 0])
    ]
    details["n_without_neighbour"] = int((neighbours[:, 0] < 0).sum())
    return accuracy_result(protocol, moas, predicted, **details)


def _batch_codes(batches: pd.Series) -> np.ndarray:
    """Batch sets as padded code rows (-1 = padding), codes offset past compound codes."""
    names = {b: i for i, b in enumerate(sorted({b for bs in batches for b in bs}))}
    width = max(len(bs) for bs in batches)
    codes = np.full((len(batches), width), -1, dtype=np.int64)
    offset = len(batches)  # compound codes are < number of treatments
    for row, bs in enumerate(batches):
        codes[row, : len(bs)] = [offset + names[b] for b in bs]
    return codes


def _chance_accuracy(codes: np.ndarray, labels: np.ndarray) -> float:
    """Mean over queries with an eligible neighbour of the eligible share with the same label."""
    shares = []
    for i in range(len(labels)):
        clash = ((codes[i][:, None] == codes[:, None, :]) & (codes[i][:, None] >= 0)).any(axis=(1, 2))
        eligible = ~clash
        eligible[i] = False
        if eligible.any():
            shares.append(float((labels[eligible] == labels[i]).mean()))
    return float(np.mean(shares)) if shares else float("nan")
