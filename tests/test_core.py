"""The shared helpers of cytopretrain.core: percentiles and z-scores on real pixels and profiles
against numpy and scikit-learn, the ordered thread pool, the precision rule and the error base."""

from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.preprocessing import StandardScaler

from cytopretrain.core import errors
from cytopretrain.core.devices import autocast_dtype, resolve_device
from cytopretrain.core.imageio import read_image
from cytopretrain.core.numerics import (
    histogram_percentiles,
    level_counts,
    selection_percentiles,
    zscore,
)
from cytopretrain.core.parallel import ordered_map
from cytopretrain.core.tables import file_sha256

QUANTILES = ((0.1, 99.9), (0.0, 100.0), (25.0, 50.0), (1.0, 99.0), (33.3, 66.6))


@pytest.fixture(scope="module")
def rxrx1_plane(data_dir) -> np.ndarray:
    """A real 512 x 512 uint8 RxRx1 channel."""
    return read_image(next((data_dir / "rxrx1").rglob("*_w1.png")))


@pytest.fixture(scope="module")
def bbbc_uint16(data_dir) -> np.ndarray:
    """A real 68 x 68 uint16 BBBC021 DAPI crop."""
    return np.load(next((data_dir / "bbbc021_cells").rglob("*.npy")))[:, :, 0]


@pytest.fixture(scope="module")
def yeast_float(data_dir) -> np.ndarray:
    """A real 64 x 64 float32 yeast GFP channel."""
    return read_image(next((data_dir / "yeast_toy" / "images").rglob("*_gfp.tif")))


@pytest.mark.parametrize("fixture", ["rxrx1_plane", "bbbc_uint16"])
def test_histogram_percentiles_equal_numpy_to_the_bit_on_real_planes(fixture, request):
    plane = request.getfixturevalue(fixture)
    counts = level_counts(plane)
    for q in QUANTILES:
        np.testing.assert_array_equal(histogram_percentiles(counts, q), np.percentile(plane, q))
    # offset levels: the same plane shifted down by its minimum, counted from there
    low = int(plane.min())
    shifted = histogram_percentiles(np.bincount((plane.astype(np.int64) - low).ravel()), (0.1, 99.9), offset=low)
    np.testing.assert_array_equal(shifted, np.percentile(plane, (0.1, 99.9)))


def test_histogram_percentiles_of_several_rows_and_tiny_counts(bbbc_uint16):
    planes = [bbbc_uint16, bbbc_uint16[:1, :1], bbbc_uint16[:2, :3]]
    counts = np.zeros((3, 1 << 16), np.int64)
    for row, plane in enumerate(planes):
        counts[row, : int(plane.max()) + 1] = np.bincount(plane.ravel())
    got = histogram_percentiles(counts, (0.1, 50.0, 99.9))
    assert got.shape == (3, 3)
    for row, plane in enumerate(planes):
        np.testing.assert_array_equal(got[row], np.percentile(plane, (0.1, 50.0, 99.9)))
    with pytest.raises(ValueError, match="empty"):
        histogram_percentiles(np.zeros(256, np.int64), (1.0,))


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 65_537])
@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_histogram_percentiles_equal_numpy_for_any_count(n, dtype):
    values = np.random.default_rng(n).integers(0, 40 if dtype == "uint8" else 5000, n).astype(dtype)
    for q in QUANTILES:
        np.testing.assert_array_equal(histogram_percentiles(np.bincount(values), q), np.percentile(values, q))


def test_histogram_and_selection_agree(bbbc_uint16):
    by_counts = histogram_percentiles(np.bincount(bbbc_uint16.ravel()), (0.1, 99.9))
    np.testing.assert_array_equal(by_counts, selection_percentiles(bbbc_uint16, (0.1, 99.9)))


@pytest.mark.parametrize("dtype", ["uint8", "int16", "int64", "uint32", "float32", "float64"])
def test_selection_percentiles_equal_numpy(bbbc_uint16, yeast_float, dtype):
    values = (yeast_float if dtype.startswith("f") else bbbc_uint16).astype(dtype)
    for q in QUANTILES:
        expected = np.percentile(values.astype(np.float64), q)
        np.testing.assert_allclose(selection_percentiles(values, q), expected, rtol=1e-7)


@pytest.mark.parametrize("shape", [(3, 5), (512, 512), (511, 513)])
def test_level_counts_equal_bincount_also_for_odd_and_strided_uint8(rxrx1_plane, shape):
    plane = rxrx1_plane[: shape[0], : shape[1]]
    expected = np.bincount(plane.ravel())
    counts = level_counts(plane)
    np.testing.assert_array_equal(counts[: expected.size], expected)
    assert not counts[expected.size :].any()
    strided = np.stack([plane, plane[::-1]], axis=-1)[:, :, 1]
    np.testing.assert_array_equal(level_counts(strided)[: expected.size], np.bincount(plane[::-1].ravel()))


def ljosa_features(data_dir, rows: int = 200, columns: int = 60) -> np.ndarray:
    table = pd.read_csv(data_dir / "bbbc021" / "ljosa_jbiomolscreen_2013_per_well_mean.csv.gz", nrows=rows)
    numeric = table.select_dtypes("number")
    return numeric.iloc[:, :columns].to_numpy(np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_zscore_equals_standard_scaler_on_cellprofiler_profiles(data_dir, dtype):
    values = ljosa_features(data_dir).astype(dtype)
    values[:, 3] = 7.25  # a constant column
    fit = np.arange(len(values)) % 3 == 0
    for fit_rows in (None, fit):
        exact = values.astype(np.float64)  # statistics in float64, as zscore accumulates them
        expected = StandardScaler().fit(exact if fit_rows is None else exact[fit_rows]).transform(exact)
        got = zscore(values, fit_rows, chunk=37)  # chunks smaller than the table
        assert got.dtype == dtype
        tolerance = 1e-6 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance)
    assert np.abs(zscore(values)[:, 3]).max() < 1e-12  # constant: centred, not blown up


def test_zscore_keeps_differences_of_a_column_constant_on_the_fit_rows(data_dir):
    values = ljosa_features(data_dir, rows=20, columns=4)
    values[:10, 0] = 1.5
    got = zscore(values, np.arange(20) < 10)
    np.testing.assert_allclose(got[10:, 0], values[10:, 0] - 1.5)  # scale 1, as StandardScaler
    with pytest.raises(ValueError, match="no rows"):
        zscore(values, np.zeros(20, bool))


def test_ordered_map_keeps_order_and_bounds_work_in_flight():
    started, finished = [], []
    lock = threading.Lock()

    def work(item: int) -> int:
        with lock:
            started.append(item)
        time.sleep(0.002 * (item % 3))  # later items may finish first
        with lock:
            finished.append(item)
        return item * item

    seen = []
    for item, result in ordered_map(work, range(20), 2):
        assert result == item * item
        seen.append(item)
        assert len(started) - len(seen) <= 2 * 2  # at most 2 x threads submitted ahead
    assert seen == list(range(20)) and sorted(finished) == seen
    assert list(ordered_map(lambda x: -x, [1, 2], 0)) == [(1, -1), (2, -2)]  # inline


def test_ordered_map_raises_the_first_error_and_stops():
    def work(item: int) -> int:
        if item == 3:
            raise RuntimeError("item 3 is broken")
        return item

    results = []
    with pytest.raises(RuntimeError, match="item 3"):
        for item, _ in ordered_map(work, range(10), 2):
            results.append(item)
    assert results == [0, 1, 2]


def test_precision_rule_is_one_for_training_and_extraction(monkeypatch):
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "auto") is None and autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "bf16") is torch.bfloat16
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype(cuda, "auto") is torch.bfloat16 and autocast_dtype(cuda, "bf16") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype(cuda, "auto") is torch.float16
    with pytest.raises(ValueError, match="does not support bfloat16"):
        autocast_dtype(cuda, "bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast_dtype(cpu, "fp16")
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_every_workflow_error_shares_one_base_and_keeps_its_builtin_base():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert len(classes) >= 22
    for cls in classes:
        assert issubclass(cls, errors.CytopretrainError)
        if cls is not errors.CytopretrainError:
            assert issubclass(cls, (ValueError, RuntimeError)), cls
    error = errors.ImageReadError("unreadable", "/data/a.tif: truncated")
    assert str(error) == "unreadable: /data/a.tif: truncated" and isinstance(error, ValueError)
    assert issubclass(errors.ChecksumError, RuntimeError)


def test_file_sha256_reads_in_chunks(data_dir):
    path = data_dir / "bbbc021" / "BBBC021_v1_moa.csv"
    import hashlib

    assert file_sha256(path, chunk_size=7) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_outputs_get_the_mode_the_umask_gives_a_new_file(tmp_path, data_dir):
    """Tables, streamed Parquet and any atomic_path file (checkpoints, report, manifests) are
    readable by the group under umask 022, as a file `open` creates; and a failed write leaves
    nothing behind."""
    import os
    import stat

    from cytopretrain.core.tables import ParquetStreamWriter, atomic_path, write_table
    from cytopretrain.curation.standardize import OUTPUT_SCHEMA

    frame = pd.read_csv(data_dir / "bbbc021" / "BBBC021_v1_moa.csv")
    previous = os.umask(0o022)
    try:
        write_table(frame, tmp_path / "moa.tsv")
        write_table(frame, tmp_path / "moa.parquet")
        with ParquetStreamWriter(tmp_path / "images.parquet", OUTPUT_SCHEMA):
            pass
        with atomic_path(tmp_path / "checkpoint.pt") as tmp:
            torch.save({"step": 1}, tmp)
        with pytest.raises(RuntimeError), atomic_path(tmp_path / "failed.json") as tmp:
            tmp.write_text("{}")
            raise RuntimeError("killed")
        open(tmp_path / "plain.txt", "w").close()
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["moa.tsv", "moa.parquet", "images.parquet", "checkpoint.pt", "plain.txt"], 0o644)
