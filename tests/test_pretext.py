"""Augmentations (reproducible, correct geometry, values in range) and the four pretext
methods: finite losses that fall when training on a fixed batch of real BBBC021 cells, BYOL's
EMA target, patch_location's pair geometry, autoencoder reconstructions, option checks."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from cell_images import DATA

from cytopretrain.curation.standardize import standardize_image
from cytopretrain.learning import augment
from cytopretrain.learning.models import build_backbone
from cytopretrain.learning.pretext import BYOL, POSITIONS, PatchLocation, build_method, method_options

CELLS = DATA / "bbbc021_cells"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def real_cells() -> tuple[torch.Tensor, torch.Tensor]:
    """8 real BBBC021 single cells (4 DMSO, 4 cycloheximide), channels merged as CytoImageNet
    does, centre 64x64 px, in [0, 1]; labels 0 / 1."""
    if not (CELLS / "cells.csv").is_file():
        pytest.skip(f"real test data not found: {CELLS} (bbbc021_cells)")
    cells = pd.read_csv(CELLS / "cells.csv")
    chosen = pd.concat([cells[cells.moa == "DMSO"].head(4), cells[cells.moa != "DMSO"].head(4)])
    images = [standardize_image(np.load(CELLS / f), mode="merge")[0][2:66, 2:66] for f in chosen.file]
    x = torch.from_numpy(np.stack(images)).float().div(255)[:, None]
    return x, torch.tensor([0] * 4 + [1] * 4)


# ------------------------------------------------------------------------------ augmentations

AUGMENTATIONS = {
    "rotation": lambda x, g: augment.random_rotation(x, g),
    "flips": lambda x, g: augment.random_flips(x, g),
    "resized_crop": lambda x, g: augment.random_resized_crop(x, 24, generator=g),
    "intensity": lambda x, g: augment.random_intensity(x, g, p=1.0),
    "blur": lambda x, g: augment.gaussian_blur(x, g, p=1.0),
    "noise": lambda x, g: augment.gaussian_noise(x, g),
}


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_augmentations_are_reproducible_seed_dependent_and_in_range(name):
    x = torch.rand(6, 2, 32, 32, generator=generator(99))
    apply = AUGMENTATIONS[name]
    first, again, other = apply(x, generator(0)), apply(x, generator(0)), apply(x, generator(1))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.dtype == x.dtype and first.shape[:2] == x.shape[:2]
    assert first.min() >= 0 and first.max() <= 1
    if first.shape == x.shape:
        assert not torch.equal(first, x)


def test_generator_state_advances_so_consecutive_batches_differ():
    x = torch.rand(4, 1, 32, 32)
    g = generator(0)
    assert not torch.equal(augment.random_rotation(x, g), augment.random_rotation(x, g))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rotation_by_right_angles_matches_rot90(k):
    x = torch.rand(3, 2, 33, 33)
    torch.testing.assert_close(augment.rotate(x, 90 * k), torch.rot90(x, k, dims=(-2, -1)), rtol=0, atol=1e-5)


def test_rotation_identity_and_non_square_lengths():
    x = torch.rand(2, 1, 24, 48)
    torch.testing.assert_close(augment.rotate(x, 0.0), x, rtol=0, atol=1e-5)
    torch.testing.assert_close(augment.rotate(x, 360.0), x, rtol=0, atol=1e-5)
    bar = torch.zeros(1, 1, 24, 48)
    bar[0, 0, 11:13, 14:34] = 1.0  # horizontal, 20 px long, centred
    upright = augment.rotate(bar, 90.0)[0, 0] > 0.5
    rows = upright.any(dim=1).nonzero()[:, 0]
    assert rows.numel() == 20 and upright.any(dim=0).sum() == 2  # 20 px tall, 2 px wide


def test_random_rotation_turns_about_the_centre_by_varied_angles():
    size, radius = 64, 18.0
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    blob = torch.exp(-((xx - size / 2 - radius) ** 2 + (yy - size / 2) ** 2) / 8.0)
    x = blob.expand(32, 1, size, size).contiguous()
    out = augment.random_rotation(x, generator(3))[:, 0]
    mass = out.sum(dim=(1, 2))
    cy = (out * yy).sum(dim=(1, 2)) / mass - size / 2
    cx = (out * xx).sum(dim=(1, 2)) / mass - size / 2
    torch.testing.assert_close(torch.hypot(cx, cy), torch.full((32,), radius), rtol=0, atol=0.3)
    torch.testing.assert_close(mass, torch.full((32,), float(blob.sum())), rtol=0.02, atol=0)
    angles = torch.atan2(-cy, cx) % (2 * math.pi)  # counter-clockwise as displayed
    assert angles.max() - angles.min() > math.pi  # spread over the circle, not one angle
    quadrants = torch.unique((angles // (math.pi / 2)).long())
    assert quadrants.numel() == 4


def test_random_flips_give_the_four_mirror_images():
    x = torch.rand(1, 1, 8, 8).expand(64, 1, 8, 8).contiguous()
    out = augment.random_flips(x, generator(5))
    candidates = [x[0], x[0].flip(-1), x[0].flip(-2), x[0].flip(-1).flip(-2)]
    kinds = [next(i for i, c in enumerate(candidates) if torch.equal(o, c)) for o in out]
    assert sorted(set(kinds)) == [0, 1, 2, 3]
    assert torch.equal(augment.random_flips(x, generator(5), p=0.0), x)


def test_random_resized_crop_geometry():
    x = torch.rand(3, 2, 40, 40)
    whole = augment.random_resized_crop(x, 40, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=generator(0))
    torch.testing.assert_close(whole, x, rtol=0, atol=1e-5)
    # A horizontal ramp (value = column centre / width): a box of 1/4 of the area and ratio 1
    # is 32 px wide, so 32 output columns span 31 input columns.
    width = 64
    ramp = ((torch.arange(width) + 0.5) / width).expand(16, 1, width, width).contiguous()
    out = augment.random_resized_crop(ramp, 32, scale=(0.25, 0.25), ratio=(1.0, 1.0), generator=generator(1))
    span = out[:, 0, :, -1] - out[:, 0, :, 0]
    torch.testing.assert_close(span, torch.full_like(span, 31 / width), rtol=0, atol=1e-5)
    starts = out[:, 0, 0, 0]
    assert starts.min() >= ramp.min() and starts.max() - starts.min() > 0.1  # boxes inside, at varied places
    rect = augment.random_resized_crop(x, (10, 20), generator=generator(2))
    assert rect.shape == (3, 2, 10, 20)
    with pytest.raises(ValueError, match="scale"):
        augment.random_resized_crop(x, 8, scale=(0.5, 0.2), generator=generator(0))


def test_random_intensity_acts_per_channel():
    x = torch.rand(1, 16, 16).expand(8, 2, 16, 16).contiguous()  # two identical channels
    out = augment.random_intensity(x, generator(0), p=1.0)
    assert all(not torch.equal(o[0], o[1]) for o in out)
    assert torch.equal(augment.random_intensity(x, generator(0), p=0.0), x)
    neutral = augment.random_intensity(x, generator(0), brightness=0.0, contrast=0.0, gamma=(1.0, 1.0), p=1.0)
    torch.testing.assert_close(neutral, x, rtol=0, atol=1e-6)


def test_gaussian_blur_matches_scipy_and_keeps_constants():
    x = torch.rand(2, 3, 30, 30, generator=generator(4))
    out = augment.gaussian_blur(x, generator(0), sigma=(1.5, 1.5), p=1.0)
    # Same kernel: radius ceil(3 * 1.5) = 5; torch's "reflect" padding is scipy's "mirror".
    expected = scipy.ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, 1.5, 1.5), mode="mirror", truncate=5 / 1.5)
    torch.testing.assert_close(out, torch.from_numpy(expected), rtol=0, atol=1e-5)
    constant = torch.full((2, 1, 20, 20), 0.3)
    torch.testing.assert_close(augment.gaussian_blur(constant, generator(0), p=1.0), constant)
    assert torch.equal(augment.gaussian_blur(x, generator(0), p=0.0), x)


def test_gaussian_noise_has_the_requested_spread():
    x = torch.full((4, 1, 64, 64), 0.5)
    residual = augment.gaussian_noise(x, generator(0), std=(0.05, 0.05)) - x
    assert abs(residual.std().item() - 0.05) < 0.003 and abs(residual.mean().item()) < 0.003
    assert torch.equal(augment.gaussian_noise(x, generator(0), std=(0.0, 0.0)), x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cpu_generator_drives_cuda_images():
    x = torch.rand(4, 1, 32, 32)
    on_gpu = augment.random_rotation(x.cuda(), generator(0)).cpu()
    torch.testing.assert_close(on_gpu, augment.random_rotation(x, generator(0)), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ methods

METHOD_SETUPS = {
    # case: (method, image size, options, steps)
    "weak_label": ("weak_label", 32, {}, 20),
    "weak_label_photometric": ("weak_label", 32, {"photometric": True}, 20),
    "byol": ("byol", 32, {"projection_dim": 64, "hidden_dim": 128}, 20),
    "patch_location": ("patch_location", 64, {}, 25),
    "autoencoder": ("autoencoder", 32, {"image_size": 32}, 20),
    # centre held: on one fixed batch a moving centre undoes the agreement it rewards (test_dino.py)
    "dino": (
        "dino",
        32,
        {"out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 16, "local_crops": 2, "center_momentum": 1.0},
        20,
    ),
}


def fixed_batch(real_cells, size: int) -> torch.Tensor:
    x, _ = real_cells
    return x if size == x.shape[-1] else F.interpolate(x, size=size, mode="bilinear", antialias=True)


def make_method(name: str, options: dict, in_channels: int = 1):
    torch.manual_seed(0)
    return build_method(name, build_backbone("resnet18", in_channels=in_channels), n_classes=2, **options)


@pytest.mark.parametrize("case", METHOD_SETUPS)
def test_training_on_a_fixed_batch_lowers_the_loss(real_cells, case):
    name, size, options, steps = METHOD_SETUPS[case]
    images, labels = fixed_batch(real_cells, size), real_cells[1]
    method = make_method(name, options).train()
    optimizer = torch.optim.Adam(method.trainable_parameters(), lr=1e-3, foreach=True)
    losses = []
    for step in range(1, steps + 1):
        # Same generator seed every step: the batch and its augmented views stay fixed.
        loss, metrics = method.loss(images, labels, generator(7))
        assert torch.isfinite(loss) and loss.ndim == 0
        assert metrics["loss"] == pytest.approx(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(step, steps)
        losses.append(loss.item())
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.75 * first, losses
    if "accuracy" in metrics:
        assert metrics["accuracy"] >= 0.75


def test_byol_target_moves_only_by_ema(real_cells):
    images = fixed_batch(real_cells, 32)
    method = make_method("byol", {"projection_dim": 32, "hidden_dim": 64, "ema_schedule": "constant"}).train()
    target_nets = (method.target_backbone, method.target_projector)
    online_nets = (method.backbone, method.projector)
    target_ids = {id(p) for net in target_nets for p in net.parameters()}
    assert not target_ids & {id(p) for p in method.trainable_parameters()}
    assert all(not p.requires_grad for net in target_nets for p in net.parameters())
    for target_net, online_net in zip(target_nets, online_nets):
        for t, o in zip(target_net.parameters(), online_net.parameters()):
            assert torch.equal(t, o)  # the target starts as a copy of the online network

    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.5)
    before = [p.detach().clone() for net in target_nets for p in net.parameters()]
    loss, _ = method.loss(images, None, generator(0))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after_step = [p.detach().clone() for net in target_nets for p in net.parameters()]
    online = [p.detach().clone() for net in online_nets for p in net.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after_step))  # optimizer left it alone
    assert any(not torch.equal(a, b) for a, b in zip(before, online))  # while the online net moved

    method.after_optimizer_step(1, 100)
    updated = [p.detach() for net in target_nets for p in net.parameters()]
    for old, new_online, new in zip(before, online, updated):
        torch.testing.assert_close(new, 0.99 * old + 0.01 * new_online, rtol=1e-6, atol=1e-7)


def test_byol_cosine_schedule_reaches_one_and_is_the_default():
    method = make_method("byol", {"projection_dim": 16, "hidden_dim": 16, "ema_schedule": "cosine", "ema_base": 0.96})
    assert method.tau(0, 10) == pytest.approx(0.96)
    assert method.tau(5, 10) == pytest.approx(0.98)  # halfway: 1 - 0.04 * (cos(pi / 2) + 1) / 2
    assert method.tau(10, 10) == pytest.approx(1.0)
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.target_backbone.parameters()]
    method.after_optimizer_step(10, 10)  # tau = 1 at the end: the target stays put
    assert all(torch.equal(a, b) for a, b in zip(before, method.target_backbone.parameters()))
    constant = make_method("byol", {"projection_dim": 16, "hidden_dim": 16, "ema_schedule": "constant"})
    assert constant.tau(3, 10) == constant.tau(9, 10) == 0.99
    with pytest.raises(ValueError, match="step"):
        constant.after_optimizer_step(11, 10)
    assert make_method("byol", {"projection_dim": 16, "hidden_dim": 16}).ema_schedule == "cosine"  # as published


def coordinate_images(batch: int, size: int) -> torch.Tensor:
    """Channel 0 holds the row index / size, channel 1 the column index / size."""
    rows = (torch.arange(size, dtype=torch.float32) / size)[:, None].expand(size, size)
    cols = (torch.arange(size, dtype=torch.float32) / size)[None, :].expand(size, size)
    return torch.stack([rows, cols]).expand(batch, 2, size, size).contiguous()


def corners(patches: torch.Tensor, size: int) -> torch.Tensor:
    """(row, col) of each patch's top-left pixel, read back from the coordinate channels."""
    return torch.round(patches[:, :, 0, 0] * size).long()


def test_patch_location_pairs_have_the_seed_geometry():
    size = 64
    method = make_method("patch_location", {}, in_channels=2)
    images = coordinate_images(64, size)
    centre, neighbour, position = method.sample_pairs(images, generator(0))
    # The seed: a 3 x 3 grid of cells over the image (64 // 3 = 21 px, grid starting at row 0),
    # each patch its cell minus 15/133 of the cell on each side (round(21 * 15 / 133) = 2).
    cell, trim = size // 3, round((size // 3) * 15 / 133)
    patch = cell - 2 * trim
    assert centre.shape == neighbour.shape == (64, 2, patch, patch)
    start = (size - 3 * cell) // 2 + cell + trim
    assert (corners(centre, size) == start).all()
    expected = {"up": (-cell, 0), "down": (cell, 0), "left": (0, -cell), "right": (0, cell)}
    offsets = corners(neighbour, size) - corners(centre, size)
    for index, name in enumerate(POSITIONS):
        chosen = position == index
        assert chosen.any(), f"position {name} never drawn in 64 pairs"
        assert (offsets[chosen] == torch.tensor(expected[name])).all()
    # Patches are whole contiguous crops.
    steps = torch.arange(patch, dtype=torch.float32) / size
    torch.testing.assert_close(centre[:, 0, :, 0] - centre[:, 0, :1, 0], steps.expand(64, patch))
    torch.testing.assert_close(neighbour[:, 1, 0, :] - neighbour[:, 1, 0, :1], steps.expand(64, patch))


def test_patch_location_jitter_stays_inside_the_cells():
    size = 96
    method = make_method("patch_location", {"jitter": 0.1}, in_channels=2)
    cell = size // 3
    trim, jitter = round(cell * 15 / 133), math.floor(cell * 0.1)
    assert 0 < jitter <= trim
    centre, neighbour, position = method.sample_pairs(coordinate_images(128, size), generator(1))
    start = cell + trim
    shift = corners(centre, size) - start
    assert shift.abs().max() == jitter and len(torch.unique(shift)) == 2 * jitter + 1
    offsets = corners(neighbour, size) - corners(centre, size)
    along = torch.where(position < 2, offsets[:, 0], offsets[:, 1]).abs()
    across = torch.where(position < 2, offsets[:, 1], offsets[:, 0]).abs()
    patch = cell - 2 * trim
    assert (along >= patch).all() and (along <= cell + 2 * jitter).all()  # never overlapping
    assert (across <= 2 * jitter).all()


def test_patch_location_rejects_images_too_small_for_the_backbone():
    method = make_method("patch_location", {})
    patch = 40 // 3 - 2 * round((40 // 3) * 15 / 133)
    with pytest.raises(ValueError, match=rf"40x40 images give {patch} px patches.*minimum of 16 px"):
        method.loss(torch.rand(4, 1, 40, 40), None, generator(0))
    with pytest.raises(ValueError, match="jitter"):
        make_method("patch_location", {"jitter": 0.3})


def test_autoencoder_latent_and_reconstruction(real_cells):
    images = fixed_batch(real_cells, 32)
    method = make_method("autoencoder", {"image_size": 32})
    assert method.encode_latent(images).shape == (8, 150)
    odd = torch.rand(2, 1, 40, 44)
    out = method(odd)
    assert out.shape == odd.shape and out.min() >= 0 and out.max() <= 1

    def reconstruction_error() -> float:
        with torch.no_grad():  # training mode: batch statistics, as during the steps
            return F.mse_loss(method(images), images).item()

    initial = reconstruction_error()
    optimizer = torch.optim.Adam(method.trainable_parameters(), lr=1e-3, foreach=True)
    for _ in range(15):
        loss, _ = method.loss(images, None, generator(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert reconstruction_error() < 0.5 * initial


def test_autoencoder_bce_loss_and_latent_size():
    method = make_method("autoencoder", {"image_size": 32, "latent_dim": 12, "loss": "bce"})
    images = torch.rand(2, 1, 32, 32)
    loss, metrics = method.loss(images, None, generator(0))
    expected = F.binary_cross_entropy(method(images), images).item()  # same train-mode batch statistics
    assert metrics["loss"] == pytest.approx(expected, rel=1e-4)
    assert method.encode_latent(images).shape == (2, 12)


def test_weak_label_photometric_views_change_intensity_and_sharpness_but_not_geometry(real_cells):
    images = real_cells[0].repeat(8, 1, 1, 1)  # 64 views of 8 real cells
    plain = make_method("weak_label", {"rotate": False, "flip": False})
    jitter = make_method("weak_label", {"rotate": False, "flip": False, "photometric": True})
    assert torch.equal(plain.augment_batch(images, generator(3)), images)
    views = jitter.augment_batch(images, generator(3))
    assert torch.equal(views, jitter.augment_batch(images, generator(3)))  # reproducible
    assert views.shape == images.shape and views.min() >= 0 and views.max() <= 1
    # Geometry untouched: every view still correlates with its own cell far more than with the others.
    flat_views = (views - views.mean(dim=(2, 3), keepdim=True)).flatten(1)
    flat_cells = (images - images.mean(dim=(2, 3), keepdim=True)).flatten(1)
    corr = F.normalize(flat_views, dim=1) @ F.normalize(flat_cells, dim=1).T
    own = corr.diagonal()
    assert own.min() > 0.5 and (corr.argmax(dim=1) == torch.arange(64) % 8).float().mean() > 0.95
    # Intensity: the mean brightness of a view relative to its cell spreads well beyond noise level.
    ratio = views.mean(dim=(1, 2, 3)) / images.mean(dim=(1, 2, 3))
    assert ratio.std() > 0.1

    # Sharpness (Laplacian energy): blur lowers it in some views, noise raises it in others.
    def laplacian_energy(x):
        kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None, None]
        return F.conv2d(x, kernel).pow(2).mean(dim=(1, 2, 3))

    sharpness = laplacian_energy(views) / laplacian_energy(images)
    assert (sharpness < 0.5).any() and (sharpness > 2).any()
    for bad in ("yes", 0.5, {"intensity": 1.5}, {"noise": True}, {"hue": 0.5}):
        with pytest.raises(ValueError, match="photometric"):
            make_method("weak_label", {"photometric": bad})


def test_weak_label_photometric_parts_can_be_tuned_or_turned_off(real_cells):
    images = real_cells[0].repeat(8, 1, 1, 1)

    def views(parts):
        return make_method("weak_label", {"rotate": False, "flip": False, "photometric": parts}).augment_batch(
            images, generator(5)
        )

    off = {"intensity": 0, "blur": 0, "noise": 0}

    def jittered_fraction(probability):  # intensity jitter alone: images whose brightness changed
        return (views({**off, "intensity": probability}) != images).flatten(1).any(dim=1).float().mean().item()

    assert torch.equal(views(off), images)
    assert torch.equal(views(True), views({}))  # a mapping starts from the defaults
    assert jittered_fraction(0.8) > 0.6 and jittered_fraction(0.2) < 0.4
    # Only noise: every pixel moves a little, with the requested spread.
    noisy = views({**off, "noise": 0.02}) - images
    assert 0.002 < noisy.std().item() < 0.02 and (noisy != 0).flatten(1).any(dim=1).all()


def test_views_follow_the_input_memory_format(real_cells):
    images = fixed_batch(real_cells, 32)
    method = make_method("weak_label", {})
    plain, _ = method.loss(images, real_cells[1], generator(0))
    last, _ = method.loss(images.contiguous(memory_format=torch.channels_last), real_cells[1], generator(0))
    assert last.item() == pytest.approx(plain.item(), rel=1e-4)


@pytest.mark.parametrize("case", METHOD_SETUPS)
def test_losses_stay_float32_under_bf16_autocast_and_channels_last(case):
    name, size, options, _ = METHOD_SETUPS[case]
    method = make_method(name, options).to(memory_format=torch.channels_last)
    images = torch.rand(4, 1, size, size).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = method.loss(images, torch.tensor([0, 1, 0, 1]), generator(0))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in method.trainable_parameters() if p.grad is not None)


def test_build_method_validates_names_options_and_batches():
    backbone = build_backbone("resnet18", in_channels=1)
    with pytest.raises(ValueError, match="unknown pretext method 'simclr'"):
        build_method("simclr", backbone)
    with pytest.raises(ValueError, match="unknown option.*ema_rate"):
        build_method("byol", backbone, ema_rate=0.9)
    with pytest.raises(ValueError, match="ema_base"):
        build_method("byol", backbone, ema_base=1.5)
    with pytest.raises(ValueError, match="crop_scale"):
        build_method("byol", backbone, crop_scale=(0.9, 0.1))
    with pytest.raises(ValueError, match="n_classes"):
        build_method("weak_label", backbone)
    with pytest.raises(ValueError, match="latent_dim"):
        build_method("autoencoder", backbone, latent_dim=0)
    assert "latent_dim" in method_options("autoencoder") and "n_classes" not in method_options("weak_label")
    byol = build_method("byol", backbone, n_classes=5, hidden_dim=8, projection_dim=8, crop_scale=[0.3, 1.0])
    assert isinstance(byol, BYOL) and byol.crop_scale == (0.3, 1.0)  # YAML lists are accepted
    patch = build_method("patch_location", backbone, n_classes=5)
    assert isinstance(patch, PatchLocation) and not patch.needs_labels
    assert len(patch.trainable_parameters()) == len(list(patch.parameters()))

    weak = build_method("weak_label", backbone, n_classes=3)
    assert weak.needs_labels
    images = torch.rand(4, 1, 32, 32)
    with pytest.raises(ValueError, match="needs labels"):
        weak.loss(images, None, generator(0))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        weak.loss(images, torch.tensor([0, 1, 2, 3]), generator(0))
    with pytest.raises(ValueError, match="integers"):
        weak.loss(images, torch.zeros(4), generator(0))
    with pytest.raises(ValueError, match="at least 2"):
        weak.loss(images[:1], torch.tensor([0]), generator(0))
    with pytest.raises(ValueError, match="channels"):
        weak.loss(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]), generator(0))
