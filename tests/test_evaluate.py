"""Evaluation protocols (cytopretrain.evaluation.protocols): hand-checked cases, independent computations
(scikit-learn, copairs), bad input (the Ljosa per-well profiles are in test_profiles)."""

from __future__ import annotations

import json
import warnings
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from cell_images import DATA
from sklearn.cluster import DBSCAN
from sklearn.decomposition import PCA, FastICA
from sklearn.metrics import f1_score
from sklearn.metrics.pairwise import cosine_distances
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
from sklearn.preprocessing import StandardScaler

from cytopretrain.core.errors import EvaluationError
from cytopretrain.evaluation import protocols as ev
from cytopretrain.evaluation.outliers import outlier_scores
from cytopretrain.evaluation.profile_tables import feature_columns, metadata_columns
from cytopretrain.evaluation.protocols.common import accuracy_result, vote
from cytopretrain.evaluation.protocols.retrieval import _best_threshold

torch.set_num_threads(2)
BBBC021 = DATA / "bbbc021"


def table(metadata: dict, features) -> pd.DataFrame:
    """Profile table: Metadata_ columns first, then features f0, f1, ..."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim == 1:
        features = features[:, None]
    meta = pd.DataFrame({f"Metadata_{k}": v for k, v in metadata.items()})
    return pd.concat([meta, pd.DataFrame(features, columns=[f"f{i}" for i in range(features.shape[1])])], axis=1)


def vote_by_hand(neighbour_labels) -> str:
    """Majority; a tie goes to the tied label met first in nearest-first order."""
    counts = Counter(neighbour_labels)
    best = max(counts.values())
    return next(label for label in neighbour_labels if counts[label] == best)


@pytest.fixture(scope="module")
def clustered():
    """300 rows, 4 labels, 12 features of different scales, splits train / test1 / test2."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    centres = rng.normal(size=(4, 12)) * 1.5
    values = (centres[labels] + rng.normal(size=(300, 12))) * np.geomspace(0.1, 30, 12)
    splits = rng.choice(["train", "train", "test1", "test2"], size=300)
    values[splits == "test2"] = values[splits == "test2"] * 1.3 + 2.0  # shifted test domain
    return table({"label": [f"L{label}" for label in labels], "split": splits}, values)


# --- helpers -------------------------------------------------------------------------------


def test_metadata_and_feature_columns():
    frame = table({"idx": [1, 2], "label": ["a", "b"]}, [[1.0, 2.0], [3.0, 4.0]])
    assert metadata_columns(frame) == ["Metadata_idx", "Metadata_label"]
    assert feature_columns(frame) == ["f0", "f1"]


def test_vote_rule():
    codes = np.array([[0, 1, 1, -1], [0, 1, 2, -1], [1, 0, 0, 1], [2, 0, 0, 2], [0, -1, -1, -1], [-1, -1, -1, -1]])
    # majority 1; three-way tie -> nearest (0); 2-2 tie -> label of position 0 (1);
    # 2-2 tie between 2 and 0 -> 2 comes first; a single neighbour; no neighbour at all.
    np.testing.assert_array_equal(vote(codes), [1, 0, 1, 2, 0, -1])


def test_result_fields_and_ci():
    result = accuracy_result("x", np.array(["a", "a", "b", "b"]), ["a", "b", "b", None])
    assert (result["n"], result["correct"], result["accuracy"]) == (4, 2, 0.5)
    assert result["ci95"] == pytest.approx(1.96 * np.sqrt(0.25 / 4))
    assert result["per_class"] == {
        "a": {"n": 2, "correct": 1, "accuracy": 0.5},
        "b": {"n": 2, "correct": 1, "accuracy": 0.5},
    }
    assert result["confusion"] == {"labels": ["a", "b", "<none>"], "matrix": [[1, 1, 0], [0, 1, 1], [0, 0, 0]]}


# --- knn_loo (CyCLOPS) ------------------------------------------------------------------------


def test_knn_loo_by_hand():
    # 1-D values: z-scoring is an increasing affine map, so neighbours are those of the values.
    values = [0.0, 0.9, 2.0, 10.0, 11.0, 12.5]
    labels = ["A", "A", "B", "B", "B", "A"]
    frame = table({"label": labels}, values)
    # k=2: 0.0 -> 0.9(A), 2.0(B): tie -> nearest A (right). 0.9 -> 0.0(A) 0.9 away, 2.0(B)
    # 1.1 away -> A (right). 2.0 -> 0.9(A), 0.0(A) -> A (wrong). 10 -> 11(B), 12.5(A) -> B
    # (right). 11 -> 10(B), 12.5(A) -> B (right). 12.5 -> 11(B), 10(B) -> B (wrong).
    result = ev.knn_loo(frame, k=2)
    assert (result["correct"], result["n"]) == (4, 6)
    assert result["per_class"]["A"] == {"n": 3, "correct": 2, "accuracy": 2 / 3}
    assert result["confusion"]["labels"] == ["A", "B"]
    assert result["confusion"]["matrix"] == [[2, 1], [1, 2]]
    # k=3: 0.0 -> A,B,B: B. 0.9 -> A,B,B: B. 2.0 -> A,A,B: A. 10 -> B,A,B: B. 11 -> B,A,B: B.
    # 12.5 -> B,B,B: B. Right: 10 and 11 only.
    assert ev.knn_loo(frame, k=3)["correct"] == 2


def test_knn_loo_matches_sklearn(clustered):
    result = ev.knn_loo(clustered, k=11)
    labels = clustered["Metadata_label"].to_numpy()
    z = StandardScaler().fit_transform(clustered[feature_columns(clustered)].to_numpy())
    _, neighbours = NearestNeighbors(n_neighbors=11).fit(z).kneighbors()  # leaves each row out
    expected = [vote_by_hand(list(labels[row])) for row in neighbours]
    assert result["correct"] == sum(e == t for e, t in zip(expected, labels))
    # Where the vote has a strict winner, KNeighborsClassifier agrees (its tie rule differs).
    strict = [Counter(labels[row]).most_common(2) for row in neighbours]
    strict = np.array([len(c) == 1 or c[0][1] > c[1][1] for c in strict])
    classifier_predictions = []
    for i in np.flatnonzero(strict)[:40]:
        keep = np.arange(len(labels)) != i
        model = KNeighborsClassifier(n_neighbors=11).fit(z[keep], labels[keep])
        classifier_predictions.append(model.predict(z[i : i + 1])[0] == expected[i])
    assert all(classifier_predictions)


# --- knn_holdout (COOS-7) -----------------------------------------------------------------


def test_knn_holdout_by_hand():
    # Training features are +-1 in both columns: mean 0, population std 1, so z = raw values.
    frame = table(
        {
            "label": ["A", "B", "A", "B", "A", "A", "B"],
            "split": ["train", "train", "train", "train", "test1", "test1", "test2"],
        },
        [[-1, -1], [1, 1], [-1, 1], [1, -1], [-0.9, -0.8], [0.8, 0.9], [0.9, -0.9]],
    )
    # k=3. (-0.9,-0.8): (-1,-1) A 0.05, (-1,1) A 3.25, (1,-1) B 3.65 -> A, right.
    # (0.8,0.9): (1,1) B 0.05, (-1,1) A 3.25, (1,-1) B 3.65 -> B, wrong (truth A).
    # (0.9,-0.9): (1,-1) B 0.02, then a tie at 3.62 between (-1,-1) A (row 0) and (1,1) B
    # (row 1): row 0 first -> B, A, B -> B, right.
    result = ev.knn_holdout(frame, k=3)
    assert (result["correct"], result["n"], result["n_train"]) == (2, 3, 4)
    assert result["splits"]["test1"]["correct"] == 1 and result["splits"]["test1"]["n"] == 2
    assert result["splits"]["test2"]["correct"] == 1 and result["splits"]["test2"]["n"] == 1
    assert result["confusion"]["matrix"] == [[1, 1], [0, 1]]
    json.dumps(result)  # results go into reports as JSON


def test_knn_holdout_matches_sklearn(clustered):
    result = ev.knn_holdout(clustered, k=11)
    features = clustered[feature_columns(clustered)].to_numpy()
    labels, splits = clustered["Metadata_label"].to_numpy(), clustered["Metadata_split"].to_numpy()
    train = splits == "train"
    scaler = StandardScaler().fit(features[train])  # fit on train only
    model = NearestNeighbors(n_neighbors=11).fit(scaler.transform(features[train]))
    for split in ("test1", "test2"):
        rows = splits == split
        _, neighbours = model.kneighbors(scaler.transform(features[rows]))
        expected = [vote_by_hand(list(labels[train][row])) for row in neighbours]
        assert result["splits"][split]["correct"] == sum(e == t for e, t in zip(expected, labels[rows]))
        assert result["splits"][split]["n"] == rows.sum()
    assert result["n"] == (~train).sum()
    # A scaler fit on all rows would see the shifted test2 domain and change neighbours.
    everything = StandardScaler().fit(features)
    _, wrong = (
        NearestNeighbors(n_neighbors=11)
        .fit(everything.transform(features[train]))
        .kneighbors(everything.transform(features[splits == "test2"]))
    )
    _, right = model.kneighbors(scaler.transform(features[splits == "test2"]))
    assert not np.array_equal(wrong, right)


# --- BBBC021 NSC / NSCB ---------------------------------------------------------------------


def moa_table(batches: list[str]) -> pd.DataFrame:
    """Six treatments with hand-checkable cosines, a DMSO row and a row without MOA.

    Treatment features (3,1) (1,3) (-1,-3) (-3,-1) (2,-2) (-2,2): both columns have mean 0 and
    the same std, so z-scoring scales both equally and leaves cosines unchanged. Cosines:
    T0.T1 = T2.T3 = 0.6, T0.T2 = T1.T3 = -0.6, T0.T3 = T1.T2 = -1, T4.T5 = -1,
    T4.T0 = T4.T2 = T5.T1 = T5.T3 = 0.447 (= 4/sqrt(80)), T4.T1 = T4.T3 = T5.T0 = T5.T2 = -0.447.
    The DMSO row (50, 50) would shift the scaler if it were not dropped first.
    """
    return table(
        {
            "compound": ["P", "Q", "R", "S", "U", "V", "DMSO", "Z"],
            "concentration": [1.0] * 8,
            "moa": ["M1", "M1", "M2", "M2", "M3", "M3", "DMSO", None],
            "batch": batches + ["W1", "W1"],
        },
        [[3, 1], [1, 3], [-1, -3], [-3, -1], [2, -2], [-2, 2], [50, 50], [7, 7]],
    )


def test_nsc_by_hand():
    result = ev.nsc(moa_table(["W1"] * 6))
    # T0..T3 find their partner (cosine 0.6): right. T4 ties between T0 and T2 (0.447):
    # T0 comes first -> M1, wrong. T5 ties between T1 and T3 -> T1 -> M1, wrong.
    assert (result["correct"], result["n"]) == (4, 6)
    predicted = [t["predicted"] for t in result["treatments"]]
    assert predicted == ["M1", "M1", "M2", "M2", "M1", "M1"]
    assert result["treatments"][4]["neighbour_compound"] == "P"
    assert result["treatments"][0]["distance"] == pytest.approx(1 - 0.6)
    assert (result["n_rows_control"], result["n_rows_unlabelled"], result["n_rows_used"]) == (1, 1, 6)
    # Each treatment has 5 eligible neighbours, one of them with its MOA.
    assert result["chance_accuracy"] == pytest.approx(0.2)
    assert json.loads(json.dumps(result))["per_class"] == result["per_class"]


def test_nsc_excludes_same_compound():
    frame = moa_table(["W1"] * 6)
    frame.loc[1, "Metadata_compound"] = "P"  # T1 (P at another concentration) now shares T0's compound
    frame.loc[1, "Metadata_concentration"] = 3.0
    result = ev.nsc(frame)
    by_compound = {(t["compound"], t["concentration"]): t for t in result["treatments"]}
    # T0 = (P, 1): T1 excluded; best of T2 -0.6, T3 -1, T4 0.447, T5 -0.447 -> T4 (M3), wrong.
    assert by_compound[("P", 1.0)]["predicted"] == "M3"
    # T1 = (P, 3): T0 excluded; T5 0.447 best -> M3, wrong.
    assert by_compound[("P", 3.0)]["predicted"] == "M3"


def test_nscb_by_hand():
    result = ev.nscb(moa_table(["W1", "W2", "W2", "W1", "W1", "W2"]))
    # Every MOA spans W1 and W2: nothing dropped. Eligible = other batch. T0 (W1) -> T1 0.6;
    # T1 -> T0; T2 (W2) -> T3; T3 -> T2: right. T4 (W1): T0 is same batch, T2 (0.447) -> M2,
    # wrong. T5 (W2): T1 same batch, T3 (0.447) -> M2, wrong.
    assert (result["correct"], result["n"], result["dropped_moas"]) == (4, 6, [])
    assert [t["predicted"] for t in result["treatments"]] == ["M1", "M1", "M2", "M2", "M2", "M2"]
    # Three eligible neighbours each, one with the same MOA.
    assert result["chance_accuracy"] == pytest.approx(1 / 3)


def test_nscb_drops_moas_of_one_batch():
    result = ev.nscb(moa_table(["W1", "W2", "W2", "W1", "W1", "W1"]))
    # M3 (T4, T5) only in W1: dropped. T0..T3 still find their cross-batch partner.
    assert result["dropped_moas"] == ["M3"]
    assert (result["correct"], result["n"]) == (4, 4)


def test_treatment_in_every_batch_has_no_neighbour():
    frame = moa_table(["W1", "W2", "W2", "W1", "W1", "W2"])
    extra = frame.iloc[[0]].assign(Metadata_batch="W2")  # a second image of T0, in W2
    result = ev.nscb(pd.concat([frame, extra], ignore_index=True))
    first = result["treatments"][0]
    assert first["predicted"] is None and result["n_without_neighbour"] == 1
    assert result["confusion"]["labels"][-1] == "<none>"


@pytest.mark.parametrize("aggregate", ["mean", "median"])
def test_nsc_image_level_matches_independent_computation(aggregate):
    rng = np.random.default_rng(4)
    rows = []
    for c in range(10):
        moa = f"M{c % 3}"
        for concentration in (0.1, 1.0):
            for _ in range(3):
                rows.append((f"C{c}", concentration, moa))
    meta = pd.DataFrame(rows, columns=["compound", "concentration", "moa"])
    centres = rng.normal(size=(3, 8))
    values = centres[meta["moa"].str[1].astype(int)] + rng.normal(size=(len(meta), 8)) * 1.2
    values = values * np.geomspace(1, 50, 8) + 10
    frame = table(meta.to_dict("list"), values)
    result = ev.nsc(frame, aggregate=aggregate)
    z = pd.DataFrame(StandardScaler().fit_transform(values))
    grouped = z.groupby([meta["compound"], meta["concentration"]])
    profiles = grouped.mean() if aggregate == "mean" else grouped.median()
    compounds = profiles.index.get_level_values(0).to_numpy()
    moas = meta.groupby(["compound", "concentration"])["moa"].first().loc[profiles.index].to_numpy()
    distance = cosine_distances(profiles.to_numpy())
    distance[compounds[:, None] == compounds[None, :]] = np.inf
    expected = moas[distance.argmin(axis=1)]
    assert result["n"] == 20
    assert [t["predicted"] for t in result["treatments"]] == list(expected)
    assert result["correct"] == int((expected == moas).sum())


# --- mean average precision --------------------------------------------------------------


def test_map_by_hand():
    # Unit vectors at angles 0 (A), 10 (B), 25 (A), 90 (B) degrees, and C at 200 degrees,
    # which ranks last for everyone and has no positive (no other C).
    angles = np.radians([0, 10, 25, 90, 200])
    frame = table({"label": ["A", "B", "A", "B", "C"]}, np.c_[np.cos(angles), np.sin(angles)])
    result = ev.mean_average_precision(frame, null_size=200)
    # 0: ranks 10, 25(A), 90 -> hit at 2: 1/2. 10: 0, 25, 90(B) -> 1/3. 25: 10, 0(A) -> 1/2.
    # 90: 25, 10(B) -> 1/2.
    np.testing.assert_allclose(result["average_precision"][:4], [0.5, 1 / 3, 0.5, 0.5])
    assert result["average_precision"][4] is None and result["n_without_positive"] == 1
    assert result["query_mean_average_precision"] == pytest.approx((1.5 + 1 / 3) / 4)
    assert result["per_class"]["B"]["mean_average_precision"] == pytest.approx(5 / 12)
    assert result["per_class"]["B"]["n"] == 2 and "C" not in result["per_class"]
    assert result["mean_average_precision"] == pytest.approx((0.5 + 5 / 12) / 2)  # mean over labels


def test_map_of_a_benchmark_excludes_its_perturbation_and_controls():
    """The image benchmarks run the same protocol: with `perturbation: compound` the other
    images of the query's compound are not hits, and `controls` rows are left out."""
    from cytopretrain.evaluation.evaluate import run_protocols

    rng = np.random.default_rng(9)
    compounds = np.repeat([f"c{i}" for i in range(8)] + ["dmso"], 6)
    moas = [f"m{int(c[1]) % 3}" if c != "dmso" else "dmso" for c in compounds]
    centres = {c: rng.normal(size=10) for c in np.unique(compounds)}
    values = np.stack([centres[c] + 0.5 * rng.normal(size=10) for c in compounds])
    frame = table({"phenotype": moas, "compound": compounds}, values)
    loose = run_protocols(frame, {"protocols": ["map"], "map": {"null_size": 200}})["map"]
    strict = run_protocols(
        frame,
        {"protocols": ["map"], "perturbation": "compound", "controls": {"compound": "dmso"}, "map": {"null_size": 200}},
    )["map"]
    assert strict["rows_dropped"]["control"] == 6 and "dmso" not in strict["per_class"]
    assert strict["pairs"]["pos_diffby"] == ["Metadata_compound"] and loose["pairs"]["pos_diffby"] == []
    # Each compound's own images are its nearest neighbours: counted as hits they inflate mAP.
    assert loose["mean_average_precision"] > strict["mean_average_precision"] + 0.2


# --- multi-label linear probe --------------------------------------------------------------


def multilabel_table(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
    """Label X iff feature 0 > 0, Y iff feature 1 > 0, well apart (|value| >= 3)."""
    signs = rng.integers(0, 2, size=(n, 2))
    values = np.where(signs == 1, 1, -1) * rng.uniform(3, 5, size=(n, 2))
    values = np.c_[values, rng.normal(size=(n, 3))]
    labels = ["|".join(name for name, s in zip("XY", row) if s) for row in signs]
    return values, labels


def test_multilabel_f1_by_hand():
    rng = np.random.default_rng(1)
    values, labels = multilabel_table(rng, 60)
    test_values = np.array([[4.0, 4.0, 0, 0, 0], [4.0, -4.0, 0, 0, 0], [-4.0, 4.0, 0, 0, 0], [4.0, -4.0, 0, 0, 0]])
    # Truth of the test rows: X|Y, X, Y, and "" for the last although it looks like X.
    frame = table(
        {"labels": labels + ["X|Y", "X", "Y", ""], "split": ["train"] * 60 + ["test"] * 4}, np.r_[values, test_values]
    )
    result = ev.multilabel_f1(frame, split_col="Metadata_split")
    # The probe answers X, X, Y... as the features say: X predicted on rows 1, 2, 4 of which
    # 1, 2 are true: precision 2/3, recall 1, F1 0.8. Y predicted on rows 1, 3, both true: F1 1.
    assert result["per_class"]["X"] == pytest.approx({"n_positive": 2, "precision": 2 / 3, "recall": 1.0, "f1": 0.8})
    assert result["per_class"]["Y"]["f1"] == 1.0
    assert result["macro_f1"] == pytest.approx(0.9)
    assert (result["n"], result["n_train"]) == (4, 60)


def test_multilabel_f1_matches_sklearn_and_split_is_stratified():
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    rng = np.random.default_rng(2)
    values, labels = multilabel_table(rng, 200)
    values[:, 2:] += rng.normal(size=(200, 3)) * 3
    labels = [label + ("|R" if i % 10 == 0 else "") for i, label in enumerate(labels)]  # rare label R
    labels[5] = labels[5] + "|Once"  # a label seen once: stays in train
    frame = table({"labels": labels}, values)
    result = ev.multilabel_f1(frame, test_fraction=0.25, seed=3)
    assert result == ev.multilabel_f1(frame, test_fraction=0.25, seed=3)  # seeded
    assert result["labels_not_in_test"] == ["Once"]
    assert result["per_class"]["R"]["n_positive"] == 5  # 20 rows with R, a quarter in test
    assert 45 <= result["n"] <= 55
    # On a split given explicitly, the probe equals one built with scikit-learn directly.
    split = np.where(rng.random(200) < 0.3, "test", "train")
    frame_split = table({"labels": labels, "split": split}, values)
    given = ev.multilabel_f1(frame_split, split_col="Metadata_split")
    names = ["Once", "R", "X", "Y"]
    targets = np.array([[n in label.split("|") for n in names] for label in labels], dtype=int)
    train, test = split == "train", split == "test"
    scaler = StandardScaler().fit(values[train])
    with warnings.catch_warnings():  # the constant label "Once" warns
        warnings.simplefilter("ignore")
        probe = OneVsRestClassifier(LogisticRegression(max_iter=2000)).fit(
            scaler.transform(values[train]), targets[train]
        )
    predicted = probe.predict(scaler.transform(values[test]))
    evaluated = targets[test].sum(axis=0) > 0
    expected = f1_score(targets[test][:, evaluated], predicted[:, evaluated], average="macro", zero_division=0)
    assert given["macro_f1"] == pytest.approx(expected)


# --- pair threshold and retrieval ----------------------------------------------------------


def test_pair_threshold_by_hand():
    # A rows lie on the x axis, B rows on the y axis: same-class cosine 1, different 0.
    # The best threshold is the midpoint 0.5; every test pair is answered right. Euclidean
    # neighbours: rows of a class are at most 5 apart, classes at least 14 apart.
    offsets = np.arange(6) + 10.0
    values = np.r_[np.c_[offsets, np.zeros(6)], np.c_[np.zeros(6), offsets]]
    frame = table({"label": ["A"] * 6 + ["B"] * 6}, values)
    result = ev.pair_threshold(frame, n_pairs=200, retrieval_k=5)
    assert result["threshold"] == pytest.approx(0.5)
    assert (result["accuracy"], result["validation_accuracy"], result["n"]) == (1.0, 1.0, 200)
    assert result["per_class"]["same"]["n"] == 100
    assert result["retrieval_precision"] == 1.0


def test_best_threshold_matches_exhaustive_search():
    rng = np.random.default_rng(6)
    same = rng.random(300) < 0.5
    similarity = np.round(rng.normal(size=300) * 0.2 + np.where(same, 0.6, 0.3), 2)  # with ties
    threshold, accuracy = _best_threshold(similarity, same)
    candidates = np.unique(np.r_[similarity, similarity + 0.005, -9.0])
    accuracies = [((similarity >= t) == same).mean() for t in candidates]
    assert accuracy == pytest.approx(max(accuracies))
    assert ((similarity >= threshold) == same).mean() == pytest.approx(accuracy)


def test_pair_threshold_retrieval_matches_sklearn(clustered):
    result = ev.pair_threshold(clustered, seed=5, n_pairs=400)
    values = clustered[feature_columns(clustered)].to_numpy()
    labels = clustered["Metadata_label"].to_numpy()
    _, neighbours = NearestNeighbors(n_neighbors=10).fit(values).kneighbors()
    assert result["retrieval_precision"] == pytest.approx((labels[neighbours] == labels[:, None]).mean())
    assert result["n"] == 400 and 0.5 < result["accuracy"] <= 1.0
    assert result == ev.pair_threshold(clustered, seed=5, n_pairs=400)


# --- nn agreement and embeddings -----------------------------------------------------------


def test_nn_agreement_by_hand():
    frame = table({"label": ["A", "A", "B", "A", "B"]}, [0.0, 1.0, 5.0, 5.5, 9.0])
    # 0 -> 1 (A, agrees), 1 -> 0 (agrees), 5 -> 5.5 (A, no), 5.5 -> 5 (B, no), 9 -> 5.5 (no).
    result = ev.nn_agreement(frame, space="features")
    assert (result["correct"], result["n"]) == (2, 5)


@pytest.mark.parametrize("method", ["fastica", "pca"])
def test_embedding_and_agreement_match_sklearn(clustered, method):
    values = clustered[feature_columns(clustered)].to_numpy()
    coordinates = ev.embedding_2d(clustered, method=method, seed=3)
    if method == "fastica":
        expected = FastICA(
            2, fun="cube", max_iter=3000, tol=1e-5, whiten="unit-variance", random_state=3
        ).fit_transform(values)
    else:
        expected = PCA(2, svd_solver="full").fit_transform(values)
    np.testing.assert_allclose(coordinates, expected, rtol=1e-6, atol=1e-9)
    labels = clustered["Metadata_label"].to_numpy()
    _, neighbour = NearestNeighbors(n_neighbors=1).fit(expected).kneighbors()
    result = ev.nn_agreement(clustered, space=method, seed=3)
    assert result["correct"] == int((labels[neighbour[:, 0]] == labels).sum())


# --- outliers ------------------------------------------------------------------------------


def test_outlier_scores_by_hand():
    values = np.r_[np.arange(10.0), 100.0]
    frame = table({"idx": [f"t{i}" for i in range(11)]}, values)
    result = outlier_scores(frame, k=2, min_samples=3)
    sigma = values.std()
    # Distances to the 2nd nearest other row: 2 at both ends of 0..9, 1 inside, 92 for 100.
    # The knee of the sorted curve (eight 1s, two 2s, 92) is the last 2: eps = 2 / sigma.
    assert result.attrs["eps"] == pytest.approx(2 / sigma) and result.attrs["eps_source"] == "knee"
    # Row 100: nearest two at 91 and 92 -> score 91.5 / sigma, rank 1, the only noise point.
    assert result["score"].iloc[10] == pytest.approx(91.5 / sigma)
    assert result["rank"].iloc[10] == 1
    assert result["is_outlier"].tolist() == [False] * 10 + [True]
    assert result["Metadata_idx"].tolist() == frame["Metadata_idx"].tolist()
    # Next come 0 and 9 (mean of 1 and 2; equal on paper, not bit for bit after scaling).
    assert {result["rank"].iloc[0], result["rank"].iloc[9]} == {2, 3}


def test_outlier_scores_match_sklearn():
    rng = np.random.default_rng(8)
    latents = np.r_[rng.normal(size=(200, 6)), rng.normal(size=(5, 6)) * 8]
    result = outlier_scores(latents, k=5, eps=1.5, min_samples=5)
    z = StandardScaler().fit_transform(latents)
    distances, _ = NearestNeighbors(n_neighbors=5).fit(z).kneighbors()
    np.testing.assert_allclose(result["score"], distances.mean(axis=1), rtol=1e-5)
    np.testing.assert_array_equal(result["dbscan_label"], DBSCAN(eps=1.5, min_samples=5).fit_predict(z))
    assert set(result.nsmallest(5, "rank").index) == set(range(200, 205))


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda f: ev.knn_loo(f, label_col="Metadata_missing"), "Metadata_missing"),
        (lambda f: ev.knn_holdout(f, split_col="Metadata_fold"), "Metadata_fold"),
        (lambda f: ev.nsc(f), "Metadata_moa"),
        (
            lambda f: ev.nscb(f.assign(Metadata_moa="m", Metadata_compound="c", Metadata_concentration=1.0)),
            "Metadata_batch",
        ),
        (lambda f: ev.mean_average_precision(f, label_col="Metadata_x"), "Metadata_x"),
        (lambda f: ev.multilabel_f1(f), "Metadata_labels"),
        (lambda f: ev.pair_threshold(f, label_col="Metadata_y"), "Metadata_y"),
        (lambda f: ev.nn_agreement(f, label_col="Metadata_z"), "Metadata_z"),
        (lambda f: ev.knn_loo(f.assign(f1=["a"] * len(f))), "non-numeric.*f1"),
        (lambda f: ev.knn_loo(f.assign(f0=np.nan)), "NaN.*f0"),
        (lambda f: ev.knn_loo(f.assign(Metadata_label=None)), "without a value in 'Metadata_label'"),
        (lambda f: ev.knn_holdout(f.assign(Metadata_split="test")), "'train'"),
        (lambda f: ev.nn_agreement(f, space="umap"), "space"),
        (lambda f: ev.embedding_2d(f, method="tsne"), "method"),
        (lambda f: outlier_scores(f.iloc[:3]), "rows"),
        (lambda f: ev.knn_loo(f[["Metadata_label"]]), "no feature columns"),
    ],
)
def test_bad_input(call, message):
    frame = table(
        {"label": ["a", "b", "a", "b"], "split": ["train", "train", "x", "y"]},
        [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [2.0, 1.0]],
    )
    with pytest.raises(EvaluationError, match=message):
        call(frame)
