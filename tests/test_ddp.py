"""Data-parallel training: 2 gloo processes under torchrun against 1 process.

R ranks of batch B must compute what one process of batch R x B computes (the
"Distributed data parallel" section of cytopretrain.learning.train): the ranks' data parts together
are the global batch, their augmentation draws are slices of the global draws, batch norm
uses global statistics and the averaged gradients are those of the whole batch. The
end-to-end check trains real BBBC021 cells with both set-ups and compares the logged losses
and the weight changes, running statistics included. It stops after two steps: with batches
this small, batch norm amplifies float rounding (sums split over ranks are added in another
order, and oneDNN may pick other kernels for another batch size) by a factor of 50 or more
per step, so longer runs drift apart by rounding alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cell_images import DATA
from shard_builders import write_shard_set

from cytopretrain.curation.standardize import standardize_image
from cytopretrain.learning import augment, data, train
from cytopretrain.learning.distributed import launch
from cytopretrain.learning.settings import check_settings

CELLS = DATA / "bbbc021_cells"
SETTINGS = {
    "backbone": "resnet18",
    "in_channels": 1,
    "image_size": 64,
    "steps": 2,
    "lr": 0.002,
    "optimizer": "sgd",
    "log_every": 1,
    "checkpoint_every": 4,
    "seed": 3,
    "progress": False,
}


@pytest.fixture(scope="module")
def cell_shards(tmp_path_factory) -> Path:
    """48 real BBBC021 cells (24 DMSO, 24 cycloheximide), channels merged, 68 x 68 px."""
    if not (CELLS / "cells.csv").is_file():
        pytest.skip(f"real test data not found: {CELLS} (bbbc021_cells)")
    cells = pd.read_csv(CELLS / "cells.csv")
    chosen = pd.concat([cells[cells.moa == "DMSO"].head(24), cells[cells.moa != "DMSO"].head(24)])
    images = [
        {
            "idx": Path(row.file).stem,
            "label": "DMSO" if row.moa == "DMSO" else "protein_synthesis",
            "crops": [standardize_image(np.load(CELLS / row.file), mode="merge")[0][:, :, None]],
        }
        for row in chosen.itertuples()
    ]
    return write_shard_set(images, tmp_path_factory.mktemp("cells"), samples_per_shard=8)["dir"]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "method.pt", weights_only=True)


def losses(out: Path) -> np.ndarray:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return np.array([r["loss"] for r in records if "loss" in r])


def initial_weights(settings: dict, n_classes: int) -> dict[str, torch.Tensor]:
    """The weights a run starts from (train seeds torch with the run's seed, then builds)."""
    torch.manual_seed(settings["seed"])
    return {k: v.clone() for k, v in train.build_model(check_settings(settings), n_classes).state_dict().items()}


def assert_same_updates(one: dict, two: dict, start: dict) -> None:
    """Integer buffers are equal; the float tensors' changes from ``start`` agree to 2 % (norm
    over all tensors). A wrong gradient average or per-rank batch statistics are off by tens
    of percent; rounding, amplified by two small-batch steps, stays well below 2 %."""
    assert one.keys() == two.keys() == start.keys()
    gap = change = 0.0
    for key in one:
        if not one[key].is_floating_point():
            assert torch.equal(one[key], two[key]), key
            continue
        gap += float((one[key] - two[key]).double().square().sum())
        change += float((one[key] - start[key]).double().square().sum())
    assert change > 0 and (gap / change) ** 0.5 < 0.02, f"relative gap {(gap / change) ** 0.5:.3g}"


# Per method: DINO on a ViT (no batch norm; its centre is all-reduced over the ranks).
METHODS = {
    "weak_label": {},
    "byol": {},
    "dino": {
        "backbone": "vit_tiny_patch16",
        "optimizer": "adamw",
        "lr": 0.001,
        "method_options": {"out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 16, "local_crops": 2},
    },
}


@pytest.mark.parametrize("method", METHODS)
def test_two_gloo_ranks_equal_one_process(cell_shards, tmp_path, method):
    torch.set_num_threads(1)
    settings = {**SETTINGS, "method": method, **METHODS[method]}
    one = tmp_path / "one"
    train.train({**settings, "batch_size": 16}, cell_shards, one)
    two = tmp_path / "two"
    result = launch({**settings, "batch_size": 8}, cell_shards, two, processes=2, device="cpu", threads=2)

    assert result["finished"] and result["step"] == 2
    card = json.loads((two / "model_card.json").read_text())
    assert card["world_size"] == 2 and card["settings"]["batch_size"] == 8
    assert len(losses(two)) == 2
    # Step 1 starts from the same weights on the same images: equal up to float rounding.
    # Step 2 follows one update, whose rounding differences the small-batch batch norm
    # amplifies; their size depends on the CPU's kernels (4e-4 seen on an Intel Xeon with
    # AMX, under 2e-5 on an AMD EPYC), far below a wrong gradient average (several %).
    ranks, single = losses(two), losses(one)
    np.testing.assert_allclose(ranks[0], single[0], rtol=2e-5)
    np.testing.assert_allclose(ranks[1], single[1], rtol=2e-3)
    assert_same_updates(weights(one), weights(two), initial_weights({**settings, "batch_size": 16}, 2))
    # The comparison can fail: one process of the per-rank batch trains differently.
    half = tmp_path / "half"
    train.train({**settings, "batch_size": 8}, cell_shards, half)
    assert not np.allclose(losses(half), losses(two), rtol=1e-3)


def test_rank_parts_make_up_the_global_batches(cell_shards):
    options = dict(image_size=32, in_channels=1, seed=5, epoch=1, num_workers=0)
    whole = list(data.make_loader(cell_shards, "train", batch_size=8, **options))
    parts = [list(data.make_loader(cell_shards, "train", batch_size=8, part=(i, 2), **options)) for i in (0, 1)]
    assert len(whole) == len(parts[0]) == len(parts[1]) > 1
    for batch, first, second in zip(whole, *parts):
        assert batch["crop_id"] == first["crop_id"] + second["crop_id"]
        assert torch.equal(batch["image"], torch.cat([first["image"], second["image"]]))
    with pytest.raises(ValueError, match="divisible"):
        data.make_loader(cell_shards, "train", batch_size=7, part=(0, 2), **options)


def test_augmentation_parts_are_slices_of_the_global_draw():
    images = torch.rand(8, 2, 24, 24, generator=torch.Generator().manual_seed(0))

    def views(x: torch.Tensor, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        x = augment.random_resized_crop(x, 16, generator=generator)
        x = augment.random_intensity(augment.random_rotation(x, generator), generator, p=1.0)
        return augment.gaussian_noise(augment.gaussian_blur(x, generator, p=1.0), generator)

    whole = views(images, 9)
    parts = []
    for index in range(2):
        with augment.batch_part(index, 2):
            parts.append(views(images[4 * index : 4 * (index + 1)], 9))
    torch.testing.assert_close(torch.cat(parts), whole)
    assert not torch.allclose(views(images[:4], 9), whole[:4])  # outside a part: own draws
