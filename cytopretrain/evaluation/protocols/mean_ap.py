"""Mean average precision with copairs' semantics: label retrieval (``map``) and replicate
retrieval (``replicate_map``, JUMP's phenotypic activity), with copairs' significance test.

Pairs (copairs.map.average_precision). Two rows form a positive pair when they are equal on
every ``pos_sameby`` column and different on every ``pos_diffby`` column; a negative pair when
equal on every ``neg_sameby`` and different on every ``neg_diffby`` column. A pair can be both
(then it enters the query's rank list twice, once each way, as in copairs). Pair columns must
not hold missing values (copairs refuses them; rows without a label or perturbation are dropped
first and counted).

Average precision of a query: its positive and negative partners ranked by cosine similarity of
the features as given (highest first; pairs with an all-zero row, whose cosine is undefined,
rank last, as copairs' NaN similarities do), equal similarities with the positives first
(copairs' rule); AP = mean over the positives of the precision at their rank. A query without
positives has no AP (NaN, ``n_pos_pairs`` 0), as in copairs.

Why not copairs.map.average_precision itself: it enumerates every pair and gathers two feature
rows per pair, which grows as n² x features in time and memory (benchmarks/README.md,
"bench_map": minutes at 5,000 profiles). This module computes each query block's similarities
with one matrix product and counts, for the k-th positive (similarities descending), the
negatives strictly more similar: rank = k + that count. The per-query AP equals copairs' to
1e-9 whenever no two similarities of a query lie within float32 rounding of each other (copairs
rounds them to float32; exact ties agree), which tests/test_mean_ap.py checks against copairs
on generated tables, ties and empty groups included.

Significance: copairs.map.mean_average_precision at run time: per group the mAP, the
permutation p-value against ``null_size`` random rank lists of the same sizes (``seed``) and
the Benjamini-Hochberg corrected p-value; a group is retrieved when the corrected p-value is
below ``threshold``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

import numpy as np
import pandas as pd
from copairs.map import mean_average_precision as copairs_mean_average_precision
from copairs.map.normalization import normalize_ap

from cytopretrain.core.errors import EvaluationError
from cytopretrain.evaluation.profile_tables import metadata_columns
from cytopretrain.evaluation.protocols.common import feature_matrix, require_columns

PAIR_OPTIONS = ("pos_sameby", "pos_diffby", "neg_sameby", "neg_diffby")
SIGNIFICANCE_DEFAULTS = {"null_size": 10000, "threshold": 0.05, "seed": 0}
# Internal pair columns of replicate_map (the perturbation key and the control reference).
PERTURBATION = "Metadata__perturbation"
REFERENCE = "Metadata__reference"
# Similarities computed at once: block rows x table rows (32 MB in float64).
_BLOCK_VALUES = 1 << 22


def _codes(meta: pd.DataFrame, columns: Sequence[str], protocol: str) -> dict[str, np.ndarray]:
    missing = [c for c in columns if meta[c].isna().any()]
    if missing:
        raise EvaluationError(f"{protocol}: pair column(s) {missing} hold missing values; drop those rows first")
    return {c: pd.factorize(meta[c].astype(str))[0] for c in columns}


def _check_rules(rules: dict[str, list[str]], protocol: str) -> None:
    unknown = sorted(set(rules) - set(PAIR_OPTIONS))
    if unknown:
        raise EvaluationError(f"{protocol}: unknown pair option(s) {unknown}; options: {', '.join(PAIR_OPTIONS)}")
    for kind in ("pos", "neg"):
        if not rules[f"{kind}_sameby"] and not rules[f"{kind}_diffby"]:
            raise EvaluationError(f"{protocol}: give {kind}_sameby or {kind}_diffby (copairs needs one of them)")
        both = set(rules[f"{kind}_sameby"]) & set(rules[f"{kind}_diffby"])
        if both:
            raise EvaluationError(f"{protocol}: {kind}_sameby and {kind}_diffby share {sorted(both)}")


def _pair_mask(
    codes: dict[str, np.ndarray], n: int, rows: np.ndarray, sameby: list[str], diffby: list[str]
) -> np.ndarray:
    mask = np.ones((len(rows), n), dtype=bool)
    for column in sameby:
        mask &= codes[column][rows, None] == codes[column][None, :]
    for column in diffby:
        mask &= codes[column][rows, None] != codes[column][None, :]
    mask[np.arange(len(rows)), rows] = False  # a row is not its own partner
    return mask


def average_precision(
    meta: pd.DataFrame,
    values: np.ndarray,
    *,
    pos_sameby: Sequence[str],
    pos_diffby: Sequence[str] = (),
    neg_sameby: Sequence[str] = (),
    neg_diffby: Sequence[str] = (),
    protocol: str = "average_precision",
) -> pd.DataFrame:
    """copairs.map.average_precision's result (the meta columns plus average_precision,
    n_pos_pairs, n_total_pairs per row) computed from blocks of similarities; see the module
    docstring."""
    rules = {
        "pos_sameby": list(pos_sameby),
        "pos_diffby": list(pos_diffby),
        "neg_sameby": list(neg_sameby),
        "neg_diffby": list(neg_diffby),
    }
    _check_rules(rules, protocol)
    columns = sorted({c for group in rules.values() for c in group})
    require_columns(meta, columns, protocol)
    codes = _codes(meta, columns, protocol)
    n = len(meta)
    values = np.asarray(values, dtype=np.float64)
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    unit = values / np.where(norms > 0, norms, 1.0)
    zero = norms[:, 0] == 0
    ap = np.full(n, np.nan)
    n_pos = np.zeros(n, dtype=np.int64)
    n_total = np.zeros(n, dtype=np.int64)
    block = max(1, _BLOCK_VALUES // max(n, 1))
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        # copairs ranks by the float32 key 1 - similarity: similarities that key cannot tell
        # apart (|s| < 0.5 differing by less than its spacing, 6e-8) tie there, positives first
        key = np.float32(1) - (unit[rows] @ unit.T).astype(np.float32)
        # a zero row has no cosine: copairs' NaN similarities rank after every other partner
        key[zero[rows]] = np.inf
        key[:, zero] = np.inf
        positive = _pair_mask(codes, n, rows, rules["pos_sameby"], rules["pos_diffby"])
        negative = _pair_mask(codes, n, rows, rules["neg_sameby"], rules["neg_diffby"])
        for offset, row in enumerate(rows):
            pos = np.sort(key[offset, positive[offset]])
            neg = np.sort(key[offset, negative[offset]])
            n_pos[row], n_total[row] = len(pos), len(pos) + len(neg)
            if len(pos) == 0:
                continue
            # negatives strictly ahead of each positive (smaller key; equal keys rank after it)
            ahead = np.searchsorted(neg, pos, side="left")
            k = np.arange(1, len(pos) + 1)
            ap[row] = float(np.mean(k / (k + ahead)))
    normalized = np.full(n, np.nan)
    scored = n_pos > 0
    if scored.any():  # copairs' chance-corrected AP, (AP - E[AP]) / (1 - E[AP]) under random ranking
        normalized[scored] = normalize_ap(ap[scored], n_pos[scored], n_total[scored] - n_pos[scored])
    return meta.reset_index(drop=True).assign(
        average_precision=ap, normalized_average_precision=normalized, n_pos_pairs=n_pos, n_total_pairs=n_total
    )


def significance(ap: pd.DataFrame, group: str, *, null_size: int, threshold: float, seed: int) -> pd.DataFrame:
    """Per ``group`` value: mAP, copairs' permutation p-value and BH-corrected p-value (queries
    without positives left out, as copairs does); the null distributions are cached in a
    temporary folder, not in the home directory."""
    with tempfile.TemporaryDirectory(prefix="copairs-null-") as cache:
        return copairs_mean_average_precision(
            ap, [group], null_size=null_size, threshold=threshold, seed=seed, progress_bar=False, cache_dir=cache
        )


def _summary(
    protocol: str,
    ap: pd.DataFrame,
    group: str,
    rules: dict,
    settings: dict,
    dropped: dict[str, int],
) -> dict:
    scored = ap[ap["n_pos_pairs"] > 0]
    if scored.empty:
        raise EvaluationError(f"{protocol}: no query has a positive pair under {rules}")
    groups = significance(scored, group, **settings)
    per_group = {
        str(row[group]): {
            "n": int((scored[group] == row[group]).sum()),
            "mean_average_precision": float(row["mean_average_precision"]),
            "p_value": float(row["p_value"]),
            "q_value": float(row["corrected_p_value"]),
            "retrieved": bool(row["below_corrected_p"]),
        }
        for _, row in groups.iterrows()
    }
    return {
        "protocol": protocol,
        "n": len(scored),
        "mean_average_precision": float(groups["mean_average_precision"].mean()),
        "query_mean_average_precision": float(scored["average_precision"].mean()),
        "fraction_retrieved": float(groups["below_corrected_p"].mean()),
        "n_groups": len(groups),
        "n_without_positive": int((ap["n_pos_pairs"] == 0).sum()),
        "rows_dropped": dropped,
        "pairs": rules,
        **settings,
        "per_class": per_group,
        "average_precision": [None if np.isnan(v) else float(v) for v in ap["average_precision"]],
    }


def _settings(null_size: int, threshold: float, seed: int) -> dict:
    if not isinstance(null_size, int) or null_size < 1:
        raise EvaluationError(f"null_size must be a positive integer, got {null_size!r}")
    if not 0 < threshold < 1:
        raise EvaluationError(f"threshold must lie in (0, 1), got {threshold!r}")
    return {"null_size": null_size, "threshold": float(threshold), "seed": int(seed)}


def _usable(profiles: pd.DataFrame, required: dict[str, str]) -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows with a value in every required column; the dropped counts by reason."""
    keep = pd.Series(True, index=profiles.index)
    dropped = {}
    for column, reason in required.items():
        empty = profiles[column].isna() | (profiles[column].astype(str).str.strip() == "")
        dropped[reason] = int((keep & empty).sum())
        keep &= ~empty
    return profiles[keep].reset_index(drop=True), dropped


def mean_average_precision(
    profiles: pd.DataFrame,
    *,
    label_col: str = "Metadata_label",
    perturbation_col: str | None = None,
    control_mask: np.ndarray | None = None,
    pos_sameby: Sequence[str] | None = None,
    pos_diffby: Sequence[str] | None = None,
    neg_sameby: Sequence[str] | None = None,
    neg_diffby: Sequence[str] | None = None,
    null_size: int = SIGNIFICANCE_DEFAULTS["null_size"],
    threshold: float = SIGNIFICANCE_DEFAULTS["threshold"],
    seed: int = SIGNIFICANCE_DEFAULTS["seed"],
) -> dict:
    """``map``: label retrieval (JUMP's phenotypic consistency), by label.

    Defaults: positives share ``label_col`` and differ in ``perturbation_col`` (so replicates and
    other doses of the query's own perturbation are never hits; without a perturbation column,
    every other row of the label is a hit); negatives differ in the label. Control rows
    (``control_mask``) and rows without a label (or perturbation) are dropped and counted: a
    control's label is not a phenotype to retrieve. Returns per label mAP, p-value, q-value,
    queries; overall mean_average_precision (mean over labels, the figure the field reports),
    query_mean_average_precision, fraction_retrieved (labels with q < threshold).
    """
    protocol = "map"
    settings = _settings(null_size, threshold, seed)
    required = {label_col: "no label"} | ({perturbation_col: "no perturbation"} if perturbation_col else {})
    require_columns(profiles, list(required), protocol)
    rows = profiles
    dropped = {}
    if control_mask is not None:
        dropped["control"] = int(np.sum(control_mask))
        rows = profiles[~np.asarray(control_mask, dtype=bool)]
    rows, more = _usable(rows, required)
    dropped |= more
    rules = {
        "pos_sameby": list(pos_sameby) if pos_sameby is not None else [label_col],
        "pos_diffby": list(pos_diffby) if pos_diffby is not None else ([perturbation_col] if perturbation_col else []),
        "neg_sameby": list(neg_sameby) if neg_sameby is not None else [],
        "neg_diffby": list(neg_diffby) if neg_diffby is not None else [label_col],
    }
    if rows.empty:
        raise EvaluationError(f"{protocol}: no row with a label in {label_col!r}")
    ap = average_precision(rows[metadata_columns(rows)], feature_matrix(rows, protocol), **rules, protocol=protocol)
    return _summary(protocol, ap, label_col, rules, settings, dropped)


def replicate_map(
    profiles: pd.DataFrame,
    *,
    perturbation_col: str,
    control_mask: np.ndarray,
    pos_sameby: Sequence[str] | None = None,
    pos_diffby: Sequence[str] | None = None,
    neg_sameby: Sequence[str] | None = None,
    neg_diffby: Sequence[str] | None = None,
    null_size: int = SIGNIFICANCE_DEFAULTS["null_size"],
    threshold: float = SIGNIFICANCE_DEFAULTS["threshold"],
    seed: int = SIGNIFICANCE_DEFAULTS["seed"],
) -> dict:
    """``replicate_map``: replicate retrieval against controls (JUMP's phenotypic activity), by
    perturbation.

    Each treated row is a query; its positives are the other rows of its perturbation, its
    negatives the control rows (``control_mask``). As in JUMP's copairs recipe, every control row
    gets its own reference value (so controls are neither positives of each other nor
    queries) and treated rows share one: positives = same perturbation and same reference,
    negatives = different perturbation and different reference (pair options default to
    [perturbation, reference] accordingly; the reference column is ``Metadata__reference``).
    Returns per perturbation mAP, p-value, q-value; overall mean over perturbations and
    fraction_retrieved (perturbations with q < threshold: "phenotypically active").
    """
    protocol = "replicate_map"
    settings = _settings(null_size, threshold, seed)
    require_columns(profiles, [perturbation_col], protocol)
    control_mask = np.asarray(control_mask, dtype=bool)
    if not control_mask.any():
        raise EvaluationError(f"{protocol}: needs control rows (the negatives); none matched `controls`")
    reference = pd.Series(np.where(control_mask, np.arange(len(profiles)), -1), index=profiles.index, name=REFERENCE)
    rows = pd.concat([profiles, reference], axis=1)
    rows, dropped = _usable(rows, {perturbation_col: "no perturbation"})
    key = [perturbation_col, REFERENCE]
    rules = {
        "pos_sameby": list(pos_sameby) if pos_sameby is not None else key,
        "pos_diffby": list(pos_diffby) if pos_diffby is not None else [],
        "neg_sameby": list(neg_sameby) if neg_sameby is not None else [],
        "neg_diffby": list(neg_diffby) if neg_diffby is not None else key,
    }
    ap = average_precision(rows[metadata_columns(rows)], feature_matrix(rows, protocol), **rules, protocol=protocol)
    treated = ap[ap[REFERENCE] < 0]
    return _summary(protocol, treated, perturbation_col, rules, settings, dropped)
