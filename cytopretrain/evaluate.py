"""Evaluation protocols of the learning half: one function per protocol, each documented exactly.

Input is a profile table (pandas DataFrame, the pycytominer / copairs convention):
``Metadata_``-prefixed metadata columns (e.g. Metadata_idx, Metadata_label, Metadata_compound,
Metadata_concentration, Metadata_plate, Metadata_well, Metadata_batch, Metadata_split,
Metadata_moa) and numeric feature columns (every other column). Missing columns, non-numeric or
non-finite features and missing labels are errors that name the column.

Accuracy-type protocols return a JSON-serializable dict with: protocol, n, correct, accuracy,
ci95 (1.96·sqrt(acc·(1-acc)/n), the normal-approximation half-width of the 95 % interval),
per_class (true label -> n, correct, accuracy), confusion (labels, matrix: rows = true label,
columns = predicted label; a prediction None, where no neighbour was eligible, is the column
"<none>"), plus protocol-specific details. Labels are compared and reported as strings.

Shared rules. z-scoring is scikit-learn's StandardScaler (mean and population standard deviation
of the rows named in each protocol; a constant feature gets scale 1). Nearest neighbours come from
``cytopretrain.knn`` and are exact: equal distances go to the smaller row index (row order of the
table, or of the sorted treatments). k-NN votes: the label with most of the k neighbours wins; a
tie between labels goes to the tied label whose nearest neighbour comes first.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from cytopretrain.knn import knn

METADATA_PREFIX = "Metadata_"
NO_PREDICTION = "<none>"


class EvaluationError(ValueError):
    """Invalid input to an evaluation protocol."""


# --- profile tables -----------------------------------------------------------------------

def metadata_columns(profiles: pd.DataFrame) -> list[str]:
    """Columns whose name starts with ``Metadata_``, in table order."""
    return [c for c in profiles.columns if str(c).startswith(METADATA_PREFIX)]


def feature_columns(profiles: pd.DataFrame) -> list[str]:
    """All other columns (the features), in table order."""
    return [c for c in profiles.columns if not str(c).startswith(METADATA_PREFIX)]


def _require(profiles: pd.DataFrame, columns: Sequence[str], protocol: str) -> None:
    if not isinstance(profiles, pd.DataFrame):
        raise EvaluationError(f"{protocol}: profiles must be a pandas DataFrame, got {type(profiles).__name__}")
    missing = [c for c in columns if c not in profiles.columns]
    if missing:
        raise EvaluationError(f"{protocol}: column(s) {missing} not in the profile table "
                              f"(metadata columns: {metadata_columns(profiles)})")


def _features(profiles: pd.DataFrame, protocol: str) -> np.ndarray:
    """Feature matrix (rows x features), float32 if all features are float32, else float64."""
    columns = feature_columns(profiles)
    if not columns:
        raise EvaluationError(f"{protocol}: no feature columns (every column starts with {METADATA_PREFIX!r})")
    non_numeric = [c for c in columns if not pd.api.types.is_numeric_dtype(profiles[c])
                   or pd.api.types.is_bool_dtype(profiles[c])]
    if non_numeric:
        raise EvaluationError(f"{protocol}: non-numeric feature column(s) {non_numeric[:5]}; "
                              f"metadata columns must start with {METADATA_PREFIX!r}")
    dtype = np.float32 if all(profiles[c].dtype == np.float32 for c in columns) else np.float64
    values = np.ascontiguousarray(profiles[columns].to_numpy(dtype=dtype))
    bad = ~np.isfinite(values).all(axis=0)
    if bad.any():
        raise EvaluationError(f"{protocol}: NaN or infinite values in feature column(s) "
                              f"{[columns[i] for i in np.flatnonzero(bad)][:5]}")
    return values


def _labels(profiles: pd.DataFrame, column: str, protocol: str) -> np.ndarray:
    missing = profiles[column].isna()
    if missing.any():
        raise EvaluationError(f"{protocol}: {int(missing.sum())} row(s) without a value in {column!r}")
    return profiles[column].astype(str).to_numpy()


def _standardize(values: np.ndarray, fit_rows: np.ndarray | None = None, chunk: int = 16384) -> np.ndarray:
    """StandardScaler: centre and scale by mean and population std of the fit rows.

    Statistics accumulate in float64 over row chunks; the output keeps the input dtype.
    """
    fitted = values if fit_rows is None else values[fit_rows]
    if fitted.shape[0] == 0:
        raise EvaluationError("no rows to fit the StandardScaler on")
    mean = sum(fitted[i:i + chunk].sum(axis=0, dtype=np.float64) for i in range(0, len(fitted), chunk)) / len(fitted)
    squares = sum(((fitted[i:i + chunk] - mean) ** 2).sum(axis=0) for i in range(0, len(fitted), chunk))
    std = np.sqrt(squares / len(fitted))
    std[std == 0] = 1.0
    out = np.empty(values.shape, dtype=values.dtype)
    for i in range(0, len(values), chunk):
        out[i:i + chunk] = (values[i:i + chunk] - mean) / std
    return out


# --- results -------------------------------------------------------------------------------

def _ci95(accuracy: float, n: int) -> float:
    return float(1.96 * np.sqrt(accuracy * (1 - accuracy) / n))


def _accuracy_result(protocol: str, y_true: np.ndarray, y_pred: Sequence, **details) -> dict:
    """The common result dict (module docstring) of true labels and predictions (None allowed)."""
    truth = [str(t) for t in y_true]
    predicted = [NO_PREDICTION if p is None else str(p) for p in y_pred]
    n = len(truth)
    if n == 0:
        raise EvaluationError(f"{protocol}: nothing to evaluate (0 rows)")
    hits = np.array([t == p for t, p in zip(truth, predicted)])
    accuracy = float(hits.mean())
    labels = sorted(set(truth) | set(predicted) - {NO_PREDICTION})
    if NO_PREDICTION in predicted:
        labels.append(NO_PREDICTION)
    position = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(matrix, ([position[t] for t in truth], [position[p] for p in predicted]), 1)
    per_class = {}
    for label in sorted(set(truth)):
        rows = np.array([t == label for t in truth])
        per_class[label] = {"n": int(rows.sum()), "correct": int(hits[rows].sum()),
                            "accuracy": float(hits[rows].mean())}
    return {"protocol": protocol, "n": n, "correct": int(hits.sum()), "accuracy": accuracy,
            "ci95": _ci95(accuracy, n), "per_class": per_class,
            "confusion": {"labels": labels, "matrix": matrix.tolist()}, **details}


def _vote(neighbour_codes: np.ndarray) -> np.ndarray:
    """Majority label code per row of (n, k) neighbour codes, nearest first; -1 = missing.

    Ties between labels go to the tied label whose nearest neighbour comes first: for each
    neighbour position the count of its label is taken, and argmax returns the first maximum.
    Rows without any neighbour get -1.
    """
    valid = neighbour_codes >= 0
    same = neighbour_codes[:, :, None] == neighbour_codes[:, None, :]
    counts = (same & valid[:, None, :]).sum(axis=2)
    counts[~valid] = -1
    winner = counts.argmax(axis=1)
    codes = neighbour_codes[np.arange(len(neighbour_codes)), winner]
    return np.where(valid.any(axis=1), codes, -1)


def _decode(codes: np.ndarray, names: np.ndarray) -> list:
    return [names[c] if c >= 0 else None for c in codes]


# --- BBBC021 not-same-compound (NSC) and not-same-compound-or-batch (NSCB) ----------------

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


def _moa_protocol(protocol: str, profiles: pd.DataFrame, moa_col: str, compound_col: str,
                  concentration_col: str, batch_col: str | None, control: str, aggregate: str) -> dict:
    columns = [moa_col, compound_col, concentration_col] + ([batch_col] if batch_col else [])
    _require(profiles, columns, protocol)
    if aggregate not in ("mean", "median"):
        raise EvaluationError(f"{protocol}: aggregate must be 'mean' or 'median', got {aggregate!r}")
    is_control = profiles[compound_col].astype(str).str.strip().str.casefold() == control.casefold()
    unlabelled = ~is_control & profiles[moa_col].isna()
    rows = profiles[~is_control & ~unlabelled].reset_index(drop=True)
    if rows.empty:
        raise EvaluationError(f"{protocol}: no labelled non-{control} rows")
    if rows[columns].isna().any().any():
        raise EvaluationError(f"{protocol}: missing values in {columns} among labelled rows")
    z = _standardize(_features(rows, protocol))

    key = [compound_col, concentration_col]
    grouped = pd.DataFrame(z).groupby([rows[compound_col], rows[concentration_col]], sort=True)
    info = rows.groupby(key, sort=True).agg(moa=(moa_col, "unique"))
    treatment_profiles = (grouped.mean() if aggregate == "mean" else grouped.median()).loc[info.index]
    several = info[info["moa"].map(len) > 1]
    if len(several):
        raise EvaluationError(f"{protocol}: treatment(s) with several MOAs in {moa_col!r}: "
                              f"{list(several.index[:3])}")
    info["moa"] = info["moa"].map(lambda values: str(values[0]))
    details: dict = {"n_rows_input": len(profiles), "n_rows_control": int(is_control.sum()),
                     "n_rows_unlabelled": int(unlabelled.sum()), "n_rows_used": len(rows),
                     "aggregate": aggregate}
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
    predicted = _decode(neighbours[:, 0], moas)
    details["chance_accuracy"] = _chance_accuracy(codes, moas)
    details["treatments"] = [
        {"compound": str(c), "concentration": float(conc), "moa": moa, "predicted": pred,
         "neighbour_compound": None if j < 0 else str(info.index[j][0]),
         "neighbour_concentration": None if j < 0 else float(info.index[j][1]),
         "distance": None if j < 0 else float(d)}
        for (c, conc), moa, pred, j, d in zip(info.index, moas, predicted, neighbours[:, 0], distances[:, 0])
    ]
    details["n_without_neighbour"] = int((neighbours[:, 0] < 0).sum())
    return _accuracy_result(protocol, moas, predicted, **details)


def _batch_codes(batches: pd.Series) -> np.ndarray:
    """Batch sets as padded code rows (-1 = padding), codes offset past compound codes."""
    names = {b: i for i, b in enumerate(sorted({b for bs in batches for b in bs}))}
    width = max(len(bs) for bs in batches)
    codes = np.full((len(batches), width), -1, dtype=np.int64)
    offset = len(batches)  # compound codes are < number of treatments
    for row, bs in enumerate(batches):
        codes[row, :len(bs)] = [offset + names[b] for b in bs]
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
    return {"nsc": nsc(profiles, aggregate=aggregate), "nscb": nscb(profiles, aggregate=aggregate),
            "n_wells": len(profiles), "n_features": n_features}


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
        raise EvaluationError(f"image_csv: wells with several compounds/concentrations: "
                              f"{treatments[conflicting][image_keys].drop_duplicates().head(3).values.tolist()}")
    # Join on the key columns only, then put the (wide) features back in well order.
    keys = wells[[plate_col, well_col]].reset_index(drop=True)
    joined = keys.merge(treatments, how="left", left_on=[plate_col, well_col], right_on=image_keys,
                        validate="one_to_one", indicator=True)
    unmatched = joined["_merge"] != "both"
    if unmatched.any():
        raise EvaluationError(f"well_table: {int(unmatched.sum())} well(s) not in image_csv, e.g. "
                              f"{joined.loc[unmatched, [plate_col, well_col]].head(3).values.tolist()}")
    moa = moa.assign(_conc=moa["concentration"].astype(float).round(9))
    if moa.duplicated(["compound", "_conc"]).any():
        raise EvaluationError("moa_csv: several rows for one (compound, concentration)")
    joined = joined.assign(_conc=joined["Image_Metadata_Concentration"].astype(float).round(9)).merge(
        moa[["compound", "_conc", "moa"]], how="left", left_on=["Image_Metadata_Compound", "_conc"],
        right_on=["compound", "_conc"])
    features = [c for c in wells.columns if c not in (plate_col, well_col)]
    metadata = pd.DataFrame({
        "Metadata_plate": joined[plate_col].astype(str),
        "Metadata_well": joined[well_col].astype(str),
        "Metadata_compound": joined["Image_Metadata_Compound"].astype(str),
        "Metadata_concentration": joined["Image_Metadata_Concentration"].astype(float),
        "Metadata_moa": joined["moa"],
        "Metadata_batch": joined[plate_col].astype(str).str.split("_").str[0],
    })
    return pd.concat([metadata, wells[features].reset_index(drop=True)], axis=1)


def read_profile_table(path: str | os.PathLike) -> pd.DataFrame:
    """A CSV or TSV (optionally gzipped) or Parquet table, its format from the file name."""
    lower = os.fspath(path).lower()
    if lower.endswith(".parquet"):
        return pd.read_parquet(path)
    return pd.read_csv(path, sep="\t" if lower.endswith((".tsv", ".tsv.gz")) else ",")


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


# --- kNN classification (COOS-7 hold-out, CyCLOPS leave-one-out) ---------------------------

def knn_holdout(
    profiles: pd.DataFrame,
    *,
    label_col: str = "Metadata_label",
    split_col: str = "Metadata_split",
    train_split: str = "train",
    k: int = 11,
) -> dict:
    """COOS-7 protocol: k-NN from the training split to every other split.

    StandardScaler fit on the rows whose ``split_col`` equals ``train_split``; every other row is
    a query; its k nearest training rows by Euclidean distance on the z-scored features vote
    (module docstring: majority, ties to the tied label with the nearest neighbour). The top
    level pools all non-train rows; ``splits`` holds one result per split (e.g. test1..test4),
    sorted by name. Details: k, n_train.
    """
    _require(profiles, [label_col, split_col], "knn_holdout")
    labels = _labels(profiles, label_col, "knn_holdout")
    splits = profiles[split_col].astype(str).to_numpy()
    train = splits == str(train_split)
    if not train.any() or train.all():
        raise EvaluationError(f"knn_holdout: {split_col!r} needs rows equal to {train_split!r} and other rows")
    z = _standardize(_features(profiles, "knn_holdout"), train)
    names, train_codes = np.unique(labels[train], return_inverse=True)
    _, neighbours = knn(z[~train], z[train], k)
    predicted = np.array(_decode(_vote(np.where(neighbours >= 0, train_codes[neighbours], -1)), names), dtype=object)
    query_labels, query_splits = labels[~train], splits[~train]
    per_split = {
        split: _accuracy_result("knn_holdout", query_labels[query_splits == split],
                                predicted[query_splits == split], split=split, k=k)
        for split in sorted(set(query_splits))
    }
    return _accuracy_result("knn_holdout", query_labels, predicted, k=k, n_train=int(train.sum()),
                            splits=per_split)


def knn_loo(profiles: pd.DataFrame, *, label_col: str = "Metadata_label", k: int = 11) -> dict:
    """CyCLOPS protocol: leave-one-out k-NN over all rows.

    StandardScaler fit on all rows; each row's k nearest other rows (Euclidean, z-scored; the
    row itself excluded, its exact duplicates kept) vote as in the module docstring.
    Details: k.
    """
    _require(profiles, [label_col], "knn_loo")
    labels = _labels(profiles, label_col, "knn_loo")
    if len(labels) < 2:
        raise EvaluationError("knn_loo: needs at least two rows")
    names, codes = np.unique(labels, return_inverse=True)
    _, neighbours = knn(_standardize(_features(profiles, "knn_loo")), None, k, exclude_self=True)
    predicted = _decode(_vote(np.where(neighbours >= 0, codes[neighbours], -1)), names)
    return _accuracy_result("knn_loo", labels, predicted, k=k)


# --- retrieval -----------------------------------------------------------------------------

def mean_average_precision(profiles: pd.DataFrame, *, label_col: str = "Metadata_label",
                           block_rows: int | None = None) -> dict:
    """mAP of same-label retrieval by cosine similarity (as copairs' average_precision).

    Every row is a query; all other rows are ranked by cosine similarity of the features as
    given (no scaling; a zero row has similarity 0), highest first, equal similarities by row
    order. Positives are rows with the same label. AP = mean over positives of the precision at
    the positive's rank. Rows whose label has no other row have no AP (counted in n_skipped,
    None in ``average_precision``). Returns protocol, n (queries with an AP),
    mean_average_precision (mean over those queries), macro_map (mean of per-label means),
    per_class (label -> n, mean_average_precision), average_precision (per row, table order).
    Time O(n² log n); memory bounded by ``block_rows`` x n similarities.
    """
    _require(profiles, [label_col], "mean_average_precision")
    labels = _labels(profiles, label_col, "mean_average_precision")
    values = _features(profiles, "mean_average_precision").astype(np.float64)
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    unit = values / np.where(norms > 0, norms, 1.0)
    _, codes = np.unique(labels, return_inverse=True)
    n = len(labels)
    block_rows = block_rows or max(1, (1 << 22) // max(n, 1))
    ap = np.full(n, np.nan)
    for start in range(0, n, block_rows):
        rows = np.arange(start, min(start + block_rows, n))
        similarity = unit[rows] @ unit.T
        similarity[np.arange(len(rows)), rows] = -np.inf  # the query itself ranks last
        order = np.argsort(-similarity, axis=1, kind="stable")[:, :-1]
        relevant = codes[order] == codes[rows][:, None]
        hits = np.cumsum(relevant, axis=1)
        n_positive = relevant.sum(axis=1)
        precision_sum = (relevant * hits / np.arange(1, n)).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            ap[rows] = np.where(n_positive > 0, precision_sum / n_positive, np.nan)
    valid = ~np.isnan(ap)
    if not valid.any():
        raise EvaluationError(f"mean_average_precision: no label in {label_col!r} has two rows")
    per_class = {label: {"n": int((labels[valid] == label).sum()),
                         "mean_average_precision": float(ap[valid][labels[valid] == label].mean())}
                 for label in sorted(set(labels[valid]))}
    return {"protocol": "mean_average_precision", "n": int(valid.sum()),
            "n_skipped": int((~valid).sum()), "mean_average_precision": float(ap[valid].mean()),
            "macro_map": float(np.mean([c["mean_average_precision"] for c in per_class.values()])),
            "per_class": per_class, "average_precision": [None if np.isnan(a) else float(a) for a in ap]}


# --- multi-label linear probe (seed 001, HPA) ----------------------------------------------

def multilabel_f1(
    profiles: pd.DataFrame,
    *,
    labels_col: str = "Metadata_labels",
    split_col: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    test_fraction: float = 0.25,
    seed: int = 0,
    C: float = 1.0,
    max_iter: int = 2000,
) -> dict:
    """Seed 001 (HPA): linear probe with macro F1 over labels.

    Labels: ``labels_col`` holds "|"-joined label names per row (blank parts ignored; a row may
    have none). Split: with ``split_col``, rows equal to ``train_split`` train and rows equal to
    ``test_split`` are tested (others unused); without it, a seeded split stratified on each
    row's rarest label (least frequent over the table, ties by name): within each such group
    the rows are shuffled with numpy's default_rng(seed) and round(test_fraction * size) of
    them go to test (so a label seen once never reaches the test set). Features: StandardScaler
    fit on the training rows. Probe: scikit-learn one-vs-rest LogisticRegression (L2, C,
    lbfgs, max_iter), one binary classifier per label, threshold 0.5; a label without positive
    (or negative) training rows predicts its constant. Score: F1 per label over the labels with
    at least one positive test row (a label never predicted has precision 0 and F1 0), macro F1
    = their unweighted mean. Returns protocol, n (test rows), n_train, macro_f1, per_class
    (label -> n_positive, precision, recall, f1), labels_not_in_test, split, seed.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import precision_recall_fscore_support
    from sklearn.multiclass import OneVsRestClassifier

    _require(profiles, [labels_col] + ([split_col] if split_col else []), "multilabel_f1")
    sets = [frozenset(p.strip() for p in str(v).split("|") if p.strip()) if pd.notna(v) else frozenset()
            for v in profiles[labels_col]]
    names = sorted(set().union(*sets))
    if not names:
        raise EvaluationError(f"multilabel_f1: no labels in {labels_col!r}")
    targets = np.array([[name in s for name in names] for s in sets], dtype=np.int64)
    if split_col:
        split_values = profiles[split_col].astype(str).to_numpy()
        train, test = split_values == train_split, split_values == test_split
        split = f"{split_col}: {train_split!r} / {test_split!r}"
    else:
        test = _rarest_label_split(sets, targets, names, test_fraction, seed)
        train = ~test
        split = f"stratified on rarest label, test_fraction={test_fraction}, seed={seed}"
    if not train.any() or not test.any():
        raise EvaluationError(f"multilabel_f1: empty train ({int(train.sum())}) or test ({int(test.sum())}) set")
    z = _standardize(_features(profiles, "multilabel_f1"), train)
    probe = OneVsRestClassifier(LogisticRegression(C=C, max_iter=max_iter))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Label .* is present in all training examples")
        probe.fit(z[train], targets[train])
    predicted = probe.predict(z[test])
    evaluated = targets[test].sum(axis=0) > 0
    precision, recall, f1, support = precision_recall_fscore_support(
        targets[test][:, evaluated], predicted[:, evaluated], average=None, zero_division=0)
    kept = [name for name, e in zip(names, evaluated) if e]
    per_class = {name: {"n_positive": int(s), "precision": float(p), "recall": float(r), "f1": float(f)}
                 for name, p, r, f, s in zip(kept, precision, recall, f1, support)}
    return {"protocol": "multilabel_f1", "n": int(test.sum()), "n_train": int(train.sum()),
            "macro_f1": float(np.mean(f1)), "per_class": per_class,
            "labels_not_in_test": [n for n, e in zip(names, evaluated) if not e],
            "split": split, "seed": seed}


def _rarest_label_split(sets: list[frozenset], targets: np.ndarray, names: list[str],
                        test_fraction: float, seed: int) -> np.ndarray:
    if not 0 < test_fraction < 1:
        raise EvaluationError(f"multilabel_f1: test_fraction must be in (0, 1), got {test_fraction}")
    frequency = dict(zip(names, targets.sum(axis=0)))
    strata = [min(s, key=lambda name: (frequency[name], name)) if s else "" for s in sets]
    rng = np.random.default_rng(seed)
    test = np.zeros(len(sets), dtype=bool)
    for stratum in sorted(set(strata)):
        rows = rng.permutation(np.flatnonzero(np.array(strata) == stratum))
        test[rows[:int(round(test_fraction * len(rows)))]] = True
    return test


# --- pair query by cosine threshold (seed 003, BYOL histology) -----------------------------

def pair_threshold(
    profiles: pd.DataFrame,
    *,
    label_col: str = "Metadata_label",
    seed: int = 0,
    n_pairs: int = 2000,
    validation_fraction: float = 0.5,
    retrieval_k: int = 10,
    retrieval_metric: str = "euclidean",
) -> dict:
    """Seed 003: "same class?" answered by a cosine-similarity threshold; rank-10 retrieval.

    Rows are split into a validation and a test part, per label: the label's rows shuffled with
    numpy's default_rng(seed), the first round(validation_fraction * size) to validation. In
    each part, n_pairs // 2 same-label and n_pairs // 2 different-label pairs of distinct rows
    are drawn uniformly (with replacement across pairs). Similarity = cosine of the features
    as given. A pair is predicted "same" when similarity >= threshold; the threshold maximizes
    validation accuracy among the midpoints between consecutive distinct validation
    similarities and one value below / above them all (ties: the smallest threshold). The top
    level reports test-pair accuracy (labels "same" / "different"). Retrieval: each row's
    ``retrieval_k`` nearest other rows over the whole table (``retrieval_metric`` on the
    features as given, as seed 003 ranks by Euclidean distance); precision = share of them with
    the query's label, averaged over rows (retrieval_precision). Details: threshold,
    validation_accuracy, seed.
    """
    _require(profiles, [label_col], "pair_threshold")
    labels = _labels(profiles, label_col, "pair_threshold")
    values = _features(profiles, "pair_threshold")
    rng = np.random.default_rng(seed)
    validation = np.zeros(len(labels), dtype=bool)
    for label in sorted(set(labels)):
        rows = rng.permutation(np.flatnonzero(labels == label))
        validation[rows[:int(round(validation_fraction * len(rows)))]] = True
    unit = values.astype(np.float64) / np.maximum(np.linalg.norm(values.astype(np.float64), axis=1, keepdims=True), 1e-300)
    parts = {}
    for name, rows in (("validation", np.flatnonzero(validation)), ("test", np.flatnonzero(~validation))):
        first, second, same = _sample_pairs(rows, labels, n_pairs // 2, rng, name)
        parts[name] = ((unit[first] * unit[second]).sum(axis=1), same)
    threshold, validation_accuracy = _best_threshold(*parts["validation"])
    similarity, same = parts["test"]
    y_true = np.where(same, "same", "different")
    y_pred = np.where(similarity >= threshold, "same", "different")
    _, neighbours = knn(values, None, retrieval_k, metric=retrieval_metric, exclude_self=True)
    hits = np.where(neighbours >= 0, labels[neighbours] == labels[:, None], False)
    return _accuracy_result("pair_threshold", y_true, list(y_pred), threshold=threshold,
                            validation_accuracy=validation_accuracy, seed=seed,
                            retrieval_k=retrieval_k, retrieval_metric=retrieval_metric,
                            retrieval_precision=float(hits.mean()))


def _sample_pairs(rows: np.ndarray, labels: np.ndarray, n_each: int, rng: np.random.Generator,
                  part: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n_each same-label and n_each different-label pairs of distinct rows, drawn uniformly."""
    names, counts = np.unique(labels[rows], return_counts=True)
    same_pairs = counts * (counts - 1) / 2
    if same_pairs.sum() == 0 or len(names) < 2:
        raise EvaluationError(f"pair_threshold: the {part} part needs a label with two rows and two labels")
    # Same-label pairs: label drawn with probability ∝ its number of pairs, then two rows.
    chosen = rng.choice(len(names), size=n_each, p=same_pairs / same_pairs.sum())
    first, second = [], []
    for label_index, count in zip(*np.unique(chosen, return_counts=True)):
        members = rows[labels[rows] == names[label_index]]
        a = rng.integers(0, members.size, size=count)
        b = rng.integers(0, members.size - 1, size=count)
        b += b >= a  # a second, different member
        first.append(members[a])
        second.append(members[b])
    # Different-label pairs: uniform pairs of rows, rejecting same-label ones.
    diff_first, diff_second = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    while diff_first.size < n_each:
        a, b = rng.choice(rows, size=2 * n_each), rng.choice(rows, size=2 * n_each)
        keep = labels[a] != labels[b]
        diff_first, diff_second = np.r_[diff_first, a[keep]], np.r_[diff_second, b[keep]]
    first = np.concatenate(first + [diff_first[:n_each]])
    second = np.concatenate(second + [diff_second[:n_each]])
    same = np.r_[np.ones(n_each, dtype=bool), np.zeros(n_each, dtype=bool)]
    return first, second, same


def _best_threshold(similarity: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """Threshold (predict same when similarity >= it) with the best accuracy; smallest on ties."""
    values = np.unique(similarity)
    candidates = np.r_[values[0] - 1.0, (values[:-1] + values[1:]) / 2, values[-1] + 1.0]
    # For each candidate, pairs at or above it are "same": count correct answers on both sides.
    order = np.argsort(similarity)
    sorted_sim, sorted_same = similarity[order], same[order]
    below = np.searchsorted(sorted_sim, candidates, side="left")
    different_below = np.r_[0, np.cumsum(~sorted_same)][below]
    same_above = sorted_same.sum() - np.r_[0, np.cumsum(sorted_same)][below]
    accuracy = (different_below + same_above) / len(similarity)
    best = int(np.argmax(accuracy))
    return float(candidates[best]), float(accuracy[best])


# --- 1-NN label agreement and 2-D embeddings (seed 000) ------------------------------------

def embedding_2d(profiles: pd.DataFrame | np.ndarray, method: str = "fastica", seed: int = 0) -> np.ndarray:
    """(n, 2) coordinates of the features as given (no scaling), as in seeds 000 and 003.

    "fastica": scikit-learn FastICA(2 components, fun="cube", max_iter=3000, tol=1e-5,
    whiten="unit-variance", random_state=seed), seed 000's settings; "pca": PCA(2, full SVD).
    """
    from sklearn.decomposition import PCA, FastICA

    values = _matrix(profiles, "embedding_2d").astype(np.float64)
    if values.shape[0] < 3:
        raise EvaluationError("embedding_2d: needs at least three rows")
    if method == "fastica":
        model = FastICA(n_components=2, fun="cube", max_iter=3000, tol=1e-5,
                        whiten="unit-variance", random_state=seed)
    elif method == "pca":
        model = PCA(n_components=2, svd_solver="full")
    else:
        raise EvaluationError(f"embedding_2d: method must be 'fastica' or 'pca', got {method!r}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FastICA did not converge")
        return model.fit_transform(values)


def nn_agreement(profiles: pd.DataFrame, *, label_col: str = "Metadata_label",
                 space: str = "fastica", seed: int = 0) -> dict:
    """Seed 000 "consensus": share of rows whose nearest other row has the same label.

    Nearest = Euclidean 1-NN (the row itself excluded; ties to the earlier row) in
    ``space``: "fastica" or "pca" = the ``embedding_2d`` coordinates (seed 000 measured it in
    its FastICA plane: 600 of 1000), "features" = the z-scored features (StandardScaler fit on
    all rows). The result's predicted label is the neighbour's; accuracy = agreement.
    Details: space, seed.
    """
    _require(profiles, [label_col], "nn_agreement")
    labels = _labels(profiles, label_col, "nn_agreement")
    if space == "features":
        coordinates = _standardize(_features(profiles, "nn_agreement"))
    elif space in ("fastica", "pca"):
        coordinates = embedding_2d(profiles, method=space, seed=seed)
    else:
        raise EvaluationError(f"nn_agreement: space must be 'fastica', 'pca' or 'features', got {space!r}")
    _, neighbours = knn(coordinates, None, 1, exclude_self=True)
    return _accuracy_result("nn_agreement", labels, _decode(neighbours[:, 0], labels), space=space, seed=seed)


# --- outlier tiles in autoencoder latent space (seed 004) ----------------------------------

def outlier_scores(latents: pd.DataFrame | np.ndarray, *, k: int = 5, eps: float | None = None,
                   min_samples: int = 5) -> pd.DataFrame:
    """Seed 004: kNN-distance outlier score and DBSCAN noise on standardized latents.

    Latents (a profile table's features, or an array) are z-scored (StandardScaler fit on all
    rows). score = mean Euclidean distance to the k nearest other rows; rank 1 = highest score
    (ties to the earlier row). DBSCAN(eps, min_samples, Euclidean) labels clusters 0, 1, ...
    and noise -1; is_outlier = noise. eps=None: knee of the sorted k-distance curve, with the
    distance of each row to its (min_samples - 1)-th nearest other row (DBSCAN counts the row
    itself among min_samples): after scaling both axes of the ascending curve to [0, 1], the
    knee is the point farthest below the chord from its first to its last point, and eps is
    its distance (at least 1e-12). Returns one row per input row (metadata columns kept) with
    score, rank, dbscan_label, is_outlier; ``attrs`` holds eps, eps_source, k, min_samples.
    """
    from sklearn.cluster import DBSCAN

    values = _matrix(latents, "outlier_scores")
    n = values.shape[0]
    if n <= max(k, min_samples - 1):
        raise EvaluationError(f"outlier_scores: {n} rows, need more than k={k} and min_samples-1={min_samples - 1}")
    z = _standardize(values)
    distances, _ = knn(z, None, max(k, min_samples - 1), exclude_self=True)
    score = distances[:, :k].mean(axis=1)
    eps_source = "given"
    if eps is None:
        # With min_samples = 1 every row is a core point and eps does not matter.
        eps = _knee(distances[:, min_samples - 2]) if min_samples > 1 else 1e-12
        eps_source = "knee"
    if eps <= 0:
        raise EvaluationError(f"outlier_scores: eps must be positive, got {eps}")
    dbscan_labels = DBSCAN(eps=eps, min_samples=min_samples).fit_predict(z.astype(np.float64))
    rank = descending_rank(score)
    out = latents[metadata_columns(latents)].reset_index(drop=True) if isinstance(latents, pd.DataFrame) else pd.DataFrame(index=range(n))
    out = out.assign(score=score, rank=rank, dbscan_label=dbscan_labels, is_outlier=dbscan_labels == -1)
    out.attrs.update({"eps": float(eps), "eps_source": eps_source, "k": k, "min_samples": min_samples})
    return out


def descending_rank(values: np.ndarray) -> np.ndarray:
    """Rank 1 for the largest value, ties to the earlier row."""
    rank = np.empty(values.size, dtype=np.int64)
    rank[np.lexsort((np.arange(values.size), -values))] = np.arange(1, values.size + 1)
    return rank


def _knee(k_distances: np.ndarray) -> float:
    curve = np.sort(k_distances)
    span = curve[-1] - curve[0]
    if span <= 0:
        return max(float(curve[-1]), 1e-12)
    x = np.linspace(0.0, 1.0, curve.size)
    y = (curve - curve[0]) / span
    return max(float(curve[int(np.argmax(x - y))]), 1e-12)


def _matrix(data: pd.DataFrame | np.ndarray, protocol: str) -> np.ndarray:
    if isinstance(data, pd.DataFrame):
        return _features(data, protocol)
    values = np.asarray(data)
    if values.ndim != 2 or not np.issubdtype(values.dtype, np.number):
        raise EvaluationError(f"{protocol}: expected a 2-D numeric array or a profile table, got {values.shape}")
    if not np.isfinite(values).all():
        raise EvaluationError(f"{protocol}: NaN or infinite values in the latents")
    return values
