"""Profile tables evaluated the way the field does (config section ``profiles:``).

Any table of profiles — per-well CellProfiler features aggregated by pycytominer, DeepProfiler
profiles, this workflow's own ``results/features/…parquet`` — goes through one path:

1. Read (CSV, TSV, optionally gzipped, or Parquet) and ``join`` further tables: each join maps
   profile columns to the join table's key columns (``on``) and brings ``columns`` in
   (join-table column -> new ``Metadata_`` column). The join table is reduced to its distinct
   rows first (BBBC021's image table repeats a well's compound once per image); a key matching
   several distinct rows is an error, a profile row matching none keeps missing values (counted
   as ``join_unmatched``). Numeric keys are compared rounded to 9 decimals (concentrations
   written with different precision), others as stripped text. A column that already exists,
   or comes twice, is an error naming the config key.
2. Features: every column not starting with ``Metadata_``, narrowed by ``features`` (a list of
   names or a regular expression). A non-numeric feature column is an error naming it. A
   feature column with a NaN or infinite value in any row is dropped, and so is a constant one
   (both counted and named in the record: dropping the row instead would lose wells to a single
   undefined CellProfiler measurement).
3. Roles: ``label`` (the class compared), ``perturbation`` (one column or several, e.g.
   compound and concentration: its first column is the perturbation's identity, the compound,
   used where "the same perturbation" must be excluded), ``batch`` (a column, or the part of one
   before ``separator``, e.g. BBBC021's ``Week4_27481`` -> ``Week4``), ``controls``
   ({column: value or [values]}; a row is a control when it matches every listed column).
4. ``normalize`` with pycytominer (``standardize`` or ``robust_mad`` = pycytominer's
   mad_robustize), fitted on all rows or on the controls, optionally per batch; then
   ``feature_select`` with pycytominer (variance threshold and/or correlation threshold).
5. ``aggregate`` (mean or median per perturbation, per batch when the table has one) for
   ``knn_loo``, ``map`` and ``clustering``; ``nsc`` and ``nscb`` aggregate themselves after their own z-scoring
   (Ljosa et al.; mean unless ``aggregate`` says median), and ``replicate_map`` needs the
   replicates, so it refuses an aggregated table.
6. Protocols (``PROFILE_PROTOCOLS``): ``nsc``, ``nscb`` (1-NN MOA accuracy not counting
   the same compound, and batch), ``knn_loo``, ``map`` (label retrieval: positives share the
   label and differ in the perturbation's identity, controls left out), ``replicate_map``
   (replicates retrieved against controls), ``clustering`` (k-means with k = the number of
   labels on the treated, labelled rows; protocols.clustering, options under ``clustering``).

The record (``results/eval/profiles/<name>.json``) has the shape of the benchmark evaluations
(benchmark, model, published, label, n_profiles, results) plus the counts of every step, so
summary.tsv and the report show the table beside the CNN models of the same benchmark.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd

from cytopretrain.core.errors import EvaluationError, ProfileError
from cytopretrain.core.numerics import zscore
from cytopretrain.evaluation.profile_tables import (
    METADATA_PREFIX,
    feature_columns,
    metadata_columns,
    non_numeric,
    read_profile_table,
)
from cytopretrain.evaluation.protocols import clustering, embedding_2d
from cytopretrain.evaluation.protocols.mean_ap import PERTURBATION, mean_average_precision, replicate_map
from cytopretrain.evaluation.protocols.moa import nsc, nscb
from cytopretrain.evaluation.protocols.neighbours import knn_loo

TABLE_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".parquet")
# The protocols a profiles entry can run, and the roles each needs.
PROTOCOL_ROLES = {
    "nsc": ("label", "perturbation"),
    "nscb": ("label", "perturbation", "batch"),
    "knn_loo": ("label",),
    "map": ("label",),
    "replicate_map": ("perturbation", "controls"),
    "clustering": ("label",),
}
PROFILE_PROTOCOLS = tuple(PROTOCOL_ROLES)
NORMALIZE_METHODS = {"none": None, "standardize": "standardize", "robust_mad": "mad_robustize"}
AGGREGATES = ("none", "mean", "median")
# Internal role columns (Metadata_ so never features): any table column may hold a role.
LABEL = "Metadata__label"
COMPOUND = "Metadata__compound"  # the perturbation's identity: its first column
DOSE = "Metadata__dose"  # its second column, or 0 when it has one
BATCH = "Metadata__batch"
CONTROL = "Metadata__control"
# What an entry means when it leaves a key out (the config schema shows the same).
PROFILE_DEFAULTS = {
    "benchmark": None,  # None: the entry's own name
    "published": None,
    "features": None,
    "join": [],
    "label": None,
    "perturbation": None,
    "batch": None,
    "controls": {},
    "normalize": {"method": "none", "fit": "all", "by_batch": False},
    "feature_select": {"variance": False, "correlation": None},
    "aggregate": "none",
    "k": 11,
    "map": {},
    "replicate_map": {},
    "clustering": {},
}


def read_table(path: str | os.PathLike, key: str) -> pd.DataFrame:
    """One table, its format from the file-name ending; ``key`` is the config key naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ProfileError(f"config key '{key}': file not found: {path}")
    if not path.lower().endswith(TABLE_SUFFIXES):
        raise ProfileError(f"config key '{key}': {path} is not a table this reads ({', '.join(TABLE_SUFFIXES)})")
    return read_profile_table(path)


def _columns_hint(table: pd.DataFrame, limit: int = 12) -> str:
    names = [str(c) for c in table.columns]
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} columns)" if len(names) > limit else "")


def _require(table: pd.DataFrame, columns: list[str], key: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ProfileError(f"config key '{key}': column(s) {missing} not in the table; it has {_columns_hint(table)}")


def _key_values(values: pd.Series) -> pd.Series:
    """Join keys: numbers rounded to 9 decimals, anything else as stripped text."""
    numeric = pd.to_numeric(values, errors="coerce")
    if values.notna().any() and numeric[values.notna()].notna().all():
        return numeric.round(9)
    return values.astype("string").str.strip()


def join_tables(
    profiles: pd.DataFrame, joins: list[dict], tables: list[pd.DataFrame], key: str
) -> tuple[pd.DataFrame, int]:
    """``profiles`` with each join's columns brought in (step 1 of the module docstring); the
    number of rows some join found no match for."""
    unmatched = np.zeros(len(profiles), dtype=bool)
    for number, (join, table) in enumerate(zip(joins, tables)):
        where = f"{key}.join[{number}]"
        left, right = list(join["on"]), list(join["on"].values())
        _require(profiles, left, f"{where}.on")
        _require(table, right, f"{where}.on")
        taken = join.get("columns") or {c: METADATA_PREFIX + str(c) for c in table.columns if c not in right}
        _require(table, list(taken), f"{where}.columns")
        targets = list(taken.values())
        clash = sorted({t for t in targets if t in profiles.columns} | {t for t in targets if targets.count(t) > 1})
        if clash:
            raise ProfileError(
                f"config key '{where}.columns': column(s) {clash} already in the table (or given twice); "
                "rename them with `columns: {their_name: Metadata_new_name}`"
            )
        bad = [t for t in targets if not str(t).startswith(METADATA_PREFIX)]
        if bad:
            raise ProfileError(
                f"config key '{where}.columns': joined columns are metadata; {bad} must start with {METADATA_PREFIX!r}"
            )
        side = table[right + list(taken)].drop_duplicates().reset_index(drop=True)
        keys = pd.DataFrame({f"_key{i}": _key_values(side[c]) for i, c in enumerate(right)})
        side = pd.concat([keys, side[list(taken)].rename(columns=taken).reset_index(drop=True)], axis=1)
        side = side.drop_duplicates()  # rows equal once their keys are normalized
        if side.duplicated([f"_key{i}" for i in range(len(right))]).any():
            example = side[side.duplicated([f"_key{i}" for i in range(len(right))], keep=False)].head(2)
            raise ProfileError(
                f"config key '{where}.on': a key of the join table matches several distinct rows, e.g. "
                f"{example.drop(columns=[c for c in example.columns if c.startswith('_key')]).to_dict('records')}"
            )
        left_keys = pd.DataFrame({f"_key{i}": _key_values(profiles[c]).to_numpy() for i, c in enumerate(left)})
        merged = left_keys.merge(side, how="left", on=list(left_keys.columns), indicator=True, validate="many_to_one")
        unmatched |= (merged["_merge"] != "both").to_numpy()
        profiles = pd.concat([profiles.reset_index(drop=True), merged[targets]], axis=1)
    return profiles, int(unmatched.sum())


def _feature_names(table: pd.DataFrame, features: str | list[str] | None, key: str) -> list[str]:
    candidates = feature_columns(table)
    if isinstance(features, str):
        pattern = re.compile(features)
        candidates = [c for c in candidates if pattern.search(str(c))]
    elif features is not None:
        _require(table, list(features), f"{key}.features")
        meta = [c for c in features if str(c).startswith(METADATA_PREFIX)]
        if meta:
            raise ProfileError(f"config key '{key}.features': {meta} are metadata columns, never features")
        candidates = list(features)
    if not candidates:
        raise ProfileError(f"config key '{key}.features': no feature column; the table has {_columns_hint(table)}")
    text = non_numeric(table, candidates)
    if text:
        raise ProfileError(
            f"config key '{key}': column(s) {text[:5]} are not numeric; metadata columns must start with "
            f"{METADATA_PREFIX!r}, or narrow the features with `features:`"
        )
    return candidates


def _clean_features(table: pd.DataFrame, names: list[str]) -> tuple[list[str], dict]:
    values = table[names].to_numpy(dtype=np.float64)
    non_finite = ~np.isfinite(values).all(axis=0)
    finite = values[:, ~non_finite]
    constant = np.zeros(len(names), dtype=bool)
    constant[~non_finite] = (finite.max(axis=0) == finite.min(axis=0)) if len(finite) else True
    dropped = {
        "non_finite": [names[i] for i in np.flatnonzero(non_finite)],
        "constant": [names[i] for i in np.flatnonzero(constant)],
    }
    return [n for n, bad in zip(names, non_finite | constant) if not bad], dropped


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def control_mask(table: pd.DataFrame, controls: dict, key: str) -> np.ndarray:
    """Rows matching every listed column's value(s), compared as stripped text."""
    _require(table, list(controls), f"{key}.controls")
    mask = np.ones(len(table), dtype=bool)
    for column, values in controls.items():
        wanted = {str(v).strip() for v in _as_list(values)}
        mask &= table[column].astype("string").str.strip().isin(wanted).fillna(False).to_numpy()
    return mask


def _roles(table: pd.DataFrame, spec: dict, key: str) -> pd.DataFrame:
    """The role columns of step 3 as internal Metadata__ columns (any table column may hold a
    role, e.g. BBBC021's plate column gives the batch); a role value that is missing stays
    missing, and the protocols that need it drop the row and count it."""
    extra = {CONTROL: control_mask(table, spec["controls"], key) if spec["controls"] else False}
    if spec["label"] is not None:
        _require(table, [spec["label"]], f"{key}.label")
        extra[LABEL] = table[spec["label"]].astype("string").str.strip().replace("", pd.NA)
    if spec["perturbation"] is not None:
        columns = _as_list(spec["perturbation"])
        _require(table, columns, f"{key}.perturbation")
        parts = table[columns].astype("string")
        missing = parts.isna().any(axis=1)
        extra[PERTURBATION] = parts.fillna("").agg("|".join, axis=1).where(~missing)
        extra[COMPOUND] = table[columns[0]].astype("string")
        extra[DOSE] = pd.to_numeric(table[columns[1]], errors="coerce") if len(columns) > 1 else 0.0
    if spec["batch"] is not None:
        batch = spec["batch"] if isinstance(spec["batch"], dict) else {"column": spec["batch"]}
        _require(table, [batch["column"]], f"{key}.batch")
        values = table[batch["column"]].astype("string")
        extra[BATCH] = values.str.split(batch["separator"]).str[0] if batch.get("separator") else values
    roles = pd.DataFrame({name: values for name, values in extra.items()}, index=table.index)
    return pd.concat([table.drop(columns=[c for c in roles.columns if c in table.columns]), roles], axis=1)


def _normalize(table: pd.DataFrame, features: list[str], spec: dict, key: str) -> pd.DataFrame:
    """pycytominer's normalize of the features (step 4), per batch when asked."""
    from pycytominer import normalize

    settings = spec["normalize"]
    method = NORMALIZE_METHODS[settings["method"]]
    if method is None:
        return table
    if settings["fit"] == "controls" and not table[CONTROL].any():
        raise ProfileError(f"config key '{key}.normalize.fit': no row matches `controls` to fit on")
    samples = f"`{CONTROL}` == True" if settings["fit"] == "controls" else "all"
    meta = metadata_columns(table)
    groups = [table] if not settings["by_batch"] else [group for _, group in table.groupby(BATCH, sort=False)]
    parts = []
    for group in groups:
        if settings["fit"] == "controls" and not group[CONTROL].any():
            raise ProfileError(f"config key '{key}.normalize': batch {group[BATCH].iloc[0]!r} has no control row")
        parts.append(normalize(group, features=features, meta_features=meta, samples=samples, method=method))
    return pd.concat(parts).loc[table.index, table.columns]


def _feature_select(table: pd.DataFrame, features: list[str], spec: dict) -> tuple[pd.DataFrame, list[str]]:
    from pycytominer import feature_select

    settings = spec["feature_select"]
    operations = (["variance_threshold"] if settings["variance"] else []) + (
        ["correlation_threshold"] if settings["correlation"] is not None else []
    )
    if not operations:
        return table, features
    kwargs = {"corr_threshold": settings["correlation"]} if settings["correlation"] is not None else {}
    selected = feature_select(table, features=features, operation=operations, **kwargs)
    kept = [c for c in features if c in selected.columns]
    return table.drop(columns=[c for c in features if c not in kept]), kept


def _aggregate(table: pd.DataFrame, features: list[str], spec: dict, key: str) -> pd.DataFrame:
    if PERTURBATION not in table.columns:
        raise ProfileError(f"config key '{key}.aggregate': needs `perturbation`")
    strata = [PERTURBATION] + ([BATCH] if BATCH in table.columns else [])
    rows = table.dropna(subset=strata)
    carried = [c for c in metadata_columns(rows) if c not in strata]
    # metadata constant within a stratum (the label, the compound, ...) is carried along
    constant = [c for c in carried if (rows.groupby(strata, sort=True)[c].nunique(dropna=False) <= 1).all()]
    if LABEL in rows.columns and LABEL not in constant:
        raise ProfileError(f"config key '{key}.aggregate': a perturbation's rows carry several labels")
    grouped = rows.groupby(strata, sort=True)
    values = grouped[features].mean() if spec["aggregate"] == "mean" else grouped[features].median()
    meta = grouped[constant].first() if constant else pd.DataFrame(index=values.index)
    parts = [values.index.to_frame(index=False), meta.reset_index(drop=True), values.reset_index(drop=True)]
    return pd.concat(parts, axis=1)


def prepare_profiles(name: str, spec: dict, files: dict) -> tuple[pd.DataFrame, list[str], dict]:
    """Steps 1-4 of the module docstring: the profile table (its Metadata_ columns, the internal
    role columns and the features), its feature columns and the counts of what was dropped.
    ``files`` maps ``path`` and ``join`` (a list) to the files to read."""
    key = f"profiles.{name}"
    spec = {**PROFILE_DEFAULTS, **spec}
    table = read_table(files["path"], f"{key}.path")
    joins = [read_table(path, f"{key}.join[{i}].path") for i, path in enumerate(files.get("join", []))]
    table, unmatched = join_tables(table, spec["join"], joins, key)
    names = _feature_names(table, spec["features"], key)
    features, dropped = _clean_features(table, names)
    if not features:
        raise ProfileError(f"config key '{key}': every feature column is constant or holds NaN / inf")
    table = _roles(table, spec, key)
    table = table[metadata_columns(table) + features].astype({name: np.float64 for name in features}).copy()
    table = _normalize(table, features, spec, key)
    table, selected = _feature_select(table, features, spec)
    counts = {
        "n_rows": len(table),
        "n_features_input": len(names),
        "n_features": len(selected),
        "features_dropped": dropped,
        "n_features_deselected": len(features) - len(selected),
        "join_unmatched": unmatched,
        "n_controls": int(table[CONTROL].sum()),
    }
    return table, selected, counts


def _aggregated(table: pd.DataFrame, features: list[str], spec: dict, key: str) -> pd.DataFrame:
    """The treated rows as one profile per perturbation (per batch when the table has one)."""
    if spec["aggregate"] == "none":
        return table
    return _aggregate(table[~table[CONTROL]], features, spec, key).assign(**{CONTROL: False})


def _profile_protocol(protocol: str, table: pd.DataFrame, features: list[str], spec: dict, key: str) -> dict:
    """One protocol on the prepared table (steps 5-6); every role column is internal."""
    missing = [role for role in PROTOCOL_ROLES[protocol] if not spec[role]]
    if missing:
        raise ProfileError(f"config key '{key}.protocols': {protocol} needs {' and '.join(missing)}")
    controls = table[CONTROL].to_numpy(bool)
    if protocol in ("nsc", "nscb"):
        arguments = {
            "moa_col": LABEL,
            "compound_col": COMPOUND,
            "concentration_col": DOSE,
            "control_mask": controls,
            "aggregate": "median" if spec["aggregate"] == "median" else "mean",
        }
        return nsc(table, **arguments) if protocol == "nsc" else nscb(table, **arguments, batch_col=BATCH)
    if protocol == "replicate_map":
        if spec["aggregate"] != "none":
            raise ProfileError(f"config key '{key}.aggregate': replicate_map needs the replicates; use none")
        return replicate_map(table, perturbation_col=PERTURBATION, control_mask=controls, **spec["replicate_map"])
    rows = _aggregated(table, features, spec, key)
    if protocol in ("knn_loo", "clustering"):
        keep = ~rows[CONTROL].to_numpy(bool) & rows[LABEL].notna().to_numpy()
        labelled = rows[keep].reset_index(drop=True)
        if protocol == "knn_loo":
            result = knn_loo(labelled, label_col=LABEL, k=spec["k"])
        else:
            result = clustering(labelled, label_col=LABEL, **spec["clustering"])
        dropped = {"control": int(rows[CONTROL].sum()), "no label": int((~rows[CONTROL] & rows[LABEL].isna()).sum())}
        return {**result, "rows_dropped": dropped}
    return mean_average_precision(
        rows,
        label_col=LABEL,
        perturbation_col=COMPOUND if spec["perturbation"] is not None else None,
        control_mask=rows[CONTROL].to_numpy(bool),
        **spec["map"],
    )


def run_profile_protocols(table: pd.DataFrame, features: list[str], spec: dict, name: str) -> dict:
    """Every protocol of the entry on the prepared table: protocol name -> its result."""
    spec = {**PROFILE_DEFAULTS, **spec}
    return {
        protocol: _profile_protocol(protocol, table, features, spec, f"profiles.{name}")
        for protocol in spec["protocols"]
    }


def evaluate_profiles(name: str, spec: dict, files: dict) -> tuple[dict, pd.DataFrame]:
    """The evaluation record of one ``profiles`` entry and the 2-D embedding of its rows
    (idx = row number, label, x, y; FastICA of the z-scored features, as the report draws)."""
    spec = {**PROFILE_DEFAULTS, **spec}
    try:
        table, features, counts = prepare_profiles(name, spec, files)
        results = run_profile_protocols(table, features, spec, name)
    except EvaluationError as error:
        raise ProfileError(f"config key 'profiles.{name}': {error}") from error
    record = {
        "benchmark": spec["benchmark"] or name,
        "model": name,
        "published": spec["published"],
        "label": spec["label"] or "",
        "n_profiles": len(table),
        **counts,
        "settings": {k: v for k, v in spec.items() if k != "join"},
        "results": results,
    }
    labels = table[LABEL].fillna("") if LABEL in table.columns else pd.Series([""] * len(table))
    coordinates = embedding_2d(zscore(table[features].to_numpy(np.float64)), seed=0)
    embedding = pd.DataFrame(
        {
            "idx": np.arange(len(table)).astype(str),
            "label": labels.to_numpy(),
            "x": coordinates[:, 0],
            "y": coordinates[:, 1],
        }
    )
    return record, embedding
