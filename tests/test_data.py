"""Tests of the shard stream: coverage per epoch, shapes, labels, shuffling, exact resume.

The shard set is written by ``write_shards`` from real yeast_toy cells (GFP and RFP TIFFs
scaled to uint8 here), cut into crops of several sizes and 1 or 2 channels, so the loader's
cropping, enlarging and channel merging all run on real pixels. Expected values come from
the crop files built here, never from the loader.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from cytopretrain.curation import shards
from cytopretrain.learning import data

SIZE = 40  # loader output side: the 64 px cells are cropped, the 32 px quadrants enlarged


@pytest.fixture(scope="module")
def shard_set(real_cell_shards):
    return real_cell_shards("parquet")


def loader(shard_set, split="train", **options):
    """A small shuffle buffer, so the ~70 train samples spread over several lanes."""
    settings = dict(batch_size=6, image_size=SIZE, in_channels=1, seed=5, epoch=0, num_workers=0, shuffle_buffer=8)
    settings.update(options)
    return data.make_loader(shard_set["dir"], split, **settings)


def batches(shard_set, split="train", **options) -> list[dict]:
    return list(loader(shard_set, split, **options))


def crop_ids(batch_list: list[dict]) -> list[list[str]]:
    return [list(b["crop_id"]) for b in batch_list]


def flat(batch_list: list[dict]) -> list[str]:
    return [c for b in batch_list for c in b["crop_id"]]


def split_counts(shard_set) -> dict[str, int]:
    index = shards.load_index(shard_set["dir"])
    return index.groupby("split")["n_samples"].sum().to_dict()


def expected_crop(shard_set, crop_id: str, in_channels: int, seed: int, epoch: int) -> np.ndarray:
    """The loader's output for a crop at least SIZE px high and wide, computed with numpy."""
    crop = shard_set["crops"][crop_id]
    image = np.frombuffer(crop["pixels"], np.uint8).reshape(crop["height"], crop["width"], crop["n_channels"])
    a, b = data.sample_offsets(seed, epoch, crop_id)
    top, left = a % (crop["height"] - SIZE + 1), b % (crop["width"] - SIZE + 1)
    patch = image[top : top + SIZE, left : left + SIZE].astype(np.float64).transpose(2, 0, 1) / 255
    if in_channels == 1:
        return patch.mean(axis=0, keepdims=True)
    return np.repeat(patch, in_channels // patch.shape[0], axis=0)


# --------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_sample_once_per_epoch(shard_set, num_workers):
    counts = split_counts(shard_set)
    full = batches(shard_set, num_workers=num_workers, drop_last=False)
    ids = flat(full)
    assert len(ids) == len(set(ids)) == counts["train"]
    assert len(full) == -(-counts["train"] // 6)
    assert all(len(b["crop_id"]) == 6 for b in full[:-1])

    dropped = batches(shard_set, num_workers=num_workers)
    n_batches = data.epoch_length(shard_set["dir"], "train", 6)
    assert n_batches == counts["train"] // 6 == len(dropped)
    kept = flat(dropped)
    assert len(kept) == len(set(kept)) == 6 * n_batches
    assert set(kept) <= set(ids)

    validation = flat(batches(shard_set, "validation", num_workers=num_workers))
    assert len(validation) == len(set(validation)) == counts["validation"]
    assert not set(validation) & set(ids)
    assert set(validation) | set(ids) == set(shard_set["crops"])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # more workers than cores
def test_batches_do_not_depend_on_num_workers(shard_set):
    stream = loader(shard_set, epoch=3).dataset
    assert stream.lanes == stream.n_batches * 6 // 8 > 3  # several lanes: 1 per 8 samples
    reference = crop_ids(batches(shard_set, epoch=3))
    for num_workers in (1, 2, 3, 5):  # 2 and 5 do not divide the lane count: shared lanes
        assert crop_ids(batches(shard_set, epoch=3, num_workers=num_workers)) == reference


def test_small_epoch_is_one_lane_shuffled_whole(shard_set):
    stream = loader(shard_set, shuffle_buffer=1000).dataset
    assert stream.lanes == 1
    ids = flat(batches(shard_set, shuffle_buffer=1000, drop_last=False))
    shard_order = [s["crop_id"] for s in _rank_sequence(shard_set)]
    assert sorted(ids) == sorted(shard_order) and ids != shard_order


def _rank_sequence(shard_set) -> list[dict]:
    index = data.split_shards(shard_set["dir"], "train")
    return [s for shard in index["shard"] for s in shards.iter_shard(shard_set["dir"] / shard)]


# --------------------------------------------------------------------------- content


def test_images_labels_and_channels(shard_set):
    label_table = shards.load_labels(shard_set["dir"])
    class_of = dict(zip(label_table["label"], label_table["class_index"]))
    assert sorted(class_of) == shard_set["labels"]
    checked = enlarged = 0
    for in_channels in (1, 2):
        for batch in batches(shard_set, in_channels=in_channels, epoch=2, drop_last=False):
            images = batch["image"]
            assert images.dtype == torch.float32
            assert images.shape[1:] == (in_channels, SIZE, SIZE)
            assert 0 <= images.min() and images.max() <= 1
            assert batch["label"].dtype == torch.int64
            for image, label, crop_id in zip(images, batch["label"].tolist(), batch["crop_id"]):
                crop = shard_set["crops"][crop_id]
                assert label == class_of[crop["label"]]
                if crop["height"] < SIZE:  # a 32 px quadrant, enlarged: see the test below
                    enlarged += 1
                    assert image.std() > 0.01  # real cell content, not padding
                    continue
                expected = expected_crop(shard_set, crop_id, in_channels, seed=5, epoch=2)
                np.testing.assert_allclose(image.numpy(), expected, atol=1e-6)
                checked += 1
    assert checked > 50 and enlarged > 10


def test_enlarged_crop_matches_bilinear_resize():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(20, 30, 2), dtype=np.uint8)
    out = data.fit_to_size(image, 40, (7, 11))
    assert out.shape == (2, 40, 40) and out.dtype == np.uint8
    # Short side 20 -> 40 doubles the width to 60; the crop starts at column 11 % (60 - 40 + 1).
    # Reference: torch's float bilinear resize (half-pixel centres); Pillow rounds in fixed point.
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(image.transpose(2, 0, 1)).double()[None], size=(40, 60), mode="bilinear"
    )[0].numpy()
    left = 11 % 21
    difference = np.abs(out - resized[:, :, left : left + 40])
    assert difference.max() <= 1


def test_bad_channels_named(shard_set):
    with pytest.raises(ValueError, match=r"shard-\d+\.parquet: crop .* has 2 channels; in_channels=3"):
        batches(shard_set, in_channels=3, drop_last=False)


# --------------------------------------------------------------------------- order


def test_shuffle_is_seeded_and_changes_with_epoch(shard_set):
    first = crop_ids(batches(shard_set, epoch=0))
    assert crop_ids(batches(shard_set, epoch=0)) == first
    second = crop_ids(batches(shard_set, epoch=1))
    other_seed = crop_ids(batches(shard_set, epoch=0, seed=6))
    for order in (second, other_seed):
        assert order != first
        assert sorted(map(sorted, order)) != sorted(map(sorted, first))  # batch contents differ
    # The crop window of a sample changes with the epoch (64 px cells: 25 x 25 windows).
    windows = {data.sample_offsets(5, epoch, "yeast-0-c0") for epoch in range(5)}
    assert len({(a % 25, b % 25) for a, b in windows}) > 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_batches_resumes_exactly(shard_set, num_workers):
    full = batches(shard_set, epoch=4, num_workers=num_workers)
    for skip in (1, 5, len(full) - 1, len(full)):
        resumed = batches(shard_set, epoch=4, num_workers=num_workers, skip_batches=skip)
        assert crop_ids(resumed) == crop_ids(full[skip:])
        for a, b in zip(resumed, full[skip:]):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert len(loader(shard_set, epoch=4, skip_batches=5)) == len(full) - 5
    with pytest.raises(ValueError, match="skip_batches"):
        loader(shard_set, skip_batches=len(full) + 1)


def test_skipped_samples_are_not_decoded(shard_set, monkeypatch):
    decoded = []
    original = data.ShardStream._prepare

    def spy(self, record, path):
        decoded.append(record["crop_id"])
        return original(self, record, path)

    monkeypatch.setattr(data.ShardStream, "_prepare", spy)
    full = batches(shard_set, epoch=1)
    decoded.clear()
    resumed = batches(shard_set, epoch=1, skip_batches=len(full) - 2)
    assert sorted(decoded) == sorted(c for ids in crop_ids(resumed) for c in ids)


def test_tfrecord_shards_give_the_same_batches(real_cell_shards):
    parquet, tfrecord = real_cell_shards("parquet"), real_cell_shards("tfrecord")
    a, b = batches(parquet, epoch=1, skip_batches=1), batches(tfrecord, epoch=1, skip_batches=1)
    assert crop_ids(a) == crop_ids(b)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))


# --------------------------------------------------------------------------- ranks


def test_ranks_get_disjoint_shards_and_equal_batches(shard_set):
    world = 3
    n_batches = data.epoch_length(shard_set["dir"], "train", 4, world)
    index = data.split_shards(shard_set["dir"], "train")
    smallest = np.sort(index["n_samples"].to_numpy())[: len(index) // world].sum()
    assert n_batches == smallest // 4
    seen = []
    for rank in range(world):
        ids = crop_ids(batches(shard_set, batch_size=4, epoch=2, rank=rank, world_size=world))
        assert len(ids) == n_batches
        seen.append({c for batch in ids for c in batch})
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    samples = {
        s["crop_id"]: row.shard for row in index.itertuples() for s in shards.iter_shard(shard_set["dir"] / row.shard)
    }
    shard_sets = [{samples[c] for c in ids} for ids in seen]
    assert not (shard_sets[0] & shard_sets[1]) and not (shard_sets[1] & shard_sets[2])
    with pytest.raises(ValueError, match="fewer than world_size"):
        data.epoch_length(shard_set["dir"], "train", 4, len(index) + 1)


def test_bounded_shuffle_is_a_bounded_permutation():
    rng = np.random.default_rng(0)
    order = data.bounded_shuffle(1000, 50, rng)
    assert sorted(order.tolist()) == list(range(1000))
    # Item i can leave only after it is read: at output position t at most t + 50 items are read.
    assert np.all(order <= np.arange(1000) + 50)
    assert not np.array_equal(order, np.arange(1000))


def test_bad_shard_folders_named(shard_set, tmp_path):
    with pytest.raises(FileNotFoundError, match="index.tsv"):
        data.epoch_length(tmp_path, "train", 4)
    copy = tmp_path / "copy"
    shutil.copytree(shard_set["dir"], copy)
    index = shards.load_index(copy)
    with pytest.raises(ValueError, match="no 'test' shards"):
        data.epoch_length(copy, "test", 4)
    index.loc[0, "n_samples"] += 5  # the index promises rows the shard does not hold
    index.to_csv(copy / "index.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match=f"{index.loc[0, 'shard']}: has .* rows, index.tsv promises more"):
        batches({"dir": copy}, index.loc[0, "split"], drop_last=False)
