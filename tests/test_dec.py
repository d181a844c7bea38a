"""Deep embedded clustering (learning.pretext.DEC): the soft assignment, target distribution and
KL loss on a case worked by hand; the KL falling on a fixed batch of real cells; the two stages
through the training loop on real yeast cells (k-means start, target updates, tol stop,
clusters.parquet, model card, monitors) and an interrupted stage 2 resuming exactly."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from cell_images import YEAST, yeast_cell_images
from shard_builders import write_shard_set

from cytopretrain.curation.shards import load_index
from cytopretrain.curation.sources import run_adapter
from cytopretrain.evaluation.evaluate import evaluate_benchmark
from cytopretrain.evaluation.features import extract_features, own_clusters
from cytopretrain.evaluation.profile_tables import feature_columns
from cytopretrain.learning import train
from cytopretrain.learning.checkpoints import read_metrics
from cytopretrain.learning.models import build_backbone
from cytopretrain.learning.pretext import (
    build_method,
    kl_divergence,
    log_soft_assignment,
    soft_assignment,
    target_distribution,
)

needs_yeast = pytest.mark.skipif(not YEAST.is_dir(), reason=f"real yeast cells not found at {YEAST}")
RUN = {
    "method": "dec",
    "backbone": "resnet18",
    "in_channels": 2,
    "image_size": 32,
    "batch_size": 8,
    "steps": 13,
    "lr": 1e-3,
    "warmup_steps": 2,
    "checkpoint_every": 3,
    "log_every": 2,
    "validate_every": 6,
    "seed": 3,
    "num_workers": 0,
    "progress": False,
    "method_options": {"n_clusters": 3, "pretrain_steps": 4, "update_interval": 3, "kmeans_restarts": 3, "tol": 0.0},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- by hand


def test_soft_assignment_target_and_kl_by_hand():
    # Centres (0, 0) and (2, 0); codes (0, 0) and (1, 0). Squared distances (0, 4) and (1, 1).
    latent, centres = torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    q = soft_assignment(latent, centres)  # alpha 1: (1 + d)^-1 normalised: (1, 1/5) and (1/2, 1/2)
    assert torch.allclose(q, torch.tensor([[5 / 6, 1 / 6], [1 / 2, 1 / 2]]))
    # f = column sums (4/3, 2/3); q^2 / f = (25/48, 2/48) and (3/16, 6/16), normalised.
    p = target_distribution(q)
    assert torch.allclose(p, torch.tensor([[25 / 27, 2 / 27], [1 / 3, 2 / 3]]))
    kl = kl_divergence(p, log_soft_assignment(latent, centres))
    rows = [
        25 / 27 * math.log((25 / 27) / (5 / 6)) + 2 / 27 * math.log((2 / 27) / (1 / 6)),
        1 / 3 * math.log((1 / 3) / (1 / 2)) + 2 / 3 * math.log((2 / 3) / (1 / 2)),
    ]
    assert kl.item() == pytest.approx(sum(rows) / 2, rel=1e-6)
    # alpha 2: (1 + d / 2)^(-3/2): (1, 3^-1.5) and equal halves.
    q2 = soft_assignment(latent, centres, alpha=2.0)
    assert q2[0, 1].item() == pytest.approx(3**-1.5 / (1 + 3**-1.5), rel=1e-6)
    assert torch.allclose(q2[1], torch.tensor([0.5, 0.5]))
    # A target equal to q gives no loss; far codes do not underflow (log space).
    assert kl_divergence(q, q.log()).item() == pytest.approx(0.0, abs=1e-7)
    far = log_soft_assignment(torch.tensor([[1e6, 0.0]]), centres)
    assert torch.isfinite(far).all()


# --------------------------------------------------------------------------- one batch


class FixedSet:
    """A TrainingSet of one fixed batch (pretext.TrainingSet)."""

    def __init__(self, images: torch.Tensor, seed: int = 0) -> None:
        self.images, self.seed = images, seed
        self.ids = [f"cell-{i:02d}" for i in range(len(images))]

    def encode(self, function):
        with torch.no_grad():
            return list(self.ids), function(self.images).float()


def real_yeast_batch(n: int = 16) -> torch.Tensor:
    """``n`` real yeast cells (GFP + RFP), 32 x 32 px in [0, 1]."""
    cells = [c for c in yeast_cell_images(per_protein=8) if c["crops"][0].shape[-1] == 2][:n]
    x = torch.from_numpy(np.stack([c["crops"][0] for c in cells])).permute(0, 3, 1, 2).float().div(255)
    return torch.nn.functional.interpolate(x, size=32, mode="bilinear", antialias=True)


@needs_yeast
def test_kl_falls_on_a_fixed_batch_of_real_cells():
    images = real_yeast_batch()
    torch.manual_seed(0)
    options = {"n_clusters": 3, "pretrain_steps": 0, "update_interval": 1000, "kmeans_restarts": 2, "image_size": 32}
    method = build_method("dec", build_backbone("resnet18", in_channels=2), **options)
    training_set = FixedSet(images)
    method.after_step(0, 100, training_set)  # pretrain_steps 0: k-means on the codes at once
    assert method.stage == "clustering" and method.targets.shape == (16, 3)
    optimizer = torch.optim.Adam(method.trainable_parameters(), lr=1e-3)
    losses = []
    method.train()
    for _ in range(15):
        method.begin_batch(training_set.ids)
        loss, metrics = method.loss(images, None, torch.Generator())
        assert metrics["stage"] == 2.0 and metrics["kl"] == pytest.approx(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    with pytest.raises(ValueError, match="begin_batch"):
        method.loss(images, None, torch.Generator())  # the batch's crops were not named


def test_options_are_checked():
    backbone = build_backbone("resnet18", in_channels=1)
    with pytest.raises(ValueError, match="n_clusters"):
        build_method("dec", backbone, pretrain_steps=5)
    with pytest.raises(ValueError, match="pretrain_steps"):
        build_method("dec", backbone, n_clusters=3)
    for bad, message in (({"alpha": 0}, "alpha"), ({"tol": 2}, "tol"), ({"n_clusters": 1}, "at least 2")):
        with pytest.raises(ValueError, match=message):
            build_method("dec", backbone, **{"n_clusters": 3, "pretrain_steps": 5, **bad})


# --------------------------------------------------------------------------- training loop


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    if not YEAST.is_dir():
        pytest.skip(f"real yeast cells not found at {YEAST}")
    cells = [c for c in yeast_cell_images(per_protein=8) if c["crops"][0].shape[-1] == 2]
    return write_shard_set(cells, tmp_path_factory.mktemp("yeast"), samples_per_shard=16)["dir"]


@pytest.fixture(scope="module")
def reference(shard_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dec_reference")
    return {"out": out, "result": train.train(RUN, shard_dir, out)}


def test_two_stages_outputs_and_model_card(shard_dir, reference):
    out, result = reference["out"], reference["result"]
    assert result["finished"] and result["step"] == 13
    card = json.loads((out / "model_card.json").read_text())
    details = card["method_details"]
    assert details["stages"] == [
        {"stage": "pretrain", "first_step": 1, "last_step": 4},
        {"stage": "clustering", "first_step": 5, "last_step": 13},
    ]
    # Targets: set at the k-means start (step 4), then every 3 steps.
    assert [u["step"] for u in details["target_updates"]] == [4, 7, 10, 13]
    assert details["target_updates"][0]["changed"] is None
    assert all(0 <= u["changed"] <= 1 for u in details["target_updates"][1:])
    records = read_metrics(out / "metrics.jsonl")
    train_records = [r for r in records if "loss" in r]
    assert [r["stage"] for r in train_records][:2] == [1.0, 1.0] and train_records[-1]["stage"] == 2.0
    assert "kl" in train_records[-1] and "kl" not in train_records[0]
    # main's monitors run on DEC's backbone: embedding spread and kNN accuracy at each validation.
    validations = [r for r in records if "val_loss" in r]
    assert len(validations) == 3 and all(
        r["val_embedding_std"] > 0 and 0 <= r["val_knn_accuracy"] <= 1 for r in validations
    )
    clusters = pd.read_parquet(out / "clusters.parquet")
    index = load_index(shard_dir)
    assert len(clusters) == index.loc[index["split"] == "train", "n_samples"].sum()  # every training crop
    assert list(clusters.columns) == ["crop_id", "cluster", "confidence"]
    assert clusters["crop_id"].is_unique and clusters["cluster"].between(0, 2).all()
    assert clusters["confidence"].between(1 / 3, 1).all()
    centres = pd.read_csv(out / "centres.tsv", sep="\t")
    assert list(centres["cluster"]) == [0, 1, 2] and centres["n_crops"].sum() == len(clusters)
    assert [c for c in centres.columns if c.startswith("z_")] == [f"z_{i}" for i in range(10)]


def test_interrupted_clustering_stage_resumes_exactly(shard_dir, reference, tmp_path):
    # Stop in stage 2 between two target updates (step 8), lose that checkpoint (a kill before
    # it was written) and resume from step 6, then finish: same weights, metrics and clusters.
    first = train.train(RUN, shard_dir, tmp_path, max_steps_this_run=8)
    assert not first["finished"] and first["step"] == 8
    state = torch.load(tmp_path / "checkpoints" / "step-0000006.pt", weights_only=True)
    assert state["method_state"]["stage"] == "clustering" and state["method_state"]["targets"] is not None
    (tmp_path / "checkpoints" / "step-0000008.pt").unlink()
    result = train.train(RUN, shard_dir, tmp_path)
    assert result["finished"] and result["step"] == 13
    for name in ("method.pt", "backbone.pt"):
        ours, theirs = (
            torch.load(tmp_path / name, weights_only=True),
            torch.load(reference["out"] / name, weights_only=True),
        )
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), name
    strip = lambda path: [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_metrics(path)]  # noqa: E731
    assert strip(tmp_path / "metrics.jsonl") == strip(reference["out"] / "metrics.jsonl")
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "clusters.parquet"), pd.read_parquet(reference["out"] / "clusters.parquet")
    )
    card, reference_card = (json.loads((p / "model_card.json").read_text()) for p in (tmp_path, reference["out"]))
    assert card["method_details"] == reference_card["method_details"]


def test_tol_stops_the_run_early(shard_dir, tmp_path):
    settings = {**RUN, "method_options": {**RUN["method_options"], "tol": 1.0}}
    result = train.train(settings, shard_dir, tmp_path)
    # Fewer than every crop changed at the first update after the start: converged at step 7.
    assert result["finished"] and result["step"] == 7
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["method_details"]["converged"] is True
    assert card["method_details"]["stages"][-1] == {"stage": "clustering", "first_step": 5, "last_step": 7}
    assert (tmp_path / "clusters.parquet").is_file()
    again = train.train(settings, shard_dir, tmp_path)  # a converged run is finished
    assert again["finished"] and again["step"] == 7


def test_pretrain_steps_must_leave_a_clustering_stage(shard_dir, tmp_path):
    settings = {**RUN, "method_options": {**RUN["method_options"], "pretrain_steps": 13}}
    with pytest.raises(ValueError, match="pretrain_steps"):
        train.train(settings, shard_dir, tmp_path)


def test_own_clusters_of_benchmark_images_are_scored(shard_dir, reference):
    """The assign_clusters rule's path: the trained run from method.pt and its card, each yeast
    benchmark image through the backbone (merged grey, as extract_features), the latent layer
    and the soft assignment; then the clustering protocol scores those clusters beside k-means."""
    out = reference["out"]
    method, card = train.load_trained_method(out / "method.pt", out / "model_card.json")
    table = run_adapter("cyclops", YEAST, "yeast_toy", {}).table
    table = table.iloc[np.linspace(0, len(table) - 1, 24).astype(int)].reset_index(drop=True)
    options = {"channel_mode": "concat", "normalize": True, "resize": 32, "batch_size": 8, "device": "cpu"}
    clusters, failures = own_clusters(table, method, **options)
    assert failures.empty and len(clusters) == len(table)
    profiles, _ = extract_features(table, method.backbone, **{**options, "channel_mode": "merge"})
    with torch.no_grad():
        q = soft_assignment(
            method.to_latent(torch.tensor(profiles[feature_columns(profiles)].to_numpy(np.float32))),
            method.centres,
            method.alpha,
        )
    assert clusters["cluster"].tolist() == q.argmax(dim=1).tolist()
    assert np.allclose(clusters["confidence"], q.max(dim=1).values.numpy(), atol=1e-5)
    record, _ = evaluate_benchmark(
        profiles, {"source": "yeast", "protocols": ["clustering"]}, "yeast", card["method"], clusters=clusters
    )
    own = record["results"]["clustering"]["own"]
    assert own["n"] == 24 and own["n_unassigned"] == 0
    assert np.array(own["contingency"]["matrix"]).sum() == 24
