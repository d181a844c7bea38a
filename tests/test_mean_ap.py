"""Mean average precision (evaluation.protocols.mean_ap) against copairs, the field's reference:
per-query AP, pair counts and normalized AP to 1e-9 for every pair option on generated tables
(exact ties and all-zero rows included), identical p-values for the same seed and null size,
JUMP's replicate-retrieval recipe, and a hand-checked case."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from copairs.map import average_precision as copairs_average_precision
from copairs.map import mean_average_precision as copairs_mean_average_precision

from cytopretrain.core.errors import EvaluationError
from cytopretrain.evaluation.protocols.mean_ap import (
    REFERENCE,
    average_precision,
    mean_average_precision,
    replicate_map,
    significance,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered in divide:RuntimeWarning"
)  # copairs, zero rows

RULES = [
    # label retrieval as JUMP reports it: same label, another compound
    {
        "pos_sameby": ["Metadata_label"],
        "pos_diffby": ["Metadata_compound"],
        "neg_sameby": [],
        "neg_diffby": ["Metadata_label"],
    },
    # label retrieval within a plate
    {
        "pos_sameby": ["Metadata_label"],
        "pos_diffby": [],
        "neg_sameby": ["Metadata_plate"],
        "neg_diffby": ["Metadata_label"],
    },
    # several columns on each side
    {
        "pos_sameby": ["Metadata_label", "Metadata_plate"],
        "pos_diffby": ["Metadata_compound", "Metadata_well"],
        "neg_sameby": ["Metadata_plate"],
        "neg_diffby": ["Metadata_label"],
    },
    # overlapping rules: a pair can be positive and negative at once
    {"pos_sameby": ["Metadata_plate"], "pos_diffby": [], "neg_sameby": [], "neg_diffby": ["Metadata_label"]},
]


def generated_table(n: int = 240, seed: int = 3) -> tuple[pd.DataFrame, np.ndarray]:
    """Labels with a signal, compounds nested in labels, plates, wells; exact duplicate rows
    (ties) and two all-zero rows."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, n)
    meta = pd.DataFrame(
        {
            "Metadata_label": [f"moa{label}" for label in labels],
            "Metadata_compound": [f"c{label}_{k}" for label, k in zip(labels, rng.integers(0, 4, n))],
            "Metadata_plate": rng.integers(0, 3, n).astype(str),
            "Metadata_well": rng.integers(0, 30, n).astype(str),
        }
    )
    centres = rng.normal(size=(6, 24))
    values = (0.6 * centres[labels] + rng.normal(size=(n, 24))).astype(np.float32)
    values[10:15] = values[40:45]  # exact ties
    values[[7, 99]] = 0.0  # cosine undefined
    meta.loc[:2, ["Metadata_label", "Metadata_compound"]] = ["solo", "solo_c"]  # no other compound
    return meta, values


@pytest.mark.parametrize("rules", RULES, ids=["jump-consistency", "neg-sameby", "multi-column", "overlapping"])
def test_average_precision_equals_copairs_for_every_pair_option(rules):
    meta, values = generated_table()
    expected = copairs_average_precision(meta, values, **rules, progress_bar=False)
    got = average_precision(meta, values, **rules)
    for column in ("n_pos_pairs", "n_total_pairs"):
        np.testing.assert_array_equal(got[column].to_numpy(), expected[column].to_numpy())
    for column in ("average_precision", "normalized_average_precision"):
        a, b = got[column].to_numpy(dtype=float), expected[column].to_numpy(dtype=float)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=0, atol=1e-9)
    if rules is RULES[0]:
        assert (got["n_pos_pairs"].iloc[:3] == 0).all()  # the lone compound's queries have no positive


def test_pvalues_equal_copairs_for_the_same_seed_and_null_size():
    meta, values = generated_table()
    rules = RULES[0]
    ours = average_precision(meta, values, **rules)
    theirs = copairs_average_precision(meta, values, **rules, progress_bar=False)
    got = significance(ours, "Metadata_label", null_size=2000, threshold=0.05, seed=11)
    expected = copairs_mean_average_precision(
        theirs, ["Metadata_label"], null_size=2000, threshold=0.05, seed=11, progress_bar=False
    )
    for column in ("mean_average_precision", "p_value", "corrected_p_value"):
        np.testing.assert_allclose(got[column].to_numpy(), expected[column].to_numpy(), rtol=0, atol=1e-9)
    assert got["below_corrected_p"].tolist() == expected["below_corrected_p"].tolist()


def test_map_protocol_never_counts_the_querys_own_perturbation():
    """Two doses of each compound share a label: without a perturbation column they are hits of
    each other; with it, only other compounds of the label are (as copairs with pos_diffby)."""
    meta, values = generated_table()
    profiles = pd.concat([meta, pd.DataFrame(values, columns=[f"f{i}" for i in range(values.shape[1])])], axis=1)
    inflated = mean_average_precision(profiles, label_col="Metadata_label", null_size=500)
    strict = mean_average_precision(
        profiles, label_col="Metadata_label", perturbation_col="Metadata_compound", null_size=500
    )
    expected = copairs_average_precision(meta, values, **RULES[0], progress_bar=False)["average_precision"]
    np.testing.assert_allclose(
        np.array(strict["average_precision"], dtype=float), expected.to_numpy(dtype=float), atol=1e-9
    )
    assert strict["pairs"] == RULES[0]
    assert inflated["query_mean_average_precision"] > strict["query_mean_average_precision"]
    # "solo" has one compound: its queries have no positive, so it gets no mAP
    assert set(strict["per_class"]) == set(meta["Metadata_label"]) - {"solo"} and strict["n_without_positive"] == 3
    labels = strict["per_class"].values()
    assert strict["fraction_retrieved"] == np.mean([c["retrieved"] for c in labels])
    assert strict["mean_average_precision"] == pytest.approx(np.mean([c["mean_average_precision"] for c in labels]))
    assert all(c["retrieved"] == (c["q_value"] < 0.05) for c in labels)


def test_replicate_map_follows_jumps_copairs_recipe():
    """Replicates of a compound are the positives and control rows the negatives: the reference
    column gives each control its own value, as in JUMP's notebooks."""
    rng = np.random.default_rng(5)
    compounds = np.repeat([f"c{i}" for i in range(12)], 4)
    controls = np.array(["DMSO"] * 16)
    names = np.concatenate([compounds, controls])
    effect = {f"c{i}": rng.normal(size=16) * (0.2 + 0.15 * i) for i in range(12)}
    values = np.stack([effect.get(name, np.zeros(16)) + rng.normal(size=16) for name in names])
    profiles = pd.DataFrame({"Metadata_compound": names})
    profiles = pd.concat([profiles, pd.DataFrame(values, columns=[f"f{i}" for i in range(16)])], axis=1)
    is_control = names == "DMSO"
    result = replicate_map(profiles, perturbation_col="Metadata_compound", control_mask=is_control, null_size=1000)

    meta = profiles[["Metadata_compound"]].assign(**{REFERENCE: np.where(is_control, np.arange(len(names)), -1)})
    key = ["Metadata_compound", REFERENCE]
    ap = copairs_average_precision(
        meta, values, pos_sameby=key, pos_diffby=[], neg_sameby=[], neg_diffby=key, progress_bar=False
    )
    ap = ap[ap[REFERENCE] < 0]
    expected = copairs_mean_average_precision(
        ap, ["Metadata_compound"], null_size=1000, threshold=0.05, seed=0, progress_bar=False
    )
    assert set(result["per_class"]) == set(compounds) and result["n"] == len(compounds)
    for row in expected.itertuples():
        mine = result["per_class"][row.Metadata_compound]
        assert mine["mean_average_precision"] == pytest.approx(row.mean_average_precision, abs=1e-9)
        assert (mine["p_value"], mine["q_value"]) == pytest.approx((row.p_value, row.corrected_p_value), abs=1e-12)
    # the strongest effects are retrieved, the weakest not
    assert result["per_class"]["c11"]["retrieved"] and not result["per_class"]["c0"]["retrieved"]
    with pytest.raises(EvaluationError, match="replicate_map: needs control rows"):
        replicate_map(profiles, perturbation_col="Metadata_compound", control_mask=np.zeros(len(names), bool))


def test_average_precision_by_hand():
    """Query q0 (label a): partners by similarity q1 (a) 1.0, q3 (b) 0.8, q2 (a) 0.5, q4 (b) 0.5
    -> positives at ranks 1 and 3 (the tie at 0.5 puts the positive first): AP = (1/1 + 2/3) / 2."""
    angles = np.deg2rad([0, 0, 60, np.degrees(np.arccos(0.8)), 60])
    values = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    values[4, 1] *= -1  # q4 at -60 degrees: cosine 0.5 with q0 as well
    meta = pd.DataFrame({"Metadata_label": ["a", "a", "a", "b", "b"]})
    got = average_precision(meta, values, pos_sameby=["Metadata_label"], neg_diffby=["Metadata_label"])
    assert got.loc[0, "average_precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert (got.loc[0, "n_pos_pairs"], got.loc[0, "n_total_pairs"]) == (2, 4)


def test_bad_pair_options_and_tables_are_refused():
    meta, values = generated_table(120)
    with pytest.raises(EvaluationError, match="give neg_sameby or neg_diffby"):
        average_precision(meta, values, pos_sameby=["Metadata_label"])
    with pytest.raises(EvaluationError, match="pos_sameby and pos_diffby share"):
        average_precision(
            meta, values, pos_sameby=["Metadata_label"], pos_diffby=["Metadata_label"], neg_diffby=["Metadata_label"]
        )
    with pytest.raises(EvaluationError, match=r"not in the profile table"):
        average_precision(meta, values, pos_sameby=["Metadata_moa"], neg_diffby=["Metadata_label"])
    missing = meta.assign(Metadata_plate=meta["Metadata_plate"].where(meta.index > 0))
    with pytest.raises(EvaluationError, match=r"\['Metadata_plate'\] hold missing values"):
        average_precision(missing, values, pos_sameby=["Metadata_plate"], neg_diffby=["Metadata_label"])
    profiles = pd.concat([meta.assign(Metadata_label=[f"only{i}" for i in range(120)]), pd.DataFrame(values)], axis=1)
    profiles.columns = [str(c) for c in profiles.columns]
    with pytest.raises(EvaluationError, match="map: no query has a positive pair"):
        mean_average_precision(profiles, label_col="Metadata_label")
