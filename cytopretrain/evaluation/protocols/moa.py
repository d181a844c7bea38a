"""BBBC021 mechanism-of-action protocols: not-same-compound (NSC) and not-same-compound-or-batch
(NSCB) 1-NN, on image profiles or on per-well tables (Ljosa et al. 2013)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from cytopretrain.core.errors import EvaluationError
from cytopretrain.core.numerics import zscore
from cytopretrain.evaluation.knn import knn
from cytopretrain.evaluation.profiles import read_profile_table
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
    aggregate: str = "mean",
) -> dict:
    """BBBC021 MOA accuracy, not-same-compound (Ljosa 2013; CytoImageNet Table 2).

    1. Rows whose compound equals ``control`` (case-insensitive) are dropped, then rows without
       a MOA (compounds outside BBBC021_v1_moa.csv); both counts are reported.
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
    return _moa_protocol("nsc", profiles, moa_col, compound_col, concentration_col, None, control, aggregate)


def nscb(
    profiles: pd.DataFrame,
    *,
    moa_col: str = "Metadata_moa",
    compound_col: str = "Metadata_compound",
    concentration_col: str = "Metadata_concentration",
    batch_col: str = "Metadata_batch",
    control: str = "DMSO",
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
    return _moa_protocol("nscb", profiles, moa_col, compound_col, concentration_col, batch_col, control, aggregate)


def _moa_protocol(
    protocol: str,
    profiles: pd.DataFrame,
    moa_col: str,
    compound_col: str,
    concentration_col: str,
    batch_col: str | None,
    control: str,
    aggregate: str,
) -> dict:
    columns = [moa_col, compound_col, concentration_col] + ([batch_col] if batch_col else [])
    require_columns(profiles, columns, protocol)
    if aggregate not in ("mean", "median"):
        raise EvaluationError(f"{protocol}: aggregate must be 'mean' or 'median', got {aggregate!r}")
    is_control = profiles[compound_col].astype(str).str.strip().str.casefold() == control.casefold()
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


def bbbc021_from_well_profiles(
    well_table: pd.DataFrame | str | os.PathLike,
    image_csv: pd.DataFrame | str | os.PathLike,
    moa_csv: pd.DataFrame | str | os.PathLike,
    *,
    plate_col: str = "Image_Metadata_Plate",
    well_col: str = "Image_Metadata_Well",
    aggregate: str = "mean",
) -> dict:
    """NSC and NSCB on a precomputed per-well feature table keyed by plate and well.

    Every column of ``well_table`` other than plate and well is a feature (e.g. the 516
    CellProfiler means of Ljosa et al. 2013). Wells get compound and concentration from
    BBBC021_v1_image.csv (columns Image_Metadata_Plate_DAPI, Image_Metadata_Well_DAPI,
    Image_Metadata_Compound, Image_Metadata_Concentration; one compound per well or it is an
    error), the MOA from BBBC021_v1_moa.csv (compound, concentration, moa) joined on compound
    and concentration (rounded to 9 decimals), batch = the plate name before its first "_"
    (``Week4_27481`` -> ``Week4``). A well missing from the image table is an error.
    Then ``nsc`` and ``nscb`` run on the wells: DMSO wells and wells without MOA are dropped,
    the StandardScaler is fit on the remaining (treated, MOA-annotated) wells, a treatment's
    profile is the ``aggregate`` (mean by default) of its z-scored wells, 1-NN by cosine
    distance. Returns {"nsc": result, "nscb": result, "n_wells": ..., "n_features": ...}.
    """
    profiles = bbbc021_well_table(well_table, image_csv, moa_csv, plate_col=plate_col, well_col=well_col)
    return bbbc021_well_results(profiles, aggregate=aggregate)


def bbbc021_well_results(profiles: pd.DataFrame, *, aggregate: str = "mean") -> dict:
    """``bbbc021_from_well_profiles``'s result from its joined table (``bbbc021_well_table``)."""
    n_features = sum(not column.startswith("Metadata_") for column in profiles.columns)
    return {
        "nsc": nsc(profiles, aggregate=aggregate),
        "nscb": nscb(profiles, aggregate=aggregate),
        "n_wells": len(profiles),
        "n_features": n_features,
    }


def bbbc021_well_table(
    well_table: pd.DataFrame | str | os.PathLike,
    image_csv: pd.DataFrame | str | os.PathLike,
    moa_csv: pd.DataFrame | str | os.PathLike,
    *,
    plate_col: str = "Image_Metadata_Plate",
    well_col: str = "Image_Metadata_Well",
) -> pd.DataFrame:
    """The per-well table as a profile table, joined as ``bbbc021_from_well_profiles`` says:
    Metadata_ plate, well, compound, concentration, moa (NaN when unknown) and batch, then the
    features, one row per well in the table's order."""
    wells = _read_table(well_table, "well_table")
    images = _read_table(image_csv, "image_csv")
    moa = _read_table(moa_csv, "moa_csv")
    _require_raw(wells, [plate_col, well_col], "well_table")
    image_keys = ["Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI"]
    _require_raw(images, image_keys + ["Image_Metadata_Compound", "Image_Metadata_Concentration"], "image_csv")
    _require_raw(moa, ["compound", "concentration", "moa"], "moa_csv")
    if wells.duplicated([plate_col, well_col]).any():
        raise EvaluationError(f"well_table: several rows for one ({plate_col}, {well_col})")

    treatments = images[image_keys + ["Image_Metadata_Compound", "Image_Metadata_Concentration"]].drop_duplicates()
    conflicting = treatments.duplicated(image_keys, keep=False)
    if conflicting.any():
        raise EvaluationError(
            f"image_csv: wells with several compounds/concentrations: "
            f"{treatments[conflicting][image_keys].drop_duplicates().head(3).values.tolist()}"
        )
    # Join on the key columns only, then put the (wide) features back in well order.
    keys = wells[[plate_col, well_col]].reset_index(drop=True)
    joined = keys.merge(
        treatments,
        how="left",
        left_on=[plate_col, well_col],
        right_on=image_keys,
        validate="one_to_one",
        indicator=True,
    )
    unmatched = joined["_merge"] != "both"
    if unmatched.any():
        raise EvaluationError(
            f"well_table: {int(unmatched.sum())} well(s) not in image_csv, e.g. "
            f"{joined.loc[unmatched, [plate_col, well_col]].head(3).values.tolist()}"
        )
    moa = moa.assign(_conc=moa["concentration"].astype(float).round(9))
    if moa.duplicated(["compound", "_conc"]).any():
        raise EvaluationError("moa_csv: several rows for one (compound, concentration)")
    joined = joined.assign(_conc=joined["Image_Metadata_Concentration"].astype(float).round(9)).merge(
        moa[["compound", "_conc", "moa"]],
        how="left",
        left_on=["Image_Metadata_Compound", "_conc"],
        right_on=["compound", "_conc"],
    )
    features = [c for c in wells.columns if c not in (plate_col, well_col)]
    metadata = pd.DataFrame(
        {
            "Metadata_plate": joined[plate_col].astype(str),
            "Metadata_well": joined[well_col].astype(str),
            "Metadata_compound": joined["Image_Metadata_Compound"].astype(str),
            "Metadata_concentration": joined["Image_Metadata_Concentration"].astype(float),
            "Metadata_moa": joined["moa"],
            "Metadata_batch": joined[plate_col].astype(str).str.split("_").str[0],
        }
    )
    return pd.concat([metadata, wells[features].reset_index(drop=True)], axis=1)


def _read_table(source: pd.DataFrame | str | os.PathLike, name: str) -> pd.DataFrame:
    if isinstance(source, pd.DataFrame):
        return source
    if not os.path.exists(source):
        raise EvaluationError(f"{name}: file not found: {os.fspath(source)}")
    return read_profile_table(source)


def _require_raw(table: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise EvaluationError(f"{name}: column(s) {missing} missing (has {list(table.columns[:8])}...)")
