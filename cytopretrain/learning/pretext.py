"""Pretext methods: what a Backbone is trained on. Each is an nn.Module wrapping the backbone.

Interface used by the training loop (``cytopretrain.learning.train``)::

    method = build_method(name, backbone, n_classes=..., **options)
    optimizer = Optimizer(method.trainable_parameters(), ...)
    loss, metrics = method.loss(images, labels, generator)   # images (B, C, H, W) in [0, 1]
    loss.backward()
    method.before_optimizer_step(step, total_steps)           # step = this optimizer step, 1..total
    optimizer.step()
    method.after_optimizer_step(step, total_steps)

Hooks for methods that need more than a batch (DEC; no-ops in the base class). The loop calls
``method.after_step(0, total_steps, training_set)`` before the first step of a fresh run and
``method.after_step(step, ...)`` after each optimizer step, before it logs or checkpoints the
step; ``training_set.encode(function)`` gives ``function`` of every training crop (see
TrainingSet). ``method.begin_batch(crop_ids)`` precedes each training loss with the crop ids of
the batch. ``method.stopped`` becomes true when the method has converged: the loop then ends
the run early, with the step's log record, validation and checkpoint. ``training_state()`` /
``load_training_state(state)`` are checkpointed beside the state dict (tensors and plain
values), ``describe(steps)`` goes into the model card and ``write_outputs(training_set,
out_dir)`` writes files beside the backbone at the end (``out_dir`` None on ranks other than 0;
every rank calls it, since ``encode`` is collective under DDP).

- ``evaluation_backbone()`` is the artifact (save it with ``models.save_backbone``): the
  trained ``backbone``, or DINO's teacher;
- ``loss`` applies the method's own augmentations with ``generator`` (its only source of
  augmentation randomness); model-internal randomness (dropout, EfficientNet's stochastic
  depth) uses torch's global RNG, which the loop saves with its checkpoints for exact resume;
- ``trainable_parameters()`` excludes BYOL's target and DINO's teacher (``requires_grad=False``,
  moved only by the EMA in ``after_optimizer_step``); they are still part of ``state_dict()``
  so checkpoints resume them;
- ``needs_labels``: only ``weak_label`` reads ``labels`` ((B,) integer class indices);
- batches need at least 2 images (BatchNorm in training mode);
- losses are computed in float32, also under bf16 autocast; augmented views keep the
  channels_last layout of the input batch.

Methods (seed documents in ``../shared/seeds``):

- ``weak_label`` (CytoImageNet, seed 002): linear classifier on the pooled features,
  cross-entropy on weak labels; random 0-360 degree rotation and flips.
- ``byol`` (seed 003): online backbone + projector + predictor, EMA target backbone +
  projector, symmetric normalized-MSE between predictions and target projections of two views.
- ``patch_location`` (seed 000): Siamese encoder on a centre patch and one of its 4
  neighbours, classifier over the neighbour's position.
- ``autoencoder`` (seed 004): backbone encoder -> linear latent (150) -> transposed-conv
  decoder, reconstruction loss.
- ``dino`` (Caron et al. 2021; DINO4Cells, scDINO): student and EMA teacher with a projection
  head over prototypes, multi-crop views, centred and sharpened teacher targets.
- ``dec`` (seed 000): deep embedded clustering on the autoencoder: reconstruction, then k-means
  centres in the latent space refined by DEC's self-training (KL to a sharpened target).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from cytopretrain.core.kmeans import kmeans
from cytopretrain.core.tables import write_table
from cytopretrain.learning import augment
from cytopretrain.learning.models import Backbone
from cytopretrain.learning.optim import cosine_schedule

LossResult = tuple[Tensor, dict[str, float]]  # scalar loss, metrics


def _check_images(images: Tensor, backbone: Backbone) -> None:
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float (B, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
    if images.shape[0] < 2:
        raise ValueError(f"a training batch needs at least 2 images (BatchNorm), got {images.shape[0]}")
    if images.shape[1] != backbone.in_channels:
        raise ValueError(f"images have {images.shape[1]} channels, the backbone expects {backbone.in_channels}")


def _like(view: Tensor, images: Tensor) -> Tensor:
    """``view`` in the memory format of ``images`` (channels_last on GPU runs)."""
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        return view.contiguous(memory_format=torch.channels_last)
    return view


def _pair(name: str, value: Sequence[float]) -> tuple[float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 2:
        raise ValueError(f"option {name} must be a pair of numbers, got {value!r}")
    return values


# weak_label's photometric chain with ``photometric: true``: intensity jitter and blur
# probabilities, largest noise std (images in [0, 1]).
PHOTOMETRIC_DEFAULTS = {"intensity": 0.8, "blur": 0.5, "noise": 0.03}


def _photometric_parts(value: bool | dict) -> dict[str, float]:
    """``photometric`` as {part: strength}: false -> all 0, true -> the defaults, a mapping -> the
    defaults with its entries replaced."""
    if isinstance(value, bool):
        return {part: default if value else 0.0 for part, default in PHOTOMETRIC_DEFAULTS.items()}
    if not isinstance(value, dict):
        raise ValueError(f"option photometric must be true, false or a mapping, got {value!r}")
    unknown = sorted(set(value) - set(PHOTOMETRIC_DEFAULTS))
    if unknown:
        raise ValueError(f"option photometric: unknown part(s) {unknown}; choose from {sorted(PHOTOMETRIC_DEFAULTS)}")
    parts = {**PHOTOMETRIC_DEFAULTS, **value}
    for part, strength in parts.items():
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
            raise ValueError(f"option photometric: {part} must be a number in [0, 1], got {strength!r}")
    return {part: float(strength) for part, strength in parts.items()}


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"option {name} must be a positive integer, got {value!r}")
    return value


def _number(name: str, value: float, low: float, high: float, *, low_included: bool = True) -> float:
    """``value`` as a float, checked to lie in [low, high] (or (low, high])."""
    inside = isinstance(value, (int, float)) and not isinstance(value, bool) and value <= high
    if not inside or value < low or (value == low and not low_included):
        raise ValueError(
            f"option {name} must be a number in {'[' if low_included else '('}{low}, {high}], got {value!r}"
        )
    return float(value)


def _accuracy(logits: Tensor, targets: Tensor) -> float:
    return (logits.argmax(dim=1) == targets).float().mean().item()


class TrainingSet(Protocol):
    """The whole train split as the training loop offers it to a method's hooks."""

    seed: int  # the run's seed

    def encode(self, function: Callable[[Tensor], Tensor]) -> tuple[list[str], Tensor]:
        """``function`` (a batch of images -> one row per image) of every training crop once, in
        eval mode without gradients: the crop ids, sorted, and the rows in that order (CPU)."""
        ...


class PretextMethod(nn.Module):
    """Base class: a backbone plus the heads and loss of one pretext task."""

    name: ClassVar[str]
    needs_labels: ClassVar[bool] = False
    # Parameters that may get no gradient in a step (DistributedDataParallel must then look for them).
    may_leave_parameters_unused: ClassVar[bool] = False
    # Writes clusters.parquet and centres.tsv beside the backbone and assigns benchmark images to them.
    assigns_clusters: ClassVar[bool] = False

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def loss(self, images: Tensor, labels: Tensor | None, generator: torch.Generator) -> LossResult:
        """Scalar training loss of a batch and its metrics (floats, always including "loss")."""
        raise NotImplementedError

    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        """Hook called between the backward pass and optimizer step ``step`` (1..total), with
        the gradients unscaled; a no-op except for DINO (clipping, frozen last layer)."""

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Hook called after each optimizer step; a no-op except for BYOL and DINO (EMA)."""

    def evaluation_backbone(self) -> Backbone:
        """The backbone whose features are the run's result (saved as backbone.pt, monitored):
        the trained backbone, or DINO's teacher, which DINO evaluates."""
        return self.backbone

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (all with requires_grad)."""
        return [p for p in self.parameters() if p.requires_grad]

    # Hooks of methods that need the whole training set (module docstring); no-ops here.

    def begin_batch(self, crop_ids: Sequence[str]) -> None:
        """The crops of the next training batch (this rank's part), before its loss."""

    def after_step(self, step: int, total_steps: int, training_set: TrainingSet) -> None:
        """After optimizer step ``step`` (0: before the first step of a fresh run)."""

    @property
    def stopped(self) -> bool:
        """True once the method has converged: training ends before ``steps``."""
        return False

    def training_state(self) -> dict:
        """What a checkpoint keeps besides the state dict (tensors and plain values)."""
        return {}

    def load_training_state(self, state: dict) -> None:
        """Restore ``training_state()`` from a checkpoint."""

    def describe(self, steps: int) -> dict:
        """Facts for the model card after ``steps`` optimizer steps ({} = nothing to add)."""
        return {}

    def write_outputs(self, training_set: TrainingSet, out_dir: Path | None) -> dict[str, str]:
        """Files written beside the backbone at the end, by name (none here)."""
        return {}


class WeakLabel(PretextMethod):
    """CytoImageNet: classify the weak label from pooled features with one linear layer.

    CytoImageNet's published code puts a plain dense softmax layer (no dropout) on max-pooled
    EfficientNetB0 features; here the head reads the global-average-pooled features that are
    later extracted for evaluation. Its README describes random 0-360 degree rotations. Flips (``flip``) are added
    because rotations alone never mirror a cell. ``photometric`` (off by default, as in CytoImageNet)
    adds, after the geometric draws, per-channel intensity jitter (brightness and contrast 0.4, gamma
    0.7-1.4, p 0.8), Gaussian blur (sigma 0.1-1.5 px, p 0.5) and Gaussian noise (std 0-0.03): with few
    training images these teach invariance to optics and expression level, which transfer to
    benchmarks imaged under other conditions needs. ``photometric`` may also be a mapping that
    overrides some of these: ``intensity`` and ``blur`` (probabilities) and ``noise`` (largest
    std), e.g. ``{intensity: 0.2}``; 0 turns a part off. Metrics: loss, accuracy.
    """

    name = "weak_label"
    needs_labels = True

    def __init__(
        self,
        backbone: Backbone,
        n_classes: int | None,
        *,
        rotate: bool = True,
        flip: bool = True,
        fill: str = "zeros",
        photometric: bool | dict = False,
    ) -> None:
        super().__init__(backbone)
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError(f"weak_label needs n_classes >= 2 (the number of weak labels), got {n_classes!r}")
        if fill not in augment.FILL_MODES:
            raise ValueError(f"option fill must be one of {augment.FILL_MODES}, got {fill!r}")
        self.n_classes = n_classes
        self.rotate = bool(rotate)
        self.flip = bool(flip)
        self.fill = fill
        self.photometric = _photometric_parts(photometric)
        self.head = nn.Linear(backbone.feature_dim, n_classes)

    def augment_batch(self, images: Tensor, generator: torch.Generator) -> Tensor:
        if self.rotate:
            images = augment.random_rotation(images, generator=generator, fill=self.fill)
        if self.flip:
            images = augment.random_flips(images, generator=generator)
        parts = self.photometric
        if parts["intensity"] > 0:
            images = augment.random_intensity(images, generator, brightness=0.4, contrast=0.4, p=parts["intensity"])
        if parts["blur"] > 0:
            images = augment.gaussian_blur(images, generator, sigma=(0.1, 1.5), p=parts["blur"])
        if parts["noise"] > 0:
            images = augment.gaussian_noise(images, generator, std=(0.0, parts["noise"]))
        return images

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, n_classes) logits."""
        return self.head(self.backbone(images))

    def loss(self, images: Tensor, labels: Tensor | None, generator: torch.Generator) -> LossResult:
        _check_images(images, self.backbone)
        targets = self._check_labels(labels, images)
        logits = self(_like(self.augment_batch(images, generator), images)).float()
        loss = F.cross_entropy(logits, targets)
        return loss, {"loss": loss.item(), "accuracy": _accuracy(logits, targets)}

    def _check_labels(self, labels: Tensor | None, images: Tensor) -> Tensor:
        if labels is None:
            raise ValueError("weak_label needs labels (class indices) for every batch")
        if labels.shape != (images.shape[0],) or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be ({images.shape[0]},) integers, got {labels.dtype} {tuple(labels.shape)}")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.n_classes:
            raise ValueError(f"labels must lie in [0, {self.n_classes}), got values from {low} to {high}")
        return labels.to(device=images.device, dtype=torch.long)


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """BYOL's projector / predictor: Linear, BatchNorm, ReLU, Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
    )


def normalized_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """Per-sample 2 - 2 cos(prediction, target), the BYOL seed's equation (1): (B, D) x 2 -> (B,)."""
    return 2 - 2 * (F.normalize(prediction.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(dim=-1)


class BYOL(PretextMethod):
    """Bootstrap Your Own Latent (seed 003).

    Online: backbone -> projector -> predictor; target: EMA copy of backbone + projector,
    no gradient. Projector and predictor: Linear(., 2048) - BatchNorm - ReLU - Linear(2048, 512)
    (the seed's projection size 512, hidden 2048). Loss: normalized_mse(p1, z2) +
    normalized_mse(p2, z1), averaged over the batch, for predictions p and target projections z
    of two views of each image (both views go through each network in one batch).

    EMA: after each optimizer step target = tau * target + (1 - tau) * online, parameter by
    parameter. ``ema_schedule="cosine"`` (the default) is the BYOL paper's tau = 1 - (1 -
    ema_base) (cos(pi step / total_steps) + 1) / 2, rising to 1 at the end; "constant" keeps
    ``ema_base`` throughout, as the seed states (a fixed 0.99): with it the target keeps
    chasing the online network and, in issue 19's measurement on real cells, the loss rose
    again after step 400 and the features ended below random init. Target BatchNorm running
    statistics are not averaged: the target runs in training mode (batch statistics), as
    BYOL does, and its running statistics follow its own forward passes. The rest of the
    published recipe is the run's: LARS (``optimizer: lars``) or AdamW with ``lr_scaling:
    linear`` and warm-up, no weight decay on biases and norms (learning.train); README,
    "Choosing a method", has the settings measured on real cells.

    Views (seed: ColorJitter, RandomGrayscale, horizontal flip, Gaussian blur, solarization,
    RandomResizedCrop; see augment.py for the fluorescence versions): random resized crop back
    to the input size (``crop_scale``), flips, any-angle rotation (``rotate``), per-channel
    intensity jitter with probability 0.8 (``intensity`` = brightness and contrast strength),
    Gaussian blur with BYOL's probabilities 1.0 and 0.1 for the two views (``blur_sigma`` in
    pixels), Gaussian noise (``noise_std`` range). Metrics: loss, cosine (mean cosine
    similarity between predictions and target projections), ema_tau (rate of the last update).
    """

    name = "byol"

    def __init__(
        self,
        backbone: Backbone,
        *,
        projection_dim: int = 512,
        hidden_dim: int = 2048,
        ema_base: float = 0.99,
        ema_schedule: str = "cosine",
        crop_scale: Sequence[float] = (0.2, 1.0),
        rotate: bool = True,
        intensity: float = 0.4,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        noise_std: Sequence[float] = (0.0, 0.03),
    ) -> None:
        super().__init__(backbone)
        if not 0.0 <= ema_base < 1.0:
            raise ValueError(f"option ema_base must be in [0, 1), got {ema_base!r}")
        if ema_schedule not in ("constant", "cosine"):
            raise ValueError(f"option ema_schedule must be 'constant' or 'cosine', got {ema_schedule!r}")
        self.ema_base = float(ema_base)
        self.ema_schedule = ema_schedule
        self.crop_scale = _pair("crop_scale", crop_scale)
        self.rotate = bool(rotate)
        self.intensity = float(intensity)
        self.blur_sigma = _pair("blur_sigma", blur_sigma)
        self.noise_std = _pair("noise_std", noise_std)
        self._check_view_options()
        projection_dim = _positive_int("projection_dim", projection_dim)
        hidden_dim = _positive_int("hidden_dim", hidden_dim)
        self.projector = _mlp(backbone.feature_dim, hidden_dim, projection_dim)
        self.predictor = _mlp(projection_dim, hidden_dim, projection_dim)
        self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.ema_tau = self.ema_base

    def _check_view_options(self) -> None:
        """Fail at construction, not at the first batch, on bad augmentation options."""
        scales = {"crop_scale": self.crop_scale}
        _check_fluorescence_view_options("byol", scales, self.intensity, self.blur_sigma, self.noise_std)

    def view(self, images: Tensor, generator: torch.Generator, blur_p: float) -> Tensor:
        """One randomly augmented view of the batch, same shape as ``images``."""
        return fluorescence_view(
            images,
            generator,
            size=tuple(images.shape[2:]),
            scale=self.crop_scale,
            rotate=self.rotate,
            intensity=self.intensity,
            blur_sigma=self.blur_sigma,
            blur_p=blur_p,
            noise_std=self.noise_std,
        )

    def loss(self, images: Tensor, labels: Tensor | None, generator: torch.Generator) -> LossResult:
        _check_images(images, self.backbone)
        batch = images.shape[0]
        views = torch.cat([self.view(images, generator, 1.0), self.view(images, generator, 0.1)])
        views = _like(views, images)
        predictions = self.predictor(self.projector(self.backbone(views)))
        with torch.no_grad():
            targets = self.target_projector(self.target_backbone(views))
        # View 1's prediction regresses view 2's target projection and vice versa.
        swapped = torch.cat([targets[batch:], targets[:batch]])
        per_pair = normalized_mse(predictions, swapped)
        loss = per_pair[:batch].mean() + per_pair[batch:].mean()
        cosine = 1 - per_pair.detach().mean().item() / 2
        return loss, {"loss": loss.item(), "cosine": cosine, "ema_tau": self.ema_tau}

    def tau(self, step: int, total_steps: int) -> float:
        """EMA rate after optimizer step ``step`` of ``total_steps``."""
        rate = cosine_schedule(self.ema_base, 1.0, step, total_steps)  # also checks the step
        return self.ema_base if self.ema_schedule == "constant" else rate

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        self.ema_tau = self.tau(step, total_steps)
        ema_update((self.target_backbone, self.target_projector), (self.backbone, self.projector), self.ema_tau)


def ema_update(targets: Sequence[nn.Module], onlines: Sequence[nn.Module], rate: float) -> None:
    """target = rate * target + (1 - rate) * online, parameter by parameter (buffers untouched)."""
    for target_net, online_net in zip(targets, onlines, strict=True):
        for target, online in zip(target_net.parameters(), online_net.parameters(), strict=True):
            target.mul_(rate).add_(online.detach(), alpha=1 - rate)


def fluorescence_view(
    images: Tensor,
    generator: torch.Generator,
    *,
    size: int | tuple[int, int],
    scale: Sequence[float],
    rotate: bool,
    intensity: float,
    blur_sigma: Sequence[float],
    blur_p: float,
    noise_std: Sequence[float],
) -> Tensor:
    """One augmented view per image, the fluorescence version of BYOL's and DINO's views
    (augment.py): random resized crop to ``size`` (area fraction in ``scale``), flips,
    any-angle rotation (``rotate``), per-channel intensity jitter with probability 0.8,
    Gaussian blur with probability ``blur_p``, Gaussian noise."""
    x = augment.random_resized_crop(images, size, scale, generator=generator)
    x = augment.random_flips(x, generator)
    if rotate:
        x = augment.random_rotation(x, generator)
    x = augment.random_intensity(x, generator, brightness=intensity, contrast=intensity)
    x = augment.gaussian_blur(x, generator, sigma=blur_sigma, p=blur_p)
    return augment.gaussian_noise(x, generator, std=noise_std)


def _check_fluorescence_view_options(
    method: str, scales: dict[str, Sequence[float]], intensity: float, blur_sigma: Sequence[float], noise_std
) -> None:
    """Fail at construction, not at the first batch, on bad view options (``scales``: option
    name -> crop scale range)."""
    probe = torch.full((2, 1, 8, 8), 0.5)
    generator = torch.Generator().manual_seed(0)
    try:
        for scale in scales.values():
            augment.random_resized_crop(probe, 8, scale, generator=generator)
        augment.random_intensity(probe, generator, brightness=intensity, contrast=intensity)
        augment.gaussian_blur(probe, generator, sigma=blur_sigma)
        augment.gaussian_noise(probe, generator, std=noise_std)
    except ValueError as error:
        names = ", ".join([*scales, "intensity", "blur_sigma", "noise_std"])
        raise ValueError(f"{method} view options ({names}): {error}") from error


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose weight is g * v / ||v|| per output row (weight
    normalization, Salimans & Kingma 2016), parameters ``weight_g`` (out, 1) and ``weight_v``
    (out, in) as torch's old ``weight_norm`` names them in DINO's checkpoints. ``g`` starts at
    1; with ``fixed_norm`` it stays there (DINO's ``norm_last_layer``), so every prototype is a
    unit vector and the logits are cosine similarities."""

    def __init__(self, in_dim: int, out_dim: int, *, fixed_norm: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fixed_norm)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True))


class DINOHead(nn.Module):
    """DINO's projection head: Linear(D, hidden) - GELU - Linear(hidden, hidden) - GELU -
    Linear(hidden, bottleneck), L2-normalised, then a weight-normalised Linear(bottleneck,
    out_dim) without bias (the prototypes). MLP weights truncated-normal (std 0.02), biases 0."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int, norm_last_layer: bool) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_norm=norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def dino_loss(
    student_logits: Tensor, teacher_logits: Tensor, center: Tensor, student_temp: float, teacher_temp: float, crops: int
) -> Tensor:
    """DINO's loss (Caron et al. 2021, algorithm 1) of a batch of B images.

    ``student_logits``: (crops x B, K), the crops of the batch one after the other (the two
    global crops first); ``teacher_logits``: (2 x B, K) of the two global crops. The teacher's
    distribution is softmax((t - center) / teacher_temp), the student's log-softmax(s /
    student_temp); the loss is the cross-entropy -sum_k q log p averaged over the batch, summed
    over every (teacher crop, student crop) pair of different crops and divided by the number
    of pairs (2 x crops - 2).
    """
    student = F.log_softmax(student_logits.float() / student_temp, dim=-1).chunk(crops)
    teacher = F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1).detach().chunk(2)
    total, pairs = student_logits.new_zeros((), dtype=torch.float32), 0
    for t_index, q in enumerate(teacher):
        for s_index, log_p in enumerate(student):
            if s_index != t_index:
                total = total + (-q * log_p).sum(dim=-1).mean()
                pairs += 1
    return total / pairs


class DINO(PretextMethod):
    """Self-distillation with no labels (DINO, Caron et al. 2021), for ViTs and CNNs alike.

    Student: backbone + DINOHead (``out_dim`` prototypes, ``hidden_dim``, ``bottleneck_dim``,
    ``norm_last_layer``); teacher: EMA copy of both, no gradient, evaluated as the run's
    backbone (``evaluation_backbone``). Each image gives 2 global crops (side ``global_size``,
    area fraction ``global_crop_scale``) and ``local_crops`` local crops (``local_size``,
    ``local_crop_scale``); the student sees all crops (one backbone pass per crop size), the
    teacher the two global ones; loss :func:`dino_loss`. Defaults are DINO's (main_dino.py):

    - crops: global (0.4, 1.0), 8 local crops (0.05, 0.4); ``global_size`` None = the input
      size, ``local_size`` None = 3/7 of it (DINO's 96 of 224 px) rounded to a multiple of the
      backbone's patch, at least its ``min_input_size``;
    - views: the fluorescence augmentations (``fluorescence_view``: crop, flips, any-angle
      rotation ``rotate``, per-channel intensity ``intensity``, blur with DINO's probabilities
      1.0 / 0.1 on the global crops and 0.5 on the local ones, noise ``noise_std``); no colour
      jitter, grey conversion or solarization, which mean nothing on fluorescence channels;
    - temperatures: student 0.1; teacher ``teacher_temp`` 0.04, reached linearly from
      ``warmup_teacher_temp`` over the first ``teacher_temp_warmup`` fraction of the steps
      (DINO's ViT-S/16 recipe: 0.04 -> 0.07 over 30 of 100 epochs, i.e. 0.3);
    - centring: ``center`` <- ``center_momentum`` (0.9) center + (1 - it) mean of the teacher's
      logits over the global batch (all-reduced over data-parallel ranks), updated in training
      mode only (validation leaves it alone);
    - teacher momentum: cosine from ``teacher_momentum`` (0.996) to 1 over the run;
    - gradients: each student parameter's gradient clipped to norm ``clip_grad`` (3.0; 0 = off;
      DINO clips per parameter), and the last layer's gradients dropped during the first
      ``freeze_last_layer`` fraction of the steps (DINO: 1 of 100 epochs, 0.01), which keeps
      the prototypes from moving while the rest is still random.

    Learning rate, its linear scaling with the batch, warm-up and the weight-decay schedule
    (0.04 -> 0.4) are run settings (config/experiments/dino_vit.yaml). Schedules read the
    buffers ``steps_done`` / ``total_steps``, kept in the state dict with ``center``, so a
    resumed run continues exactly. Metrics: loss, teacher_temp, teacher_momentum (rate of the
    last EMA update), teacher_entropy (mean entropy of the teacher's distribution: log(out_dim)
    when uniform, 0 when one prototype takes everything; both are collapses).
    """

    name = "dino"

    def __init__(
        self,
        backbone: Backbone,
        *,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        global_crop_scale: Sequence[float] = (0.4, 1.0),
        local_crop_scale: Sequence[float] = (0.05, 0.4),
        local_crops: int = 8,
        global_size: int | None = None,
        local_size: int | None = None,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        teacher_temp_warmup: float = 0.0,
        center_momentum: float = 0.9,
        teacher_momentum: float = 0.996,
        clip_grad: float = 3.0,
        freeze_last_layer: float = 0.01,
        rotate: bool = True,
        intensity: float = 0.4,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        noise_std: Sequence[float] = (0.0, 0.03),
    ) -> None:
        super().__init__(backbone)
        for option, value in (("student_temp", student_temp), ("teacher_temp", teacher_temp)):
            if not value > 0:
                raise ValueError(f"option {option} must be > 0, got {value!r}")
        if not warmup_teacher_temp > 0:
            raise ValueError(f"option warmup_teacher_temp must be > 0, got {warmup_teacher_temp!r}")
        for option, value in (
            ("teacher_temp_warmup", teacher_temp_warmup),
            ("freeze_last_layer", freeze_last_layer),
            ("center_momentum", center_momentum),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"option {option} must be in [0, 1], got {value!r}")
        if not 0.0 <= teacher_momentum < 1.0:
            raise ValueError(f"option teacher_momentum must be in [0, 1), got {teacher_momentum!r}")
        if not clip_grad >= 0:
            raise ValueError(f"option clip_grad must be >= 0 (0 = off), got {clip_grad!r}")
        if isinstance(local_crops, bool) or not isinstance(local_crops, int) or local_crops < 0:
            raise ValueError(f"option local_crops must be an integer >= 0, got {local_crops!r}")
        self.global_crop_scale = _pair("global_crop_scale", global_crop_scale)
        self.local_crop_scale = _pair("local_crop_scale", local_crop_scale)
        self.rotate, self.intensity = bool(rotate), float(intensity)
        self.blur_sigma, self.noise_std = _pair("blur_sigma", blur_sigma), _pair("noise_std", noise_std)
        scales = {"global_crop_scale": self.global_crop_scale, "local_crop_scale": self.local_crop_scale}
        _check_fluorescence_view_options("dino", scales, self.intensity, self.blur_sigma, self.noise_std)
        self.local_crops = local_crops
        self.global_size = None if global_size is None else self._crop_side("global_size", global_size)
        self.local_size = None if local_size is None else self._crop_side("local_size", local_size)
        self.student_temp, self.teacher_temp = float(student_temp), float(teacher_temp)
        self.warmup_teacher_temp, self.teacher_temp_warmup = float(warmup_teacher_temp), float(teacher_temp_warmup)
        self.center_momentum, self.teacher_momentum = float(center_momentum), float(teacher_momentum)
        self.clip_grad, self.freeze_last_layer = float(clip_grad), float(freeze_last_layer)
        self.head = DINOHead(
            backbone.feature_dim,
            _positive_int("out_dim", out_dim),
            _positive_int("hidden_dim", hidden_dim),
            _positive_int("bottleneck_dim", bottleneck_dim),
            bool(norm_last_layer),
        )
        self.teacher_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64))
        self.register_buffer("total_steps", torch.zeros((), dtype=torch.int64))

    @property
    def momentum(self) -> float:
        """The teacher's EMA rate at the last update (``teacher_momentum`` before the first)."""
        if int(self.total_steps) == 0:
            return self.teacher_momentum
        return cosine_schedule(self.teacher_momentum, 1.0, int(self.steps_done), int(self.total_steps))

    def _crop_side(self, option: str, side: int) -> int:
        multiple, smallest = self.backbone.input_multiple, self.backbone.min_input_size
        if isinstance(side, bool) or not isinstance(side, int) or side < smallest or side % multiple:
            raise ValueError(
                f"option {option} must be an integer >= {smallest} and a multiple of {multiple} "
                f"({self.backbone.name}), got {side!r}"
            )
        return side

    def crop_sizes(self, height: int, width: int) -> tuple[int, int]:
        """(global, local) crop sides for H x W inputs (see the class docstring)."""
        global_size = self.global_size or min(height, width)
        if self.local_size is not None:
            return global_size, self.local_size
        multiple = self.backbone.input_multiple
        local = max(self.backbone.min_input_size, multiple * round(global_size * 3 / 7 / multiple))
        return global_size, local

    def teacher_temperature(self, step: int, total_steps: int) -> float:
        """Teacher temperature at the 0-based step ``step``: linear warm-up, then constant."""
        warmup = self.teacher_temp_warmup * total_steps
        if warmup <= 0 or step >= warmup:
            return self.teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * step / warmup

    def views(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """(2B global crops, global crop 1 of every image first; N B local crops or None)."""
        global_size, local_size = self.crop_sizes(*images.shape[2:])
        options = {
            "rotate": self.rotate,
            "intensity": self.intensity,
            "blur_sigma": self.blur_sigma,
            "noise_std": self.noise_std,
        }
        globals_ = [
            fluorescence_view(
                images, generator, size=global_size, scale=self.global_crop_scale, blur_p=blur_p, **options
            )
            for blur_p in (1.0, 0.1)
        ]
        locals_ = [
            fluorescence_view(images, generator, size=local_size, scale=self.local_crop_scale, blur_p=0.5, **options)
            for _ in range(self.local_crops)
        ]
        return _like(torch.cat(globals_), images), _like(torch.cat(locals_), images) if locals_ else None

    def loss(self, images: Tensor, labels: Tensor | None, generator: torch.Generator) -> LossResult:
        _check_images(images, self.backbone)
        global_views, local_views = self.views(images, generator)
        features = self.backbone(global_views)
        if local_views is not None:
            features = torch.cat([features, self.backbone(local_views)])
        student = self.head(features)
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(global_views)).float()
        temperature = self.teacher_temperature(int(self.steps_done), int(self.total_steps))
        loss = dino_loss(student, teacher, self.center, self.student_temp, temperature, 2 + self.local_crops)
        probabilities = F.softmax((teacher - self.center) / temperature, dim=-1)
        entropy = -(probabilities * probabilities.clamp_min(1e-30).log()).sum(dim=-1).mean()
        if self.training:
            self.update_center(teacher)
        return loss, {
            "loss": loss.item(),
            "teacher_temp": temperature,
            "teacher_momentum": self.momentum,
            "teacher_entropy": entropy.item(),
        }

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """center <- m center + (1 - m) mean teacher logit over the global batch of all ranks."""
        total = teacher_logits.sum(dim=0, keepdim=True)
        count = teacher_logits.shape[0]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)

    @torch.no_grad()
    def before_optimizer_step(self, step: int, total_steps: int) -> None:
        if self.clip_grad > 0:
            for parameter in self.trainable_parameters():
                if parameter.grad is not None:
                    norm = parameter.grad.norm()
                    parameter.grad.mul_(torch.clamp(self.clip_grad / (norm + 1e-6), max=1.0))
        if step <= self.freeze_last_layer * total_steps:
            for parameter in self.head.last_layer.parameters():
                parameter.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        self.steps_done.fill_(step)
        self.total_steps.fill_(total_steps)
        ema_update((self.teacher_backbone, self.teacher_head), (self.backbone, self.head), self.momentum)

    def evaluation_backbone(self) -> Backbone:
        return self.teacher_backbone


# Neighbour positions relative to the centre patch: class index -> (rows, columns) in cells.
POSITIONS = ("up", "down", "left", "right")
_OFFSETS = ((-1, 0), (1, 0), (0, -1), (0, 1))


@dataclass(frozen=True)
class PatchGeometry:
    """Where the patches of an image lie (pixels).

    The image's central square of 3 x 3 cells of side ``cell`` is the seed's grid (its 400 px
    image sliced into 133 px cells); each patch is its cell minus ``trim`` on every side (the
    seed's 15 px edge crop), so neighbouring patches are ``gap = 2 trim`` apart and cannot be
    matched by continuity across a shared border. Patches move by up to ``jitter`` px per axis
    (at most ``trim``, so they stay inside their cells).
    """

    cell: int
    trim: int
    patch: int
    jitter: int
    top: int  # row of the centre patch's top-left corner before jitter
    left: int

    @property
    def gap(self) -> int:
        return 2 * self.trim


def patch_geometry(
    height: int,
    width: int,
    *,
    cell_fraction: float = 1 / 3,
    edge_trim: float = 15 / 133,
    jitter: float = 0.0,
    min_patch: int = 1,
) -> PatchGeometry:
    """Patch layout for an H x W image: cell = floor(min(H, W) cell_fraction), trim =
    round(cell edge_trim), patch = cell - 2 trim, jitter = floor(cell jitter). The defaults are
    the seed's (cells a third of the image, 15 of 133 px trimmed, no jitter). Raises ValueError
    when the patch is below ``min_patch`` px or the jitter exceeds the trim.
    """
    if not 0.0 < cell_fraction <= 1 / 3:
        raise ValueError(f"option cell_fraction must be in (0, 1/3] (3 cells per side), got {cell_fraction!r}")
    if not 0.0 <= edge_trim < 0.5:
        raise ValueError(f"option edge_trim must be in [0, 0.5), got {edge_trim!r}")
    if jitter < 0.0:
        raise ValueError(f"option jitter must be >= 0, got {jitter!r}")
    cell = math.floor(min(height, width) * cell_fraction)
    trim = round(cell * edge_trim)
    patch = cell - 2 * trim
    jitter_px = math.floor(cell * jitter)
    if patch < max(min_patch, 1):
        raise ValueError(
            f"patch_location: {height}x{width} images give {patch} px patches (cell {cell} px, trim {trim} px), "
            f"below the minimum of {min_patch} px; use larger images or a larger cell_fraction / smaller edge_trim"
        )
    if jitter_px > trim:
        raise ValueError(
            f"patch_location: jitter {jitter_px} px exceeds the edge trim {trim} px "
            f"(patches would leave their cells); lower jitter or raise edge_trim"
        )
    top = (height - 3 * cell) // 2 + cell + trim
    left = (width - 3 * cell) // 2 + cell + trim
    return PatchGeometry(cell, trim, patch, jitter_px, top, left)


class PatchLocation(PretextMethod):
    """Relative patch location (Doersch et al. 2015, seed 000), 4 neighbours.

    For each image a centre patch and one of its up/down/left/right neighbours (uniformly at
    random) are cut out (see PatchGeometry; the options ``cell_fraction``, ``edge_trim`` and
    ``jitter`` are fractions of the image side / cell side, since images here are 64-128 px,
    not the seed's 400 px). The backbone encodes both (shared weights), the two pooled
    embeddings are concatenated [centre, neighbour] and a classifier predicts the position
    (class index into POSITIONS). Classifier as the seed's dense top: Linear(2D, hidden) -
    BatchNorm - ReLU - Dropout - Linear(hidden, hidden) - BatchNorm - ReLU - Linear(hidden, 4),
    hidden 16 (the seed lists no activations or dropout rate; ReLU and ``dropout=0`` here).
    Patches must be at least the backbone's ``min_input_size``. Metrics: loss, accuracy.
    """

    name = "patch_location"

    def __init__(
        self,
        backbone: Backbone,
        *,
        cell_fraction: float = 1 / 3,
        edge_trim: float = 15 / 133,
        jitter: float = 0.0,
        hidden: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(backbone)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"option dropout must be in [0, 1), got {dropout!r}")
        hidden = _positive_int("hidden", hidden)
        self.geometry_options = {"cell_fraction": cell_fraction, "edge_trim": edge_trim, "jitter": jitter}
        patch_geometry(1024, 1024, **self.geometry_options)  # validates the options now
        dim = backbone.feature_dim
        self.classifier = nn.Sequential(
            nn.Linear(2 * dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, len(POSITIONS)),
        )

    def geometry(self, height: int, width: int) -> PatchGeometry:
        return patch_geometry(height, width, **self.geometry_options, min_patch=self.backbone.min_input_size)

    def sample_pairs(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """(centre, neighbour, position): two (B, C, P, P) patch batches and (B,) class indices."""
        batch, _, height, width = images.shape
        geometry = self.geometry(height, width)
        device = images.device
        position = augment.draw(
            lambda size: torch.randint(len(POSITIONS), size, generator=generator, device=generator.device),
            (batch,),
            0,
            device,
        )
        offsets = torch.tensor(_OFFSETS, device=device)[position] * geometry.cell  # (B, 2)
        shifts = augment.draw(
            lambda size: torch.randint(
                -geometry.jitter, geometry.jitter + 1, size, generator=generator, device=generator.device
            ),
            (2, batch, 2),
            1,
            device,
        )
        corner = torch.tensor([geometry.top, geometry.left], device=device)
        centre = _cut_patches(images, corner + shifts[0], geometry.patch)
        neighbour = _cut_patches(images, corner + offsets + shifts[1], geometry.patch)
        return centre, neighbour, position

    def forward(self, centre: Tensor, neighbour: Tensor) -> Tensor:
        """Two (B, C, P, P) patch batches -> (B, 4) position logits."""
        batch = centre.shape[0]
        features = self.backbone(torch.cat([centre, neighbour]))  # one pass through the shared encoder
        return self.classifier(torch.cat([features[:batch], features[batch:]], dim=1))

    def loss(self, images: Tensor, labels: Tensor | None, generator: torch.Generator) -> LossResult:
        _check_images(images, self.backbone)
        centre, neighbour, position = self.sample_pairs(images, generator)
        logits = self(_like(centre, images), _like(neighbour, images)).float()
        loss = F.cross_entropy(logits, position)
        return loss, {"loss": loss.item(), "accuracy": _accuracy(logits, position)}


def _cut_patches(images: Tensor, corners: Tensor, size: int) -> Tensor:
    """(B, C, H, W) and (B, 2) top-left (row, col) corners -> (B, C, size, size) crops."""
    steps = torch.arange(size, device=images.device)
    rows = (corners[:, 0, None] + steps)[:, :, None]  # (B, size, 1)
    cols = (corners[:, 1, None] + steps)[:, None, :]  # (B, 1, size)
    batch_index = torch.arange(images.shape[0], device=images.device)[:, None, None]
    return images[batch_index, :, rows, cols].permute(0, 3, 1, 2).contiguous()  # indexing puts C last


class Autoencoder(PretextMethod):
    """Convolutional autoencoder (seed 004) with the backbone as encoder.

    Encoder: backbone -> pooled features -> Linear(D, latent_dim) (the latent, 150 in the seed;
    linear here where the seed's last dense layer had a ReLU, so no latent unit can die).
    Decoder, as the seed's: Linear(latent, 256) - Linear(256, 32 g_h g_w) - ReLU - reshape to
    (32, g_h, g_w) with g = ceil(image_size / 8), then three times nearest 2x upsampling +
    3x3 transposed convolution (32, 64, 128 channels; BatchNorm + ReLU, ReLU on the last) and a
    1x1 convolution to C channels with a sigmoid. The decoder is sized for ``image_size`` (the
    training size; the seed's 128 by default); its output is resized bilinearly to the input
    size when that differs. Loss ``loss="mse"`` (mean squared error) or "bce" (binary
    cross-entropy, the seed's choice). No augmentation: ``generator`` is unused.
    Metrics: loss, mse.
    """

    name = "autoencoder"

    def __init__(
        self, backbone: Backbone, *, latent_dim: int = 150, image_size: int | Sequence[int] = 128, loss: str = "mse"
    ) -> None:
        super().__init__(backbone)
        latent_dim = _positive_int("latent_dim", latent_dim)
        sizes = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(sizes) != 2 or not all(isinstance(s, int) and s >= 8 for s in sizes):
            raise ValueError(f"option image_size must be an integer or (height, width) pair >= 8, got {image_size!r}")
        if loss not in ("mse", "bce"):
            raise ValueError(f"option loss must be 'mse' or 'bce', got {loss!r}")
        self.image_size = sizes
        self.loss_kind = loss
        self.latent_dim = latent_dim
        self.grid = tuple(math.ceil(s / 8) for s in sizes)
        self.to_latent = nn.Linear(backbone.feature_dim, latent_dim)
        self.expand = nn.Sequential(
            nn.Linear(latent_dim, 256), nn.Linear(256, 32 * self.grid[0] * self.grid[1]), nn.ReLU(inplace=True)
        )
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.ConvTranspose2d(32, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Upsample(scale_factor=2),
            nn.ConvTranspose2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.Upsample(scale_factor=2),
            nn.ConvTranspose2d(64, 128, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, backbone.in_channels, 1),
        )

    def encode_latent(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, latent_dim) latent codes."""
        return self.to_latent(self.backbone(images))

    def decode_logits(self, latent: Tensor, size: tuple[int, int]) -> Tensor:
        """(B, latent_dim) -> (B, C, H, W) reconstruction logits (before the sigmoid)."""
        x = self.expand(latent).reshape(latent.shape[0], 32, *self.grid)
        logits = self.decoder(x)
        if tuple(logits.shape[2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W) reconstruction in [0, 1]."""
        return torch.sigmoid(self.decode_logits(self.encode_latent(images), tuple(images.shape[2:])))

    def reconstruction_loss(self, latent: Tensor, images: Tensor) -> tuple[Tensor, Tensor]:
        """(the ``loss`` option's reconstruction loss, the mean squared error) of ``images`` from ``latent``."""
        logits = self.decode_logits(latent, tuple(images.shape[2:])).float()
        target = images.float()
        mse = F.mse_loss(torch.sigmoid(logits), target)
        # BCE from logits: stable, and allowed under autocast (plain BCE is not).
        loss = mse if self.loss_kind == "mse" else F.binary_cross_entropy_with_logits(logits, target)
        return loss, mse

    def loss(self, images: Tensor, labels: Tensor | None, generator: torch.Generator) -> LossResult:
        _check_images(images, self.backbone)
        loss, mse = self.reconstruction_loss(self.encode_latent(images), images)
        return loss, {"loss": loss.item(), "mse": mse.item()}


# --------------------------------------------------------------------------- DEC


def log_soft_assignment(latent: Tensor, centres: Tensor, alpha: float = 1.0) -> Tensor:
    """log q for DEC's soft assignment (Xie et al. 2016, eq. 1): (N, D) codes, (K, D) centres -> (N, K).

    q_ij = (1 + |z_i - mu_j|^2 / alpha)^(-(alpha + 1) / 2), normalised over j: a Student's t
    kernel with ``alpha`` degrees of freedom. Computed in log space (log1p, log_softmax), so far
    codes do not underflow; float32.
    """
    distance = (latent.float()[:, None, :] - centres.float()[None, :, :]).square().sum(dim=-1)
    return torch.log_softmax(-(alpha + 1) / 2 * torch.log1p(distance / alpha), dim=1)


def soft_assignment(latent: Tensor, centres: Tensor, alpha: float = 1.0) -> Tensor:
    """DEC's soft assignment q (rows sum to 1); see log_soft_assignment."""
    return log_soft_assignment(latent, centres, alpha).exp()


def target_distribution(q: Tensor, frequencies: Tensor | None = None) -> Tensor:
    """DEC's target (eq. 3): p_ij = (q_ij^2 / f_j) / sum_j' (q_ij'^2 / f_j'), f_j = sum_i q_ij.

    Squaring sharpens confident assignments; dividing by the soft cluster frequency f keeps
    large clusters from taking over. ``frequencies`` replaces f (validation batches use the
    training set's).
    """
    f = q.sum(dim=0) if frequencies is None else frequencies
    weight = q.square() / f
    return weight / weight.sum(dim=1, keepdim=True)


def kl_divergence(target: Tensor, log_q: Tensor) -> Tensor:
    """KL(P || Q) = sum_j p_ij log(p_ij / q_ij), averaged over the rows (0 log 0 = 0)."""
    return (torch.xlogy(target, target) - target * log_q).sum(dim=1).mean()


STAGES = ("pretrain", "clustering", "converged")


class DEC(Autoencoder):
    """Deep embedded clustering (Xie, Girshick and Farhadi, ICML 2016), as seed 000 ran it on a
    ResNet autoencoder: the autoencoder method, then a clustering layer trained with it.

    Stage 1, steps 1 to ``pretrain_steps``: the autoencoder as it is (Autoencoder: encoder =
    backbone + linear latent of ``latent_dim``, decoder, ``loss`` mse or bce). The latent is 10-D
    by default, DEC's embedding size (the autoencoder's seed-004 default is 150).

    Initialisation, after step ``pretrain_steps``: every training crop is encoded (eval mode,
    the crop of epoch 0; ``TrainingSet.encode``) and k-means (``n_clusters``, ``kmeans_restarts``
    k-means++ starts seeded by the run's seed, least inertia kept; core.kmeans.kmeans) on the
    codes gives the centres mu, a trainable (n_clusters, latent_dim) parameter.

    Stage 2, self-training: soft assignments q of the codes to the centres (Student's t with
    ``alpha`` degrees of freedom, log_soft_assignment), a target p = target_distribution(q)
    computed over the whole training set and held fixed for ``update_interval`` steps; the loss
    of a batch is KL(p || q) of its crops (kl_divergence; p looked up by crop id), plus
    ``reconstruction_weight`` times the reconstruction loss (IDEC, Guo et al. 2017, used 0.1;
    0 = DEC as published, and the decoder then rests). Encoder and centres learn together.
    Every ``update_interval`` steps the targets are recomputed from the whole training set;
    when the share of crops whose hard assignment (argmax q) changed since the last update is
    below ``tol`` (DEC's 0.1 %), training stops: ``stopped`` ends the run before ``steps``.

    The whole-set passes run the encoder in eval mode (BatchNorm running statistics), so a
    crop's code does not depend on its batch; training steps use batch statistics, as every
    method here. Validation batches, whose crops have no stored target, are scored against
    the target of their own q with the training set's cluster frequencies f.

    Checkpoints keep the stage, the crop ids, the last targets, frequencies and hard
    assignments and the history of updates (training_state), so a killed run resumes exactly.
    Outputs (write_outputs, from a last pass with the final weights): ``clusters.parquet``
    (crop_id, cluster, confidence = largest q) and ``centres.tsv`` (cluster, n_crops, z_0 ...).
    Metrics: loss, stage (1 or 2; an interval mean between them is the share of its steps in
    stage 2), mse in stage 1 (and in stage 2 with a reconstruction weight), kl in stage 2.
    """

    name = "dec"
    may_leave_parameters_unused = True  # centres in stage 1, the decoder in stage 2
    assigns_clusters = True

    def __init__(
        self,
        backbone: Backbone,
        *,
        n_clusters: int,
        pretrain_steps: int,
        update_interval: int = 140,
        tol: float = 0.001,
        alpha: float = 1.0,
        reconstruction_weight: float = 0.0,
        kmeans_restarts: int = 20,
        latent_dim: int = 10,
        image_size: int | Sequence[int] = 128,
        loss: str = "mse",
    ) -> None:
        super().__init__(backbone, latent_dim=latent_dim, image_size=image_size, loss=loss)
        self.n_clusters = _positive_int("n_clusters", n_clusters)
        if self.n_clusters < 2:
            raise ValueError(f"option n_clusters must be at least 2, got {n_clusters!r}")
        if isinstance(pretrain_steps, bool) or not isinstance(pretrain_steps, int) or pretrain_steps < 0:
            raise ValueError(f"option pretrain_steps must be an integer >= 0, got {pretrain_steps!r}")
        self.pretrain_steps = pretrain_steps
        self.update_interval = _positive_int("update_interval", update_interval)
        self.kmeans_restarts = _positive_int("kmeans_restarts", kmeans_restarts)
        self.tol = _number("tol", tol, 0.0, 1.0)
        self.alpha = _number("alpha", alpha, 0.0, math.inf, low_included=False)
        self.reconstruction_weight = _number("reconstruction_weight", reconstruction_weight, 0.0, math.inf)
        self.centres = nn.Parameter(torch.zeros(self.n_clusters, latent_dim))
        self.load_training_state({})
        self._batch_targets: Tensor | None = None

    # ---------------------------------------------------------------- course of training

    def training_state(self) -> dict:
        return {
            "stage": self.stage,
            "crop_ids": list(self.crop_ids),
            "targets": self.targets,
            "frequencies": self.frequencies,
            "assignments": self.assignments,
            "updates": [dict(update) for update in self.updates],
        }

    def load_training_state(self, state: dict) -> None:
        self.stage: str = state.get("stage", STAGES[0])
        if self.stage not in STAGES:
            raise ValueError(f"dec: unknown stage {self.stage!r} in the checkpoint")
        self.crop_ids: list[str] = list(state.get("crop_ids", []))
        self._rows = {crop_id: row for row, crop_id in enumerate(self.crop_ids)}
        self.targets: Tensor | None = state.get("targets")  # (N, K), rows in crop_ids order
        self.frequencies: Tensor | None = state.get("frequencies")  # (K,) soft cluster sizes f
        self.assignments: Tensor | None = state.get("assignments")  # (N,) argmax q at the last update
        self.updates: list[dict] = [dict(update) for update in state.get("updates", [])]

    @property
    def stopped(self) -> bool:
        return self.stage == "converged"

    def after_step(self, step: int, total_steps: int, training_set: TrainingSet) -> None:
        if step == 0 and self.pretrain_steps >= total_steps:
            raise ValueError(
                f"dec: pretrain_steps ({self.pretrain_steps}) must be below the run's steps ({total_steps}), "
                "or the clustering stage never starts"
            )
        if self.stage == "pretrain" and step == self.pretrain_steps:
            crop_ids, codes = training_set.encode(self.encode_latent)
            if len(crop_ids) < self.n_clusters:
                raise ValueError(f"dec: {len(crop_ids)} training crops cannot make {self.n_clusters} clusters")
            _, centres = kmeans(codes.numpy(), self.n_clusters, restarts=self.kmeans_restarts, seed=training_set.seed)
            with torch.no_grad():
                self.centres.copy_(torch.from_numpy(centres))
            self.crop_ids = crop_ids
            self._rows = {crop_id: row for row, crop_id in enumerate(crop_ids)}
            self._set_targets(codes, step)
            self.stage = "clustering"
        elif self.stage == "clustering" and (step - self.pretrain_steps) % self.update_interval == 0:
            crop_ids, codes = training_set.encode(self.encode_latent)
            if crop_ids != self.crop_ids:
                raise ValueError("dec: the training set's crops changed since the clustering stage began")
            previous = self.assignments
            self._set_targets(codes, step)
            changed = (self.assignments != previous).double().mean().item()
            self.updates[-1]["changed"] = changed
            if changed < self.tol:
                self.stage = "converged"

    def _set_targets(self, codes: Tensor, step: int) -> None:
        q = soft_assignment(codes, self.centres.detach().cpu(), self.alpha)
        self.frequencies = q.sum(dim=0)
        self.targets = target_distribution(q, self.frequencies)
        self.assignments = q.argmax(dim=1)
        self.updates.append({"step": step, "changed": None})

    def begin_batch(self, crop_ids: Sequence[str]) -> None:
        if self.stage == "pretrain":
            self._batch_targets = None
            return
        try:
            rows = [self._rows[crop_id] for crop_id in crop_ids]
        except KeyError as missing:
            raise ValueError(f"dec: crop {missing.args[0]!r} is not among the training crops of the targets") from None
        self._batch_targets = self.targets[rows].to(self.centres.device)

    # ---------------------------------------------------------------- loss

    def loss(self, images: Tensor, labels: Tensor | None, generator: torch.Generator) -> LossResult:
        if self.stage == "pretrain":
            loss, metrics = super().loss(images, labels, generator)
            return loss, {**metrics, "stage": 1.0}
        _check_images(images, self.backbone)
        latent = self.encode_latent(images)
        log_q = log_soft_assignment(latent, self.centres, self.alpha)
        if self.training:
            target, self._batch_targets = self._batch_targets, None
            if target is None or len(target) != len(images):
                raise ValueError("dec: begin_batch(crop_ids) must name the batch's crops before a training step")
        else:
            target = target_distribution(log_q.detach().exp(), self.frequencies.to(log_q.device))
        kl = kl_divergence(target, log_q)
        metrics = {"kl": kl.item(), "stage": 2.0}
        loss = kl
        if self.reconstruction_weight > 0:
            reconstruction, mse = self.reconstruction_loss(latent, images)
            loss = kl + self.reconstruction_weight * reconstruction
            metrics["mse"] = mse.item()
        return loss, {"loss": loss.item(), **metrics}

    # ---------------------------------------------------------------- results

    def describe(self, steps: int) -> dict:
        last_pretrain = min(self.pretrain_steps, steps)
        stages = [{"stage": "pretrain", "first_step": 1, "last_step": last_pretrain}] if last_pretrain else []
        if steps > self.pretrain_steps:
            stages.append({"stage": "clustering", "first_step": self.pretrain_steps + 1, "last_step": steps})
        return {
            "stages": stages,
            "n_clusters": self.n_clusters,
            "converged": self.stopped,
            "target_updates": [dict(update) for update in self.updates],
        }

    def assign(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        """The hard cluster (argmax q) and the confidence (largest q) of each latent code, on the CPU."""
        confidence, cluster = soft_assignment(latent.float().cpu(), self.centres.detach().cpu(), self.alpha).max(dim=1)
        return cluster, confidence

    def write_outputs(self, training_set: TrainingSet, out_dir: Path | None) -> dict[str, str]:
        crop_ids, codes = training_set.encode(self.encode_latent)
        cluster, confidence = self.assign(codes)
        if out_dir is None:
            return {}
        paths = {"clusters": Path(out_dir) / "clusters.parquet", "centres": Path(out_dir) / "centres.tsv"}
        clusters = pd.DataFrame(
            {"crop_id": crop_ids, "cluster": cluster.numpy().astype(np.int32), "confidence": confidence.numpy()}
        )
        write_table(clusters, paths["clusters"])
        centres = pd.DataFrame(self.centres.detach().cpu().double().numpy())
        centres.columns = [f"z_{k}" for k in range(centres.shape[1])]
        centres.insert(0, "n_crops", np.bincount(cluster.numpy(), minlength=self.n_clusters))
        centres.insert(0, "cluster", np.arange(self.n_clusters))
        write_table(centres, paths["centres"])
        return {name: str(path) for name, path in paths.items()}


METHODS: dict[str, type[PretextMethod]] = {
    cls.name: cls for cls in (WeakLabel, BYOL, PatchLocation, Autoencoder, DINO, DEC)
}


def method_options(name: str) -> tuple[str, ...]:
    """The option names ``build_method`` accepts for method ``name``."""
    if name not in METHODS:
        raise ValueError(f"unknown pretext method {name!r}; choose one of {', '.join(METHODS)}")
    parameters = inspect.signature(METHODS[name]).parameters
    return tuple(p for p in parameters if p not in ("backbone", "n_classes"))


def required_options(name: str) -> tuple[str, ...]:
    """The options method ``name`` has no default for (DEC's n_clusters and pretrain_steps)."""
    parameters = inspect.signature(METHODS[name]).parameters
    return tuple(p for p in method_options(name) if parameters[p].default is inspect.Parameter.empty)


def build_method(name: str, backbone: Backbone, *, n_classes: int | None = None, **options) -> PretextMethod:
    """The pretext method ``name`` around ``backbone``.

    ``n_classes`` (number of weak labels) is required by weak_label and ignored by the other
    methods, so a loop may pass it always. Unknown or missing options raise ValueError naming them.
    """
    allowed = method_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for pretext method {name!r}; "
            f"allowed: {', '.join(allowed) or 'none'}"
        )
    missing = [option for option in required_options(name) if option not in options]
    if missing:
        raise ValueError(f"pretext method {name!r} needs option(s) {', '.join(missing)}")
    if METHODS[name].needs_labels:
        return METHODS[name](backbone, n_classes, **options)
    return METHODS[name](backbone, **options)
