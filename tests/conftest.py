"""Fixtures shared by the test modules: the real data folder, the demo collection, shards of
real cells in either shard format and a tiny trained model. Helper modules (cell_images,
shard_builders, workflow_helpers) hold the functions; no test module imports another."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cell_images import DATA, yeast_cell_images
from shard_builders import write_shard_set

from cytopretrain import synthetic

# The demo collection of the tests: every layout, smaller than the default job's.
DEMO_SEED, DEMO_SCALE, DEMO_SIZE = 11, 0.3, 128
TINY_RUN = {
    "method": "weak_label",
    "backbone": "resnet18",
    "in_channels": 1,
    "image_size": 32,
    "batch_size": 8,
    "steps": 10,
    "lr": 1e-3,
    "log_every": 2,
    "validate_every": 5,
    "checkpoint_every": 10,
    "num_workers": 0,
    "progress": False,
}


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data: small real microscopy sets; tests that need it skip when it is absent."""
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def demo_collection(tmp_path_factory) -> tuple[Path, dict]:
    """The synthetic demo collection in all six layouts (seed 11, scale 0.3, 128 px fields)."""
    out = tmp_path_factory.mktemp("demo-collection")
    summary = synthetic.generate_collection(out, seed=DEMO_SEED, scale=DEMO_SCALE, image_size=DEMO_SIZE)
    return out, summary


@pytest.fixture(scope="session")
def real_cell_shards(data_dir, tmp_path_factory):
    """Shards of real yeast cells, ``real_cell_shards(fmt)`` for "parquet" or "tfrecord": the
    shard folder, every crop by crop_id and the labels (written once per format)."""
    images = yeast_cell_images()
    written = {}

    def get(fmt: str = "parquet") -> dict:
        if fmt not in written:
            written[fmt] = write_shard_set(
                images, tmp_path_factory.mktemp(f"yeast-{fmt}"), samples_per_shard=16, fmt=fmt
            )
        return written[fmt]

    return get


@pytest.fixture(scope="session")
def tiny_model(real_cell_shards, tmp_path_factory) -> Path:
    """A weak-label ResNet-18 trained 10 steps at 32 px on the real yeast shards: its run folder
    (backbone.pt, method.pt, model_card.json, metrics.jsonl)."""
    from cytopretrain.learning.train import train

    out = tmp_path_factory.mktemp("tiny-model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TINY_RUN, real_cell_shards("parquet")["dir"], out)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests (bitwise-equal reruns), restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
