"""DINO (learning.pretext.DINO): the loss against a hand computation, centring and
temperatures, the gradient rules, learning on a fixed batch of real BBBC021 cells with a ViT,
and a run killed mid-way (SIGKILL) then resumed, bitwise equal to the uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cell_images import DATA

from cytopretrain.curation.standardize import standardize_image
from cytopretrain.learning import train
from cytopretrain.learning.checkpoints import read_metrics
from cytopretrain.learning.models import build_backbone
from cytopretrain.learning.pretext import DINO, build_method, dino_loss

REPO = Path(__file__).resolve().parents[1]
CELLS = DATA / "bbbc021_cells"
SMALL_HEAD = {"out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 16}
RUN = {
    "method": "dino",
    "backbone": "vit_tiny_patch16",
    "in_channels": 1,
    "image_size": 32,
    "batch_size": 8,
    "steps": 6,
    "optimizer": "adamw",
    "lr": 0.01,
    "lr_scaling": "linear",
    "weight_decay": 0.04,
    "weight_decay_end": 0.4,
    "warmup_steps": 2,
    "checkpoint_every": 2,
    "log_every": 1,
    "validate_every": 3,
    "seed": 2,
    "num_workers": 0,
    "progress": False,
    "method_options": {**SMALL_HEAD, "local_crops": 2, "local_size": 16, "teacher_temp_warmup": 0.5},
}
CHILD = """
import json, sys, torch
torch.set_num_threads(1)
from cytopretrain.learning import train
train.train(json.loads(open(sys.argv[1]).read()), sys.argv[2], sys.argv[3])
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dino(backbone: str = "vit_tiny_patch16", **options) -> DINO:
    torch.manual_seed(0)
    return build_method("dino", build_backbone(backbone), **{**SMALL_HEAD, **options})


# --------------------------------------------------------------------------- hand-checked parts


def test_loss_centring_and_temperatures_against_a_hand_computation():
    # One image, two global crops, no local crop, K = 2 prototypes. Teacher temperature 0.5 and
    # centre c: (t - c) / 0.5 = [0, ln 3] gives q = [1/4, 3/4]; student logits / 0.1 = [0, ln 3]
    # give p = [1/4, 3/4]; each of the 2 pairs costs -(1/4 ln 1/4 + 3/4 ln 3/4).
    center = torch.tensor([[0.3, -0.2]])
    teacher = center + torch.tensor([[0.0, 0.5 * math.log(3)], [0.0, 0.5 * math.log(3)]])
    student = torch.tensor([[0.0, 0.1 * math.log(3)], [0.0, 0.1 * math.log(3)]])
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    loss = dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.5, crops=2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # A student crop is never compared with the same crop of the teacher: swapping the
    # student's crops changes the loss only through the pairs of different crops.
    uniform_first = torch.tensor([[0.0, 0.0], [0.0, 0.1 * math.log(3)]])
    cross = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # teacher crop 1 vs student crop 2
    half = -(0.25 * math.log(0.5) + 0.75 * math.log(0.5))  # teacher crop 2 vs the uniform student crop 1
    got = dino_loss(uniform_first, teacher, center, student_temp=0.1, teacher_temp=0.5, crops=2)
    assert got.item() == pytest.approx((cross + half) / 2, rel=1e-6)


def test_center_moves_with_momentum_over_the_batch_and_only_in_training():
    method = dino(center_momentum=0.9, out_dim=4)
    method.center.fill_(1.0)
    logits = torch.arange(12.0).reshape(3, 4)  # column means 4, 5, 6, 7
    method.update_center(logits)
    torch.testing.assert_close(method.center, 0.9 + 0.1 * torch.tensor([[4.0, 5.0, 6.0, 7.0]]))
    before = method.center.clone()
    method.eval()
    with torch.no_grad():
        method.loss(torch.rand(2, 1, 32, 32), None, generator(0))
    assert torch.equal(method.center, before)  # validation leaves the centre alone
    method.train()
    method.loss(torch.rand(2, 1, 32, 32), None, generator(0))
    assert not torch.equal(method.center, before)


def test_teacher_temperature_warms_up_linearly_then_stays():
    method = dino(warmup_teacher_temp=0.04, teacher_temp=0.07, teacher_temp_warmup=0.3)
    assert method.teacher_temperature(0, 100) == pytest.approx(0.04)
    assert method.teacher_temperature(15, 100) == pytest.approx(0.055)
    assert method.teacher_temperature(30, 100) == pytest.approx(0.07)
    assert method.teacher_temperature(99, 100) == pytest.approx(0.07)
    assert dino(teacher_temp=0.05).teacher_temperature(0, 100) == pytest.approx(0.05)  # no warm-up: DINO's default


def test_teacher_momentum_follows_a_cosine_to_one_and_the_teacher_moves_only_by_ema():
    method = dino(teacher_momentum=0.996)
    teacher = [p.clone() for p in method.teacher_backbone.parameters()]
    assert all(not p.requires_grad for p in method.teacher_backbone.parameters())
    student_ids = {id(p) for p in method.trainable_parameters()}
    assert not student_ids & {id(p) for p in method.teacher_head.parameters()}
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    method.after_optimizer_step(50, 100)  # halfway: 1 - 0.004 (cos(pi / 2) + 1) / 2 = 0.998
    assert method.momentum == pytest.approx(0.998)
    for old, new, student in zip(teacher, method.teacher_backbone.parameters(), method.backbone.parameters()):
        torch.testing.assert_close(new, 0.998 * old + 0.002 * student)
    assert (int(method.steps_done), int(method.total_steps)) == (50, 100)
    method.after_optimizer_step(100, 100)
    assert method.momentum == pytest.approx(1.0)


def test_gradients_are_clipped_per_parameter_and_the_last_layer_waits():
    method = dino(clip_grad=3.0, freeze_last_layer=0.1)
    for parameter in method.trainable_parameters():
        parameter.grad = torch.full_like(parameter, 10.0)
    method.before_optimizer_step(10, 100)  # step 10 of 100: still inside the frozen 10 %
    assert method.head.last_layer.weight_v.grad is None
    for parameter in method.trainable_parameters():
        if parameter.grad is not None:
            assert parameter.grad.norm().item() == pytest.approx(3.0, rel=1e-4)
    method.head.last_layer.weight_v.grad = torch.full_like(method.head.last_layer.weight_v, 1e-3)
    method.before_optimizer_step(11, 100)
    small = method.head.last_layer.weight_v.grad
    assert small is not None and torch.allclose(small, torch.full_like(small, 1e-3))  # below the clip: untouched
    # norm_last_layer: the prototypes' scale g stays 1 and is not trained
    assert not method.head.last_layer.weight_g.requires_grad
    assert dino(norm_last_layer=False).head.last_layer.weight_g.requires_grad


def test_crop_sizes_follow_the_patch_and_bad_options_are_named():
    assert dino().crop_sizes(64, 64) == (64, 32)  # 3/7 of 64 = 27.4 -> the nearest multiple of 16
    assert dino("resnet18").crop_sizes(224, 224) == (224, 96)  # DINO's 224 / 96 px
    assert dino(local_size=48).crop_sizes(64, 64) == (64, 48)
    with pytest.raises(ValueError, match="local_size.*multiple of 16"):
        dino(local_size=40)
    with pytest.raises(ValueError, match="teacher_temp_warmup"):
        dino(teacher_temp_warmup=2.0)
    with pytest.raises(ValueError, match="local_crop_scale"):
        dino(local_crop_scale=(0.5, 0.1))


# --------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def real_cells() -> torch.Tensor:
    """8 real BBBC021 cells, channels merged, centre 64 x 64 px, in [0, 1]."""
    if not (CELLS / "cells.csv").is_file():
        pytest.skip(f"real test data not found: {CELLS} (bbbc021_cells)")
    cells = pd.read_csv(CELLS / "cells.csv")
    chosen = pd.concat([cells[cells.moa == "DMSO"].head(4), cells[cells.moa != "DMSO"].head(4)])
    images = [standardize_image(np.load(CELLS / f), mode="merge")[0][2:66, 2:66] for f in chosen.file]
    return torch.from_numpy(np.stack(images)).float().div(255)[:, None]


def test_the_loss_falls_on_a_fixed_batch_of_real_cells_with_a_vit(real_cells):
    # The centre is held (momentum 1): on one fixed batch a moving centre makes the teacher's
    # targets drift towards uniform as soon as the student agrees with them (that is its job
    # against collapse), so the loss would fall and rise again; held, the loss measures only
    # how well the student has learnt to predict the teacher across crops.
    method = dino(local_crops=2, freeze_last_layer=0.0, center_momentum=1.0).train()
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=3e-4)
    losses = []
    for step in range(1, 11):
        loss, metrics = method.loss(real_cells, None, generator(5))  # the same views every step
        optimizer.zero_grad()
        loss.backward()
        method.before_optimizer_step(step, 10)
        optimizer.step()
        method.after_optimizer_step(step, 10)
        losses.append(loss.item())
        assert 0 <= metrics["teacher_entropy"] <= math.log(SMALL_HEAD["out_dim"]) + 1e-4
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    assert torch.equal(method.center, torch.zeros_like(method.center))


# --------------------------------------------------------------------------- runs


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_sigkill_mid_run_then_resume_equals_the_uninterrupted_run(real_cell_shards, tmp_path):
    shards = real_cell_shards("parquet")["dir"]
    whole = tmp_path / "whole"
    result = train.train(RUN, shards, whole)
    assert result["finished"]
    records = read_metrics(whole / "metrics.jsonl")
    temperatures = [r["teacher_temp"] for r in records if "teacher_temp" in r]
    assert temperatures[0] == pytest.approx(0.04) and temperatures == sorted(temperatures)
    assert all("val_knn_accuracy" in r for r in records if r["step"] in (3, 6))
    # The run's backbone is DINO's teacher
    state, backbone = tensors(whole / "method.pt"), tensors(whole / "backbone.pt")
    assert all(torch.equal(backbone[k], state[f"teacher_backbone.{k}"]) for k in backbone)

    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps(RUN))
    killed = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(settings_file), str(shards), str(killed)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not list((killed / "checkpoints").glob("step-*.pt")):
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (killed / "backbone.pt").exists(), "the run finished before it was killed"
    resumed = train.train(RUN, shards, killed)
    assert resumed["finished"]
    for name in ("method.pt", "backbone.pt", "best_backbone.pt"):
        ours, theirs = tensors(killed / name), tensors(whole / name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name  # centre, teacher, buffers too

    def comparable(out: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_metrics(out / "metrics.jsonl")]

    assert comparable(killed) == comparable(whole)
