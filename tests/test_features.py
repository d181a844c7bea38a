"""Feature extraction: features equal a direct np.percentile + backbone computation, batching by
shape changes nothing, failures are reported with reasons and counts reconcile, profile tables
follow the Metadata_ convention, fusion z-scores, and random features separate real classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tifffile
import torch
import torch.nn.functional as F
from cell_images import BBBC_CELLS_OPTIONS, DATA

from cytopretrain.core.errors import SchemaError
from cytopretrain.core.imageio import read_channels
from cytopretrain.curation.sources import run_adapter
from cytopretrain.evaluation.features import (
    extract_features,
    extract_features_to_parquet,
    random_init_backbone,
)
from cytopretrain.evaluation.preprocess import plane_percentiles
from cytopretrain.evaluation.profile_tables import METADATA_COLUMNS, fuse_profiles, write_profiles
from cytopretrain.learning.models import InferenceBackbone, load_backbone

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real test data not found at {DATA}")

# Without channel names: concat mode names the channels c0, c1, c2.
UNNAMED_CELLS_OPTIONS = {k: v for k, v in BBBC_CELLS_OPTIONS.items() if k not in ("channels", "constants")}
EXPECTED_METADATA = ["Metadata_" + c for c in METADATA_COLUMNS]


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    return random_init_backbone("resnet18", in_channels=1, seed=0)


@pytest.fixture(scope="module")
def bbbc_cells() -> pd.DataFrame:
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA}")
    return run_adapter("manifest", DATA / "bbbc021_cells", "bbbc021_cells", UNNAMED_CELLS_OPTIONS).table


@pytest.fixture(scope="module")
def yeast() -> pd.DataFrame:
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA}")
    return run_adapter("cyclops", DATA / "yeast_toy" / "images", "yeast_toy", {}).table


def few(table: pd.DataFrame, n: int = 4) -> pd.DataFrame:
    """n rows spread over the table (both classes of a sorted table)."""
    return table.iloc[np.linspace(0, len(table) - 1, n).astype(int)].reset_index(drop=True)


def features_of(profiles: pd.DataFrame) -> np.ndarray:
    return profiles[[c for c in profiles.columns if not c.startswith("Metadata_")]].to_numpy()


def direct_features(
    backbone, image: np.ndarray, *, mode: str, normalize: bool, resize: int | None = None, input_norm: bool = False
) -> np.ndarray:
    """The documented recipe written out: float64 np.percentile scaling, channel mean or one
    input per channel, resize, repeat to the backbone's channels, then backbone(tensor)."""
    planes = []
    for c in range(image.shape[2]):
        x = image[:, :, c].astype(np.float64)
        if normalize:
            low, high = np.percentile(x, [0.1, 99.9])
            planes.append(np.clip((x - low) / (high - low), 0, 1))
        elif image.dtype == np.uint16:
            planes.append(x / 65535)
        else:
            planes.append(np.clip(x, 0, 1))
    grey = [np.mean(planes, axis=0)] if mode == "merge" else planes
    tensor = torch.tensor(np.stack(grey), dtype=torch.float32)[:, None]
    if resize is not None:
        tensor = F.interpolate(tensor, size=(resize, resize), mode="bilinear", align_corners=False, antialias=True)
    tensor = tensor.repeat(1, backbone.in_channels, 1, 1)
    if input_norm:
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        tensor = (tensor - mean) / std
    backbone.eval()
    with torch.no_grad():
        return backbone(tensor).reshape(-1).numpy()


def write_tiff_image(folder: Path, name: str, image: np.ndarray) -> list[str]:
    """One single-page TIFF per channel of an (H, W, C) image; the paths."""
    paths = []
    for c in range(image.shape[2]):
        path = folder / f"{name}_c{c}.tif"
        tifffile.imwrite(path, image[:, :, c])
        paths.append(str(path))
    return paths


def generated_table(rows: list[tuple[str, list[str]]], channels: str = "dna|actin") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "idx": [idx for idx, _ in rows],
            "channel_paths": [paths for _, paths in rows],
            "channels": channels,
            "phenotype": [f"class{i % 2}" for i in range(len(rows))],
            "concentration": np.arange(len(rows), dtype=float),
        }
    )


def spots(shape: tuple[int, int], rng: np.random.Generator, channels: int = 2) -> np.ndarray:
    """uint16 (H, W, C): noisy background with a bright blob per channel."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    planes = []
    for _ in range(channels):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        blob = 3000 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0)
        planes.append(rng.poisson(200 + blob))
    return np.stack(planes, axis=-1).astype(np.uint16)


# ---------------------------------------------------------------- shapes and metadata


@needs_data
@pytest.mark.parametrize("dataset, names", [("bbbc_cells", ["c0", "c1", "c2"]), ("yeast", ["protein", "cytoplasm"])])
def test_merge_gives_d_and_concat_d_times_channels_features(dataset, names, resnet, request):
    table = few(request.getfixturevalue(dataset), 4)
    merged, merge_failures = extract_features(table, resnet, channel_mode="merge")
    concat, concat_failures = extract_features(table, resnet, channel_mode="concat")
    assert len(merge_failures) == len(concat_failures) == 0
    d = resnet.feature_dim
    assert features_of(merged).shape == (4, d)
    assert features_of(concat).shape == (4, d * len(names))
    assert list(merged.columns[len(EXPECTED_METADATA) :]) == [f"f_{k}" for k in range(d)]
    assert list(concat.columns[len(EXPECTED_METADATA) :]) == [f"f_{n}_{k}" for n in names for k in range(d)]
    assert set(merged.dtypes.iloc[len(EXPECTED_METADATA) :]) == {np.dtype("float32")}


@needs_data
def test_metadata_columns_are_prefixed_carried_and_first(bbbc_cells, resnet):
    table = few(bbbc_cells, 6)
    profiles, _ = extract_features(table, resnet, channel_mode="merge")
    assert list(profiles.columns[: len(EXPECTED_METADATA)]) == EXPECTED_METADATA
    assert not any(c.startswith("Metadata_") for c in profiles.columns[len(EXPECTED_METADATA) :])
    for column in ("idx", "name", "phenotype", "compound", "plate", "well"):
        assert profiles[f"Metadata_{column}"].tolist() == table[column].tolist()
    assert profiles["Metadata_concentration"].dtype == np.float64
    np.testing.assert_array_equal(profiles["Metadata_concentration"], table["concentration"])
    assert set(profiles["Metadata_phenotype"]) == {"dmso", "protein synthesis"}


# ---------------------------------------------------------------- features equal the recipe


@needs_data
@pytest.mark.parametrize("mode", ["merge", "concat"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("resize", [None, 40])
def test_features_equal_direct_computation_on_bbbc021_cells(bbbc_cells, resnet, mode, normalize, resize):
    table = few(bbbc_cells, 3)
    profiles, failures = extract_features(
        table, resnet, channel_mode=mode, normalize=normalize, resize=resize, batch_size=4
    )
    assert len(failures) == 0
    for row, paths in zip(features_of(profiles), table["channel_paths"]):
        image = read_channels(paths)
        assert image.dtype == np.uint16
        expected = direct_features(resnet, image, mode=mode, normalize=normalize, resize=resize)
        np.testing.assert_allclose(row, expected, rtol=1e-4, atol=1e-5)


@needs_data
@pytest.mark.parametrize("normalize", [True, False])
def test_features_equal_direct_computation_on_float_yeast_images(yeast, resnet, normalize):
    table = few(yeast, 3)
    profiles, _ = extract_features(table, resnet, channel_mode="concat", normalize=normalize)
    for row, paths in zip(features_of(profiles), table["channel_paths"]):
        image = read_channels(paths)
        assert image.dtype == np.float32
        np.testing.assert_allclose(
            row, direct_features(resnet, image, mode="concat", normalize=normalize), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize(
    "dtype, offset, span",
    [("uint8", 0, 200), ("int32", -5000, 90000), ("float64", 1e6, 1e-3), ("float32", 0.0015, 0.03)],
)
@pytest.mark.parametrize("normalize", [True, False])
def test_features_equal_direct_computation_across_dtypes(tmp_path, resnet, dtype, offset, span, normalize):
    """float64 with a large offset and a tiny span must keep its contrast (float64 arithmetic);
    without normalization integers map their dtype's range and floats are clipped to [0, 1]."""
    rng = np.random.default_rng(13)
    unit = spots((28, 28), rng, channels=2) / 3500.0
    image = (offset + span * unit).astype(dtype)
    np.save(tmp_path / "image.npy", image)
    table = generated_table([("x", [str(tmp_path / "image.npy")])])
    profiles, failures = extract_features(table, resnet, channel_mode="concat", normalize=normalize)
    assert len(failures) == 0
    x = image.astype(np.float64)
    planes = []
    for c in range(2):
        if normalize:
            low, high = np.percentile(x[:, :, c], [0.1, 99.9])
            planes.append(np.clip((x[:, :, c] - low) / (high - low), 0, 1))
        elif image.dtype.kind in "ui":
            info = np.iinfo(image.dtype)
            planes.append((x[:, :, c] - float(info.min)) / (float(info.max) - float(info.min)))
        else:
            planes.append(np.clip(x[:, :, c], 0, 1))
    assert not normalize or min(p.std() for p in planes) > 0.05  # the contrast survived
    with torch.no_grad():
        expected = resnet.eval()(torch.tensor(np.stack(planes), dtype=torch.float32)[:, None]).reshape(-1).numpy()
    np.testing.assert_allclose(features_of(profiles)[0], expected, rtol=1e-4, atol=1e-5)


@needs_data
def test_imagenet_input_norm_on_a_three_channel_backbone(bbbc_cells, resnet):
    rgb = random_init_backbone("resnet18", in_channels=3, seed=1)
    table = few(bbbc_cells, 2)
    profiles, _ = extract_features(table, rgb, channel_mode="merge", input_norm="imagenet")
    for row, paths in zip(features_of(profiles), table["channel_paths"]):
        expected = direct_features(rgb, read_channels(paths), mode="merge", normalize=True, input_norm=True)
        np.testing.assert_allclose(row, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="3 input channels"):
        extract_features(table, resnet, input_norm="imagenet")


def test_small_images_are_zero_padded_centred(tmp_path, resnet):
    image = spots((10, 13), np.random.default_rng(3), channels=1)
    table = generated_table([("small", write_tiff_image(tmp_path, "small", image))], channels="dna")
    profiles, _ = extract_features(table, resnet, channel_mode="merge")
    x = image[:, :, 0].astype(np.float64)
    low, high = np.percentile(x, [0.1, 99.9])
    padded = np.zeros((16, 16))
    padded[3:13, 1:14] = np.clip((x - low) / (high - low), 0, 1)  # 6 rows and 3 columns of padding, centred
    with torch.no_grad():
        expected = resnet.eval()(torch.tensor(padded, dtype=torch.float32)[None, None])[0].numpy()
    np.testing.assert_allclose(features_of(profiles)[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int32", "int64", "float32", "float64"])
@pytest.mark.parametrize("pixels", [300, 68 * 68, 200 * 200])
@pytest.mark.parametrize("low, high", [(0.1, 99.9), (0.0, 100.0), (40.0, 60.0)])
def test_plane_percentiles_equal_np_percentile_on_every_path(dtype, pixels, low, high):
    """Histogram (large 8/16-bit planes) and partial sorting (the rest) give
    np.percentile's linear-method values, ties and all, for every plane of a stack."""
    rng = np.random.default_rng(pixels)
    spread = rng.gamma(0.5, 300, (5, pixels))
    spread[0, : pixels // 2] = 7  # many ties
    spread[1] = 3  # a uniform plane
    planes = spread.astype(dtype)
    lower, upper = plane_percentiles(planes, low, high)
    expected = np.percentile(planes.astype(np.float64), [low, high], axis=1)
    np.testing.assert_allclose(lower, expected[0], rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(upper, expected[1], rtol=1e-12, atol=1e-9)
    assert lower[1] == upper[1] == 3


def test_a_uniform_image_fails_alone_in_a_stack_of_its_shape(tmp_path, resnet):
    """Images of one shape are normalized as one stack: a uniform one among them fails with its
    own reason and the others' features stay those of the direct recipe."""
    rng = np.random.default_rng(21)
    images = [spots((30, 30), rng) for _ in range(4)]
    images[2] = np.full((30, 30, 2), 500, np.uint16)
    table = generated_table(
        [(f"img{i}", write_tiff_image(tmp_path, f"img{i}", image)) for i, image in enumerate(images)]
    )
    profiles, failures = extract_features(table, resnet, channel_mode="merge", batch_size=8, num_workers=0)
    assert failures["idx"].tolist() == ["img2"] and failures["reason"].tolist() == ["uniform"]
    assert "img2_c0.tif" in failures["detail"].iloc[0]
    assert profiles["Metadata_idx"].tolist() == ["img0", "img1", "img3"]
    for row, i in zip(features_of(profiles), (0, 1, 3)):
        expected = direct_features(resnet, images[i], mode="merge", normalize=True)
        np.testing.assert_allclose(row, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- batching


def test_batching_by_shape_equals_one_by_one(tmp_path, resnet):
    rng = np.random.default_rng(5)
    shapes = [(32, 32), (24, 40), (32, 32), (24, 40), (24, 40), (32, 32), (32, 32)]
    rows = [(f"img{i}", write_tiff_image(tmp_path, f"img{i}", spots(s, rng))) for i, s in enumerate(shapes)]
    table = generated_table(rows)
    for mode in ("merge", "concat"):
        batched, _ = extract_features(table, resnet, channel_mode=mode, batch_size=4, num_workers=2)
        single, _ = extract_features(table, resnet, channel_mode=mode, batch_size=1, num_workers=0)
        assert batched["Metadata_idx"].tolist() == table["idx"].tolist()  # table order, not bucket order
        np.testing.assert_allclose(features_of(batched), features_of(single), rtol=1e-4, atol=1e-5)
        for row, paths in zip(features_of(batched), table["channel_paths"]):
            np.testing.assert_allclose(
                row, direct_features(resnet, read_channels(paths), mode=mode, normalize=True), rtol=1e-4, atol=1e-5
            )
    resized, _ = extract_features(table, resnet, channel_mode="merge", resize=20, batch_size=8)
    assert len(resized) == len(table)


def test_loader_threads_give_the_features_of_inline_loading(tmp_path, resnet, monkeypatch):
    """num_workers threads read and preprocess ahead of the model, which runs in the calling
    thread; the profiles equal those of loading inline, in table order, and torch's thread
    count is restored afterwards."""
    import threading

    rng = np.random.default_rng(8)
    rows = [(f"img{i}", write_tiff_image(tmp_path, f"img{i}", spots((24 + 8 * (i % 3), 32), rng))) for i in range(13)]
    table = generated_table(rows)
    forward_threads = []
    forward = InferenceBackbone.forward
    monkeypatch.setattr(
        InferenceBackbone,
        "forward",
        lambda m, x: forward_threads.append(threading.current_thread().name) or forward(m, x),
    )
    threads = torch.get_num_threads()
    loaded, _ = extract_features(table, resnet, channel_mode="concat", batch_size=4, num_workers=2)
    assert torch.get_num_threads() == threads
    assert set(forward_threads) == {threading.main_thread().name}
    inline, _ = extract_features(table, resnet, channel_mode="concat", batch_size=4, num_workers=0)
    assert loaded["Metadata_idx"].tolist() == inline["Metadata_idx"].tolist() == table["idx"].tolist()
    np.testing.assert_array_equal(features_of(loaded), features_of(inline))


@pytest.mark.parametrize("threads", [1, 2])
def test_many_shapes_do_not_pile_up_in_memory(tmp_path, resnet, monkeypatch, threads):
    """Twenty crops of twenty sizes never fill a shape bucket; the run must still hand batches
    to the model long before the last image is read (memory bounded by a few batches), with
    loading inline (0 loader threads) or in 2 loader threads."""
    import cytopretrain.evaluation.preprocess as preprocess

    rng = np.random.default_rng(14)
    rows = [(f"crop{i}", write_tiff_image(tmp_path, f"crop{i}", spots((20 + i, 24), rng))) for i in range(20)]
    table = generated_table(rows)
    reads = []
    original = preprocess.read_channels
    monkeypatch.setattr(preprocess, "read_channels", lambda *a, **k: reads.append(1) or original(*a, **k))
    reads_at_forward = []
    forward = InferenceBackbone.forward
    monkeypatch.setattr(InferenceBackbone, "forward", lambda m, x: reads_at_forward.append(len(reads)) or forward(m, x))
    workers = threads - 1
    profiles, _ = extract_features(table, resnet, channel_mode="merge", batch_size=2, num_workers=workers)
    # The fullest bucket leaves once 4 batches wait; images are read in groups of one batch (2).
    # Loader threads read ahead: at most 2 groups per thread in flight.
    in_flight = 2 * workers * 2
    assert reads_at_forward[0] <= 4 * 2 + 2 + in_flight
    assert profiles["Metadata_idx"].tolist() == table["idx"].tolist()
    for row, paths in zip(features_of(profiles)[::7], table["channel_paths"][::7]):
        np.testing.assert_allclose(
            row, direct_features(resnet, read_channels(paths), mode="merge", normalize=True), rtol=1e-4, atol=1e-5
        )


def test_streamed_parquet_holds_the_same_profiles(tmp_path, resnet):
    rng = np.random.default_rng(6)
    rows = [(f"img{i}", write_tiff_image(tmp_path, f"img{i}", spots((20 + 8 * (i % 2), 24), rng))) for i in range(5)]
    rows.append(("gone", [str(tmp_path / "gone_c0.tif"), str(tmp_path / "gone_c1.tif")]))
    table = generated_table(rows)
    in_memory, failures = extract_features(table, resnet, channel_mode="concat", batch_size=4)
    path = tmp_path / "out" / "profiles.parquet"
    streamed_failures = extract_features_to_parquet(table, resnet, path, channel_mode="concat", batch_size=4)
    streamed = pq.read_table(path).to_pandas()
    pd.testing.assert_frame_equal(
        streamed.sort_values("Metadata_idx").reset_index(drop=True),
        in_memory.sort_values("Metadata_idx").reset_index(drop=True),
    )
    pd.testing.assert_frame_equal(streamed_failures, failures)
    assert [p.name for p in path.parent.iterdir()] == ["profiles.parquet"]  # no temporary left

    write_profiles(in_memory, tmp_path / "written.parquet")
    pd.testing.assert_frame_equal(pq.read_table(tmp_path / "written.parquet").to_pandas(), in_memory)


# ---------------------------------------------------------------- failures


def test_failures_are_reported_and_counts_reconcile(tmp_path, resnet):
    rng = np.random.default_rng(7)
    rows = [(f"good{i}", write_tiff_image(tmp_path, f"good{i}", spots((32, 32), rng))) for i in range(3)]
    rows.append(("missing", [str(tmp_path / "nothing_c0.tif"), str(tmp_path / "nothing_c1.tif")]))
    empty = [str(tmp_path / "empty_c0.tif"), str(tmp_path / "empty_c1.tif")]
    for path in empty:
        Path(path).write_bytes(b"")
    rows.append(("empty", empty))
    rows.append(("zeros", write_tiff_image(tmp_path, "zeros", np.zeros((32, 32, 2), np.uint16))))
    nan = rng.uniform(0, 1, (32, 32, 2)).astype(np.float32)
    nan[5, 5, 1] = np.nan
    rows.append(("nan", write_tiff_image(tmp_path, "nan", nan)))
    table = generated_table(rows)

    profiles, failures = extract_features(table, resnet, channel_mode="concat")
    assert list(failures.columns) == ["idx", "stage", "reason", "detail"]
    assert set(failures["stage"]) == {"extract_features"}
    reasons = dict(zip(failures["idx"], failures["reason"]))
    assert reasons == {"missing": "missing_file", "empty": "empty_file", "zeros": "uniform", "nan": "non_finite"}
    for idx, detail in zip(failures["idx"], failures["detail"]):
        assert f"{idx}_c0.tif" in detail or "nothing_c0.tif" in detail
    assert len(profiles) + len(failures) == len(table)
    assert set(profiles["Metadata_idx"]) | set(failures["idx"]) == set(table["idx"])
    assert not set(profiles["Metadata_idx"]) & set(failures["idx"])

    # Without normalization a black image is a valid input; only unreadable files and NaN fail.
    raw_profiles, raw_failures = extract_features(table, resnet, channel_mode="merge", normalize=False)
    assert set(raw_failures["idx"]) == {"missing", "empty", "nan"}
    assert len(raw_profiles) + len(raw_failures) == len(table)


def test_a_uniform_channel_is_zero_in_concat_and_left_out_of_merge(tmp_path, resnet):
    image = spots((32, 32), np.random.default_rng(8))
    image[:, :, 1] = 700
    table = generated_table([("half", write_tiff_image(tmp_path, "half", image))])
    concat, _ = extract_features(table, resnet, channel_mode="concat")
    merged, _ = extract_features(table, resnet, channel_mode="merge")
    only_first = direct_features(resnet, image[:, :, :1], mode="merge", normalize=True)
    zeros = direct_features(resnet, np.zeros((32, 32, 1)), mode="merge", normalize=False)
    d = resnet.feature_dim
    np.testing.assert_allclose(features_of(concat)[0], np.concatenate([only_first, zeros]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(features_of(merged)[0], only_first, rtol=1e-4, atol=1e-5)
    assert features_of(concat).shape == (1, 2 * d)


def test_unnamed_channels_take_their_count_from_the_first_image(tmp_path, resnet):
    rng = np.random.default_rng(9)
    rows = []
    for name, channels in (("two_a", 2), ("three", 3), ("two_b", 2)):
        path = tmp_path / f"{name}.npy"
        np.save(path, spots((24, 24), rng, channels))
        rows.append((name, [str(path)]))
    table = generated_table(rows, channels="")
    concat, failures = extract_features(table, resnet, channel_mode="concat")
    assert concat["Metadata_idx"].tolist() == ["two_a", "two_b"]
    assert failures[["idx", "reason"]].values.tolist() == [["three", "wrong_channel_count"]]
    assert concat.columns[-1] == f"f_c1_{resnet.feature_dim - 1}"
    merged, merge_failures = extract_features(table, resnet, channel_mode="merge")
    assert len(merged) == 3 and len(merge_failures) == 0


def test_bad_tables_and_options_raise(tmp_path, resnet):
    paths = write_tiff_image(tmp_path, "x", spots((24, 24), np.random.default_rng(10)))
    table = generated_table([("a", paths), ("b", paths)])
    table.loc[1, "channels"] = "nucleus|actin"
    with pytest.raises(SchemaError, match="one channel list"):
        extract_features(table, resnet, channel_mode="concat")
    with pytest.raises(SchemaError, match="expected_channels=3"):
        extract_features(generated_table([("a", paths)]), resnet, expected_channels=3)
    with pytest.raises(SchemaError, match="duplicate idx"):
        extract_features(generated_table([("a", paths), ("a", paths)]), resnet)
    with pytest.raises(SchemaError, match="lacks column"):
        extract_features(pd.DataFrame({"idx": ["a"]}), resnet)
    for bad in ({"channel_mode": "stack"}, {"resize": 0}, {"precision": "fp16"}, {"low": 50, "high": 10}):
        with pytest.raises(ValueError):
            extract_features(generated_table([("a", paths)]), resnet, **bad)


# ---------------------------------------------------------------- model handling


def test_bf16_features_match_fp32_and_the_backbone_is_left_untouched(tmp_path):
    backbone = random_init_backbone("resnet18", in_channels=3, seed=2)
    backbone.train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    rng = np.random.default_rng(11)
    table = generated_table([(f"i{i}", write_tiff_image(tmp_path, f"i{i}", spots((32, 32), rng))) for i in range(4)])
    fp32, _ = extract_features(table, backbone, channel_mode="merge", precision="fp32", device="cpu")
    bf16, _ = extract_features(table, backbone, channel_mode="merge", precision="bf16", device="cpu")
    a, b = features_of(fp32), features_of(bf16)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99
    assert not np.array_equal(a, b)  # autocast really ran in bf16
    assert backbone.training
    after = backbone.state_dict()  # mode, BatchNorm statistics and device as the caller left them
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert backbone.layer1[0].conv1.weight.device.type == "cpu"


def test_features_follow_the_backbone_weights_between_calls(tmp_path):
    """Each call folds the backbone as it is: weights changed in place or replaced between two
    calls give new features, and each call's equal the direct recipe on the current weights."""
    backbone = random_init_backbone("resnet18", in_channels=1, seed=3)
    rng = np.random.default_rng(15)
    images = {f"i{i}": spots((32, 36), rng) for i in range(3)}
    table = generated_table([(name, write_tiff_image(tmp_path, name, image)) for name, image in images.items()])

    def extract_and_check() -> np.ndarray:
        profiles, _ = extract_features(table, backbone, channel_mode="merge", device="cpu")
        expected = [direct_features(backbone, image, mode="merge", normalize=True) for image in images.values()]
        np.testing.assert_allclose(features_of(profiles), np.stack(expected), rtol=1e-4, atol=1e-5)
        return features_of(profiles)

    original = extract_and_check()
    with torch.no_grad():
        backbone.layer4[1].conv2.weight.mul_(-2.0)  # in place: the tensor's version changes
    changed = extract_and_check()
    assert not np.allclose(changed, original)
    backbone.layer4[1].bn2.bias = torch.nn.Parameter(torch.full_like(backbone.layer4[1].bn2.bias, 0.5))
    assert not np.allclose(extract_and_check(), changed)  # a new tensor object


def test_a_trained_runs_backbone_file_extracts_like_the_direct_recipe(tiny_model, bbbc_cells):
    """The extract_features rule's path: a run's backbone.pt loaded by name and channels from its
    model card; its features follow the trained weights, not random init's."""
    import json

    card = json.loads((tiny_model / "model_card.json").read_text())
    backbone = load_backbone(tiny_model / "backbone.pt", card["backbone"], card["in_channels"])
    table = bbbc_cells.head(5)
    profiles, failures = extract_features(table, backbone, channel_mode="merge")
    assert failures.empty and len(profiles) == 5
    for row, paths in zip(features_of(profiles), table["channel_paths"]):
        expected = direct_features(backbone, read_channels(paths), mode="merge", normalize=True)
        np.testing.assert_allclose(row, expected, rtol=1e-4, atol=1e-5)
    untrained, _ = extract_features(
        table, random_init_backbone("resnet18", seed=card["settings"]["seed"]), channel_mode="merge"
    )
    assert not np.allclose(features_of(untrained), features_of(profiles), atol=1e-3)


def test_random_init_backbone_is_deterministic_per_seed():
    state = torch.get_rng_state()
    first = random_init_backbone("resnet18", in_channels=2, seed=4).state_dict()
    again = random_init_backbone("resnet18", in_channels=2, seed=4).state_dict()
    other = random_init_backbone("resnet18", in_channels=2, seed=5).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["conv1.weight"], other["conv1.weight"])
    assert first["conv1.weight"].shape[1] == 2
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------- fusion


def profile_table(ids: list[str], features: np.ndarray, prefix: str = "f_") -> pd.DataFrame:
    meta = pd.DataFrame({"Metadata_idx": ids, "Metadata_phenotype": [f"p{i % 3}" for i in range(len(ids))]})
    feats = pd.DataFrame(features.astype(np.float32), columns=[f"{prefix}{k}" for k in range(features.shape[1])])
    return pd.concat([meta, feats], axis=1)


def test_fuse_profiles_zscores_each_block_and_aligns_on_idx():
    rng = np.random.default_rng(12)
    ids = [f"img{i}" for i in range(20)]
    a_values = rng.normal(5, 3, (20, 4))
    b_values = rng.normal(-2, 0.01, (20, 3))
    b_values[:, 2] = 1.5  # constant feature
    a = profile_table(ids, a_values)
    b = profile_table(ids, b_values).sample(frac=1, random_state=0)  # shuffled rows
    fused = fuse_profiles(a, b, suffixes=("cyto", "imnet"))
    assert list(fused.columns) == (
        ["Metadata_idx", "Metadata_phenotype"] + [f"f_{k}_cyto" for k in range(4)] + [f"f_{k}_imnet" for k in range(3)]
    )
    assert fused["Metadata_idx"].tolist() == ids
    values = fused.iloc[:, 2:].to_numpy(np.float64)
    np.testing.assert_allclose(values[:, :6].mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(values[:, :6].std(0), 1, atol=1e-5)
    np.testing.assert_array_equal(values[:, 6], 0)
    a32 = a_values.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(values[:, 0], (a32[:, 0] - a32[:, 0].mean()) / a32[:, 0].std(), rtol=1e-5)
    b32 = b_values.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(values[:, 4], (b32[:, 0] - b32[:, 0].mean()) / b32[:, 0].std(), rtol=1e-4)


def test_fuse_profiles_rejects_different_images():
    values = np.ones((3, 2))
    a = profile_table(["x", "y", "z"], values)
    with pytest.raises(SchemaError, match="different images"):
        fuse_profiles(a, profile_table(["x", "y", "w"], values))
    with pytest.raises(SchemaError, match="repeat"):
        fuse_profiles(a, profile_table(["x", "y", "y"], values))


# ---------------------------------------------------------------- smoke run on real data


def leave_one_out_knn_accuracy(features: np.ndarray, labels: np.ndarray, k: int) -> float:
    """z-score, Euclidean k-NN over all other rows, majority vote (ties: nearest neighbour's label)."""
    x = features.astype(np.float64)
    std = x.std(0)
    x = (x - x.mean(0)) / np.where(std > 0, std, 1)
    squared = (x**2).sum(1)
    distances = squared[:, None] + squared[None, :] - 2 * x @ x.T
    np.fill_diagonal(distances, np.inf)
    neighbours = np.argsort(distances, axis=1, kind="stable")[:, :k]
    correct = 0
    for i, row in enumerate(neighbours):
        names, counts = np.unique(labels[row], return_counts=True)
        tied = set(names[counts == counts.max()])
        vote = next(labels[j] for j in row if labels[j] in tied)
        correct += vote == labels[i]
    return correct / len(labels)


@needs_data
def test_random_features_separate_dmso_from_protein_synthesis(bbbc_cells, resnet):
    """Measured with random-init resnet18 (seeds 0-5) on these 120 cells: 1-NN 0.72-0.77 with
    normalization, chance 0.5; the bound 0.65 leaves room for numerical drift across machines."""
    table = pd.concat(
        [group.iloc[np.linspace(0, len(group) - 1, 60).astype(int)] for _, group in bbbc_cells.groupby("phenotype")]
    ).reset_index(drop=True)
    profiles, failures = extract_features(table, resnet, channel_mode="merge")
    assert len(profiles) == 120 and len(failures) == 0
    labels = profiles["Metadata_phenotype"].to_numpy()
    accuracy = {k: leave_one_out_knn_accuracy(features_of(profiles), labels, k) for k in (1, 5)}
    print(f"bbbc021_cells DMSO vs protein synthesis, random resnet18, LOO kNN accuracy: {accuracy}")
    assert accuracy[1] >= 0.65


@needs_data
def test_rxrx1_cell_type_smoke_run():
    """18 six-channel sites over 4 cell types: too few for random features to beat chance
    reliably (1-NN 0.39-0.72 over seeds and modes, majority class 0.33), so only the run is
    checked: one feature block per channel, labels carried, every site accounted for."""
    result = run_adapter("rxrx1", DATA / "rxrx1", "rxrx1", {})
    table = result.table
    backbone = random_init_backbone("resnet18", in_channels=1, seed=0)
    profiles, failures = extract_features(table, backbone, channel_mode="concat", resize=64)
    assert len(profiles) + len(failures) == len(table) and len(failures) == 0
    channel_names = table["channels"].iloc[0].split("|")
    assert len(channel_names) == 6
    assert features_of(profiles).shape == (len(table), 6 * backbone.feature_dim)
    assert profiles.columns[len(EXPECTED_METADATA)] == f"f_{channel_names[0]}_0"
    assert profiles["Metadata_cell_type"].tolist() == table["cell_type"].tolist()
    accuracy = leave_one_out_knn_accuracy(features_of(profiles), profiles["Metadata_cell_type"].to_numpy(), 1)
    print(f"rxrx1 cell type, random resnet18, LOO 1-NN accuracy: {accuracy:.3f} (n={len(profiles)})")


def test_a_benchmark_stack_fails_as_a_stack_or_is_projected_by_its_sources_option(tmp_path, resnet):
    """Real yeast planes as one ZYX stack per channel file: a `stack` failure without
    z_projection (it used to be averaged as RGB), the max projection's features with it."""
    planes = np.stack([tifffile.imread(p) for p in sorted((DATA / "yeast_toy" / "images").glob("*/*_gfp.tif"))[:6]])
    paths = []
    for channel, stack in (("dna", planes[:3]), ("actin", planes[3:])):
        paths.append(str(tmp_path / f"cell_{channel}.ome.tif"))
        tifffile.imwrite(paths[-1], stack, metadata={"axes": "ZYX"}, ome=True)
    table = generated_table([("cell", paths)])
    profiles, failures = extract_features(table, resnet, channel_mode="concat")
    assert len(profiles) == 0 and failures["reason"].tolist() == ["stack"]
    profiles, failures = extract_features(table, resnet, channel_mode="concat", z_projection="max")
    projected = np.stack([planes[:3].max(axis=0), planes[3:].max(axis=0)], axis=-1)
    assert len(failures) == 0
    np.testing.assert_allclose(
        features_of(profiles)[0],
        direct_features(resnet, projected, mode="concat", normalize=True),
        rtol=1e-4,
        atol=1e-5,
    )
