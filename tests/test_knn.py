"""Exact kNN (cytopretrain.evaluation.knn) against scikit-learn and a float64 numpy brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from cytopretrain.core.errors import KnnError
from cytopretrain.evaluation.knn import (
    _bound_holds,
    _prepare,
    _Search,
    _smallest_per_row,
    knn,
    knn_search,
    resolve_precision,
)

torch.set_num_threads(2)
PRECISIONS = ["fp32", "bf16"]
SMALL_BLOCKS = {"block_size": 64, "reference_block_size": 96}


def brute_force(queries, reference, k, metric="euclidean", excluded=None):
    """Float64 distances by direct differences, sorted by (distance, index); -1/inf padding."""
    q, r = np.asarray(queries, np.float64), np.asarray(reference, np.float64)
    if metric == "cosine":
        qn, rn = np.linalg.norm(q, axis=1, keepdims=True), np.linalg.norm(r, axis=1, keepdims=True)
        q, r = q / np.where(qn > 0, qn, 1), r / np.where(rn > 0, rn, 1)
    dist = ((q[:, None, :] - r[None, :, :]) ** 2).sum(-1)
    if metric == "cosine":
        dist = dist / 2
        dist[(qn[:, 0] == 0)[:, None] | (rn[:, 0] == 0)[None, :]] = 1.0
    else:
        dist = np.sqrt(dist)
    if excluded is not None:
        dist[excluded] = np.inf
    index = np.broadcast_to(np.arange(r.shape[0]), dist.shape)
    order = np.lexsort((index, dist), axis=1)[:, :k]
    d = np.take_along_axis(dist, order, 1)
    return d, np.where(np.isinf(d), -1, order)


@pytest.fixture(scope="module")
def random_sets():
    rng = np.random.default_rng(7)
    scales = rng.uniform(0.1, 3.0, size=40)
    queries = (rng.normal(size=(150, 40)) * scales + 2.0).astype(np.float32)
    reference = (rng.normal(size=(400, 40)) * scales + 2.0).astype(np.float32)
    return queries, reference


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_matches_sklearn_on_random_data(random_sets, metric, precision):
    queries, reference = random_sets
    distances, indices = knn(queries, reference, 7, metric=metric, precision=precision, **SMALL_BLOCKS)
    model = NearestNeighbors(n_neighbors=7, metric=metric, algorithm="brute").fit(reference.astype(np.float64))
    expected_d, expected_i = model.kneighbors(queries.astype(np.float64))
    np.testing.assert_array_equal(indices, expected_i)
    np.testing.assert_allclose(distances, expected_d, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_leave_one_out_matches_sklearn(random_sets, precision):
    _, reference = random_sets
    distances, indices = knn(reference, None, 11, exclude_self=True, precision=precision, **SMALL_BLOCKS)
    # sklearn's kneighbors() without X leaves each indexed point out of its own neighbours.
    expected_d, expected_i = NearestNeighbors(n_neighbors=11).fit(reference.astype(np.float64)).kneighbors()
    np.testing.assert_array_equal(indices, expected_i)
    np.testing.assert_allclose(distances, expected_d, rtol=1e-9)
    assert not (indices == np.arange(len(reference))[:, None]).any()


def tied_sets(metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Reference sets whose ties are exact in floating point, not only on paper."""
    rng = np.random.default_rng(3)
    if metric == "euclidean":
        # Small integer coordinates: squared distances are exact integers, so the many equal
        # distances are bit-identical whatever the summation order.
        reference = rng.integers(0, 3, size=(300, 5)).astype(np.float32)
        queries = rng.integers(0, 3, size=(80, 5)).astype(np.float32)
    else:
        # Continuous directions; ties come from copies scaled by a power of two, which
        # normalize to bit-identical unit rows.
        reference = rng.normal(size=(300, 5)).astype(np.float32)
        reference[1::7] = reference[:-1:7] * 2.0
        queries = rng.normal(size=(80, 5)).astype(np.float32)
    reference[::4] = reference[rng.integers(0, 300, size=75)]  # exact duplicates
    return queries, reference


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_ties_and_duplicates_break_by_index(metric, precision):
    queries, reference = tied_sets(metric)
    result = knn_search(queries, reference, 9, metric=metric, precision=precision, shortlist_margin=2, **SMALL_BLOCKS)
    expected_d, expected_i = brute_force(queries, reference, 9, metric)
    np.testing.assert_array_equal(result.indices, expected_i)
    np.testing.assert_allclose(result.distances, expected_d, rtol=1e-12, atol=1e-15)
    # Distances agree with sklearn, whose own order inside ties is not specified.
    model = NearestNeighbors(n_neighbors=9, metric=metric, algorithm="brute").fit(reference)
    np.testing.assert_allclose(result.distances, model.kneighbors(queries)[0], atol=1e-6)
    # Tied neighbours really are tied and listed by increasing index.
    ties = np.isclose(np.diff(result.distances, axis=1), 0, atol=1e-12)
    assert ties.any()
    assert (np.diff(result.indices, axis=1)[ties] > 0).all()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_leave_one_out_keeps_duplicates_of_self(precision):
    rng = np.random.default_rng(5)
    data = rng.normal(size=(120, 6)).astype(np.float32)
    data[60:] = data[:60]  # every row has one exact duplicate at another index
    distances, indices = knn(data, None, 3, exclude_self=True, precision=precision)
    partner = np.r_[np.arange(60, 120), np.arange(0, 60)]
    np.testing.assert_array_equal(indices[:, 0], partner)
    np.testing.assert_array_equal(distances[:, 0], 0.0)
    excluded = np.eye(120, dtype=bool)
    np.testing.assert_array_equal(indices, brute_force(data, data, 3, excluded=excluded)[1])


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_group_exclusion(random_sets, metric, precision):
    queries, reference = random_sets
    rng = np.random.default_rng(11)
    # Two criteria (e.g. compound, batch) with distinct code ranges; -1 pads a missing code.
    query_groups = np.stack([rng.integers(0, 30, len(queries)), rng.integers(100, 104, len(queries))], 1)
    reference_groups = np.stack(
        [rng.integers(0, 30, len(reference)), rng.integers(100, 104, len(reference)), np.full(len(reference), -1)], 1
    )
    reference_groups[::5, 2] = 100  # these rows belong to batch 100 as well
    distances, indices = knn(
        queries,
        reference,
        5,
        metric=metric,
        precision=precision,
        query_groups=query_groups,
        reference_groups=reference_groups,
        **SMALL_BLOCKS,
    )
    # Excluded where any query code equals any (non-padding) reference code.
    equal = query_groups[:, None, :, None] == reference_groups[None, :, None, :]
    excluded = (equal & (reference_groups >= 0)[None, :, None, :]).any(axis=(2, 3))
    expected_d, expected_i = brute_force(queries, reference, 5, metric, excluded)
    np.testing.assert_array_equal(indices, expected_i)
    np.testing.assert_allclose(distances, expected_d, rtol=1e-9)


@pytest.mark.parametrize("width", [512, 1000, 4099])
def test_striped_selection_returns_the_smallest_values_of_each_row(width):
    rng = np.random.default_rng(width)
    # Few distinct values (many ties), excluded pairs at +inf, and rows whose smallest values
    # crowd one group of columns or the tail past the last full stripe.
    keys = torch.from_numpy(rng.integers(0, 50, size=(40, width)).astype(np.float32)).to(torch.bfloat16)
    keys[rng.random(keys.shape) < 0.2] = torch.inf
    keys[0, :] = 100
    keys[0, 7 :: width // 32] = -1  # one whole group holds the row's smallest values
    keys[1, :] = 100
    keys[1, -3:] = -1
    values, columns = _smallest_per_row(keys, 9)
    expected = torch.topk(keys, 9, dim=1, largest=False).values
    assert torch.equal(values.sort(1).values, expected.sort(1).values)
    assert torch.equal(torch.gather(keys, 1, columns), values)
    assert (columns.sort(1).values.diff(dim=1) > 0).all()  # distinct columns


@pytest.mark.parametrize("precision", PRECISIONS)
def test_wide_reference_tiles_match_brute_force(precision):
    # Tiles wide enough for the striped selection, with a partial last tile and a tail.
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(3000, 24)).astype(np.float32)
    found_d, found_i = knn(
        reference[:200],
        reference,
        5,
        precision=precision,
        block_size=128,
        reference_block_size=1100,
        shortlist_margin=3,
    )
    expected_d, expected_i = brute_force(reference[:200], reference, 5)
    np.testing.assert_array_equal(found_i, expected_i)
    np.testing.assert_allclose(found_d, expected_d, rtol=1e-9, atol=1e-12)


def test_fewer_eligible_references_than_k_are_padded():
    reference = np.arange(12, dtype=np.float64).reshape(6, 2)
    groups = np.array([0, 0, 0, 0, 1, 1])
    distances, indices = knn(reference, None, 3, exclude_self=True, query_groups=groups)
    # Rows 4 and 5 (group 1) see only the four group-0 rows, nearest first.
    np.testing.assert_array_equal(indices[4], [3, 2, 1])
    np.testing.assert_array_equal(indices[0], [4, 5, -1])
    assert np.isinf(distances[0, 2]) and np.isclose(distances[0, 0], np.hypot(8, 8))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_near_equal_distances_below_bf16_resolution(precision):
    # References on a thin shell around the query: squared distances differ by ~1e-5
    # relative, far below bf16 resolution (~4e-3), plus a cluster of 120 exact ties.
    rng = np.random.default_rng(2)
    dims = 64
    directions = rng.normal(size=(1500, dims))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    radii = 30.0 * (1 + 1e-5 * rng.random(1500))
    query = rng.normal(size=(1, dims)) * 5
    reference = query + directions * radii[:, None]
    reference[700:820] = reference[700]  # exact ties at one distance
    queries = np.vstack([query, reference[700:701] + 1e-3, reference[:40]])
    result = knn_search(queries, reference, 5, precision=precision, shortlist_margin=0, **SMALL_BLOCKS)
    expected_d, expected_i = brute_force(queries, reference, 5)
    np.testing.assert_array_equal(result.indices, expected_i)
    np.testing.assert_allclose(result.distances, expected_d, rtol=1e-12)
    # The narrow shortlist could not prove exactness for the shell query at first.
    assert result.attempts[0]["failed"] >= 1
    assert sum(a["queries"] - a["failed"] for a in result.attempts) == len(queries)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_float32_last_bit_differences(precision):
    # Copies of one float32 row, each nudged by one ulp in one coordinate: their distances to
    # the query differ far below what the float32 pass resolves, only float64 orders them.
    rng = np.random.default_rng(12)
    base = rng.normal(size=32).astype(np.float32)
    reference = np.repeat(base[None], 60, axis=0)
    coordinate = rng.integers(0, 32, size=60)
    direction = np.where(rng.random(60) < 0.5, np.inf, -np.inf).astype(np.float32)
    reference[np.arange(60), coordinate] = np.nextafter(reference[np.arange(60), coordinate], direction)
    reference = np.vstack([reference, rng.normal(size=(200, 32)).astype(np.float32) * 3])
    queries = (base + rng.normal(size=(5, 32)) * 0.5).astype(np.float32)
    for metric in ("euclidean", "cosine"):
        result = knn_search(queries, reference, 7, metric=metric, precision=precision, **SMALL_BLOCKS)
        expected_d, expected_i = brute_force(queries, reference, 7, metric)
        np.testing.assert_array_equal(result.indices, expected_i)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("scale", [1.0, 1e-12, 1e12])
def test_shortlist_interval_holds_exact_distance(metric, scale, precision):
    # Each shortlisted candidate's exact distance lies in [bound, upper]: the re-ranking skips
    # candidates by these intervals, so they must hold at any scale and spread of features.
    rng = np.random.default_rng(int(np.log10(scale)) + 20)
    spread = rng.uniform(0, 4, size=500) ** 3
    queries = torch.from_numpy(((rng.normal(size=(40, 500)) * spread + 1.0) * scale).astype(np.float32))
    reference = torch.from_numpy(((rng.normal(size=(300, 500)) * spread + 1.0) * scale).astype(np.float32))
    search = _Search(queries, reference, 5, metric, False, None, 64, 96)
    rows = torch.arange(40)
    query = _prepare(search._rows64(queries), precision, metric, "query")
    bounds, upper, candidates, _ = search._shortlist(rows, query, search.reference_side(precision), precision, 30)
    exact = brute_force(queries.numpy(), reference.numpy(), 300, metric)
    exact_by_index = np.take_along_axis(exact[0], np.argsort(exact[1], axis=1), 1)  # column j = reference j
    values = np.take_along_axis(exact_by_index, candidates.numpy(), 1)
    values = values**2 if metric == "euclidean" else values
    assert (bounds.numpy() <= values).all() and (values <= upper.numpy()).all()
    # Not vacuous: the intervals are narrow next to the distances (bf16: 8 significant bits).
    relative_width = (upper - bounds).numpy() / values
    assert np.median(relative_width) < (0.2 if precision == "bf16" else 1e-3)


def test_tie_cluster_larger_than_every_shortlist_is_brute_forced():
    reference = np.zeros((400, 3))
    reference[:, 0] = np.r_[np.full(300, 1.0), np.arange(100) + 2.0]  # 300 exact ties at 1
    result = knn_search(np.zeros((2, 3)), reference, 4, shortlist_margin=0, precision="fp32")
    assert result.attempts[-1]["precision"] == "brute"
    np.testing.assert_array_equal(result.indices, [[0, 1, 2, 3], [0, 1, 2, 3]])


def test_zero_rows_have_cosine_distance_one():
    reference = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    distances, indices = knn(np.array([[0.0, 0.0], [3.0, 0.0]]), reference, 3, metric="cosine")
    np.testing.assert_allclose(distances[0], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(indices[0], [0, 1, 2])
    np.testing.assert_allclose(distances[1], [0.0, 1.0, 1.0], atol=1e-15)
    np.testing.assert_array_equal(indices[1], [1, 0, 2])


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("offset,scale", [(0.0, 1.0), (1e4, 1.0), (0.0, 1e-6), (-50.0, 1e3)])
def test_error_bound_holds(metric, precision, offset, scale):
    rng = np.random.default_rng(int(offset) % 97 + 13)
    spread = rng.uniform(0, 5, size=300) ** 3  # features of very different magnitudes
    a = torch.from_numpy((rng.normal(size=(60, 300)) * spread + offset) * scale)
    b = torch.from_numpy((rng.normal(size=(500, 300)) * spread + offset) * scale)
    assert _bound_holds(a, b, precision, metric)


def test_precision_choice():
    assert resolve_precision("auto") in ("bf16", "fp32")
    assert resolve_precision("fp32") == "fp32"
    assert knn_search(np.eye(3), None, 1, precision="fp32").precision == "fp32"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"queries": np.ones((3, 2)), "reference": np.ones((4, 3))}, "features"),
        ({"queries": np.array([[np.nan, 1.0]])}, "NaN"),
        ({"queries": np.ones(3)}, "2-D"),
        ({"queries": np.ones((3, 2)), "k": 0}, "k must"),
        ({"queries": np.ones((3, 2)), "reference": np.ones((4, 2)), "exclude_self": True}, "exclude_self"),
        ({"queries": np.ones((3, 2)), "reference": np.ones((4, 2)), "query_groups": np.zeros(3, int)}, "together"),
        ({"queries": np.ones((3, 2)), "query_groups": np.zeros(4, int)}, "query_groups"),
        ({"queries": np.ones((3, 2)), "query_groups": np.zeros(3)}, "integer"),
        ({"queries": np.ones((3, 2)), "metric": "manhattan"}, "metric"),
        ({"queries": np.ones((3, 2)), "precision": "fp16"}, "precision"),
    ],
)
def test_bad_input(kwargs, message):
    with pytest.raises(KnnError, match=message):
        knn(**kwargs)
