"""Training monitors (learning.monitors) and the best checkpoint (learning.train): the collapse
measure and the kNN monitor on hand-checkable cases, warnings, and on runs over real yeast
cells: the best checkpoint is the step with the best monitor, a resumed run keeps it, and the
warnings reach the log and the model card."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from cytopretrain.learning import data, train
from cytopretrain.learning.checkpoints import read_metrics
from cytopretrain.learning.models import load_backbone
from cytopretrain.learning.monitors import COLLAPSE_FRACTION, RISING_VALIDATIONS, Monitors, embedding_std, knn_accuracy

RUN = {
    "method": "byol",
    "backbone": "resnet18",
    "in_channels": 1,
    "image_size": 32,
    "batch_size": 8,
    "steps": 8,
    "lr": 0.05,
    "optimizer": "lars",
    "lr_scaling": "linear",
    "warmup_steps": 2,
    "checkpoint_every": 4,
    "validate_every": 2,
    "log_every": 2,
    "seed": 4,
    "num_workers": 0,
    "progress": False,
    "method_options": {"projection_dim": 32, "hidden_dim": 64},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- the measures


def test_embedding_std_of_a_collapsed_and_of_a_hand_checked_embedding():
    collapsed = torch.tensor([[3.0, 4.0, 0.0]]).repeat(10, 1) * torch.arange(1, 11.0)[:, None]
    assert embedding_std(collapsed) == pytest.approx(0.0, abs=1e-12)  # one direction, any length
    # Rows normalise to e1, e2, e1, e2: each dimension holds 1, 0, 1, 0, whose standard
    # deviation (n - 1 = 3) is sqrt(1/3).
    two_points = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    assert embedding_std(two_points) == pytest.approx(3**-0.5)
    spread = torch.randn(4000, 64, generator=torch.Generator().manual_seed(0))
    assert embedding_std(spread) == pytest.approx(64**-0.5, rel=0.02)  # isotropic: 1/sqrt(D)
    with pytest.raises(ValueError, match="N >= 2"):
        embedding_std(torch.ones(1, 4))


def loo_knn_by_hand(features: np.ndarray, labels: np.ndarray, k: int = 11) -> float:
    """Leave-one-out k-NN on z-scored features (population std), Euclidean; majority vote,
    ties to the tied label whose nearest neighbour comes first."""
    std = features.std(axis=0)
    z = (features - features.mean(axis=0)) / np.where(std > 0, std, 1.0)  # StandardScaler: constants centred
    distances = cdist(z, z)
    np.fill_diagonal(distances, np.inf)
    hits = 0
    for i in range(len(z)):
        order = np.argsort(distances[i], kind="stable")[:k]
        votes = {label: (labels[order] == label).sum() for label in set(labels[order])}
        top = max(votes.values())
        winner = next(labels[j] for j in order if votes[labels[j]] == top)
        hits += winner == labels[i]
    return hits / len(z)


def test_knn_monitor_against_a_hand_written_leave_one_out_vote():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.array(["a", "b", "c"]), 30)
    features = rng.normal(size=(90, 5)) + 1.5 * (labels[:, None] == np.array(["a", "b", "c", "a", "b"]))
    assert knn_accuracy(features, labels) == pytest.approx(loo_knn_by_hand(features, labels))
    assert knn_accuracy(features, np.full(90, "a")) is None  # one label: nothing to monitor


def test_monitors_pick_the_first_best_and_warn_on_collapse_and_on_a_rising_loss():
    monitors = Monitors()
    records = [
        {"val_loss": 1.0, "val_embedding_std": 0.04, "val_knn_accuracy": 0.5},
        {"val_loss": 0.8, "val_embedding_std": 0.05, "val_knn_accuracy": 0.7},
        {"val_loss": 0.9, "val_embedding_std": 0.03, "val_knn_accuracy": 0.7},  # a tie: the earlier stays best
        {"val_loss": 1.1, "val_embedding_std": 0.02, "val_knn_accuracy": 0.6},
        {"val_loss": 1.3, "val_embedding_std": 0.01, "val_knn_accuracy": 0.4},  # 0.01 < 0.25 x 0.05; 3rd rise
    ]
    news = [monitors.observe(step, record) for step, record in zip((10, 20, 30, 40, 50), records)]
    assert [better for better, _ in news] == [True, True, False, False, False]
    assert (monitors.best_step, monitors.best_value) == (20, 0.7)
    assert [len(warnings) for _, warnings in news] == [0, 0, 0, 0, 2]
    collapse, rising = news[-1][1]
    assert "collapsing" in collapse and f"{COLLAPSE_FRACTION:g} x its highest value 0.05" in collapse
    assert f"risen at {RISING_VALIDATIONS} validations in a row" in rising and "0.8 -> 0.9 -> 1.1 -> 1.3" in rising
    again = Monitors.from_state(json.loads(json.dumps(monitors.state())))  # as a checkpoint keeps it
    assert again == monitors
    assert Monitors.from_state(None) == Monitors()


# --------------------------------------------------------------------------- runs


def validation_knn(backbone_path: Path, shards: Path) -> float:
    """The kNN monitor recomputed from a backbone file: validation images as the loop reads
    them (epoch 0 crops), eval-mode features, the hand-written vote."""
    backbone = load_backbone(backbone_path, "resnet18", in_channels=1).eval()
    features, labels = [], []
    loader = data.make_loader(
        shards, "validation", batch_size=16, image_size=32, in_channels=1, seed=RUN["seed"], epoch=0, num_workers=0
    )
    with torch.no_grad():
        for batch in loader:
            features.append(backbone(batch["image"]).numpy())
            labels += batch["label"].tolist()
    return loo_knn_by_hand(np.concatenate(features).astype(np.float64), np.array(labels))


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def whole_run(real_cell_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("monitored")
    shards = real_cell_shards("parquet")["dir"]
    return {"out": out, "shards": shards, "result": train.train(RUN, shards, out)}


def test_best_checkpoint_is_the_step_with_the_best_monitor(whole_run):
    out = whole_run["out"]
    records = [r for r in read_metrics(out / "metrics.jsonl") if "val_knn_accuracy" in r]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert all(0 < r["val_embedding_std"] < 1 for r in records)
    values = [r["val_knn_accuracy"] for r in records]
    best = records[int(np.argmax(values))]  # argmax: the first of equal values
    card = json.loads((out / "model_card.json").read_text())
    assert card["best"] == {"step": best["step"], "monitor": "val_knn_accuracy", "value": best["val_knn_accuracy"]}
    assert whole_run["result"]["best"] == card["best"]
    # The file holds the backbone of that step: its features give that step's monitor again,
    # and the last step's backbone gives the last value.
    assert validation_knn(out / "best_backbone.pt", whole_run["shards"]) == pytest.approx(best["val_knn_accuracy"])
    assert validation_knn(out / "backbone.pt", whole_run["shards"]) == pytest.approx(values[-1])
    assert sorted(p.name for p in (out / "checkpoints").glob("best-*.pt")) == [f"best-{best['step']:07d}.pt"]


def test_a_resumed_run_keeps_the_same_best(whole_run, tmp_path):
    shards = whole_run["shards"]
    train.train(RUN, shards, tmp_path, max_steps_this_run=3)  # checkpoint at 3, validation at 2
    train.train(RUN, shards, tmp_path, max_steps_this_run=4)  # validations at 4 and 6, checkpoints at 4 and 7
    # A lost newest checkpoint: the run restarts from step 4, and any best file written after it
    # (step 6) belongs to the lost part; the resumed run must find its own again.
    (tmp_path / "checkpoints" / "step-0000007.pt").unlink()
    result = train.train(RUN, shards, tmp_path)
    assert result["best"] == whole_run["result"]["best"]
    ours, theirs = tensors(tmp_path / "best_backbone.pt"), tensors(whole_run["out"] / "best_backbone.pt")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("best-*.pt")) == sorted(
        p.name for p in (whole_run["out"] / "checkpoints").glob("best-*.pt")
    )


def test_warnings_reach_the_log_the_result_and_the_model_card(whole_run, tmp_path, monkeypatch, caplog):
    # Validations of a collapsing run whose loss rises: the monitors' verdict travels to the
    # rule log (logger cytopretrain.learning.train), the result and the model card.
    stds = iter([0.05, 0.04, 0.03, 0.01])
    losses = iter([1.0, 1.1, 1.2, 1.3])
    monkeypatch.setattr(
        train.Trainer,
        "validate",
        lambda self: {"val_loss": next(losses), "val_embedding_std": next(stds), "val_knn_accuracy": 0.5},
    )
    with caplog.at_level(logging.WARNING, logger="cytopretrain.learning.train"):
        result = train.train(RUN, whole_run["shards"], tmp_path)
    assert len(result["warnings"]) == 2
    assert result["warnings"][0].startswith("step 8: the embedding is collapsing")
    assert result["warnings"][1].startswith("step 8: val_loss has risen at 3 validations in a row")
    assert [r.getMessage() for r in caplog.records] == result["warnings"]
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["warnings"] == result["warnings"]
    assert card["best"]["step"] == 2  # equal values: the first is best


def test_without_a_validation_split_the_best_is_the_last(tmp_path):
    from shard_builders import write_shard_set

    rng = np.random.default_rng(0)
    images = [
        {"idx": f"i{n}", "label": "ab"[n % 2], "crops": [rng.integers(0, 255, (32, 32, 1), dtype=np.uint8)]}
        for n in range(16)
    ]
    shards = write_shard_set(images, tmp_path / "shards", samples_per_shard=8, validation_fraction=0.0)["dir"]
    result = train.train({**RUN, "steps": 2}, shards, tmp_path / "run")
    assert result["best"] == {"step": 2, "monitor": None, "value": None, "reason": "no validation split"}
    ours, last = tensors(tmp_path / "run" / "best_backbone.pt"), tensors(tmp_path / "run" / "backbone.pt")
    assert all(torch.equal(ours[k], last[k]) for k in last)
