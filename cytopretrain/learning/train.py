"""Pretraining loop with checkpoints that resume exactly.

``train(settings, shards_dir, out_dir)`` trains ``build_method(settings["method"],
build_backbone(...))`` on the train split of a shard folder (``cytopretrain.learning.data``) for
``settings["steps"]`` optimizer steps and writes into ``out_dir``::

    checkpoints/step-NNNNNNN.pt   the last two checkpoints (see below)
    checkpoints/best-NNNNNNN.pt   the evaluated backbone at the best validation so far
    metrics.jsonl                 one JSON object per logged step
    backbone.pt                   the evaluated backbone's state dict (torch.load(..., weights_only=True))
    best_backbone.pt              the same at the best step (see "Monitors")
    method.pt                     whole method state dict (heads, BYOL target, ...)
    model_card.json               what was trained on what, with which settings and result

Settings: ``learning.settings`` (DEFAULTS, with a comment per key; ``method`` and ``backbone``
are required). The autoencoder's ``image_size`` option defaults to the training image_size;
validation also runs at the last step, and only if a validation split exists. The evaluated
backbone is ``PretextMethod.evaluation_backbone()``: DINO's teacher, the backbone otherwise.

Optimizer: the weights of dimension >= 2 form the group with weight decay (``apply_decay``),
biases and normalisation parameters the group without (as BYOL and DINO exclude them); with
``lars`` the second group also skips the trust ratio (``learning.optim.LARS``). The peak
learning rate is ``lr``, or ``lr`` x global batch / 256 with ``lr_scaling: linear``; it warms
up linearly over ``warmup_steps`` and then follows a cosine to 0. With ``weight_decay_end`` the
weight decay follows a cosine from ``weight_decay`` to it (``learning.optim.cosine_schedule``
of the 0-based step). After the backward pass (and the loss scaler's unscaling) the loop calls
``method.before_optimizer_step`` (DINO's gradient clipping and frozen last layer), after the
optimizer step ``method.after_optimizer_step`` (EMA networks).

Devices and precision follow ``core.devices`` (one rule for training and extraction): auto is
bf16 autocast on a GPU that supports it, float16 with a GradScaler on an older GPU, fp32 on the
CPU; bf16 on a GPU without it is an error. Under autocast, and always on CUDA, the model and
batches use the channels_last layout.

Validation (every ``validate_every`` steps and at the end, if the shards have a validation
split): the method's loss and metrics in eval mode over every validation sample, with the
crops of epoch 0 and a freshly seeded augmentation generator each time, so values are
comparable between steps; logged as ``val_<metric>``. It saves and restores every random
state, so validating (or not) never changes the training run.

Monitors (``learning.monitors``): each validation also logs ``val_embedding_std`` (collapse)
and ``val_knn_accuracy`` (leave-one-out kNN of the evaluated backbone's features against the
validation split's weak labels, only watched). The step with the highest kNN accuracy is the
best: its evaluated backbone is written to ``checkpoints/best-<step>.pt`` and, at the end, to
``best_backbone.pt``; without a validation split or with a single weak label there is no
monitor and ``best_backbone.pt`` is the last backbone (the model card's ``best`` says which and
why). A collapsing embedding or a validation loss that rose at several validations in a row
is logged as a warning (logger ``cytopretrain.learning.train``), returned in ``warnings`` and
kept in the model card. Checkpoints hold the monitors' state, and a resumed run deletes best
files its checkpoint does not name, so it ends with the best of the uninterrupted run.

Methods that need the whole training set (DEC's k-means and targets) get it through the hooks
of ``learning.pretext`` (its module docstring): ``after_step`` after every optimizer step (and
at step 0 of a fresh run) with a WholeTrainingSet, ``begin_batch`` with the crop ids of each
training batch, ``stopped`` to end the run early (the step is then logged, validated and
checkpointed as a last step, and ``train`` reports the run finished), ``training_state`` in
the checkpoints, ``describe`` in the model card (``method_details``) and ``write_outputs`` for
files beside the backbone. Log records average each metric over the steps that reported it.

Checkpoints hold the whole method state dict, optimizer, scheduler (and GradScaler), step,
epoch, batches done in the epoch, the random states of every rank (torch CPU and CUDA,
numpy, python, the augmentation generator), the metric sums of the current log interval, the
method's ``training_state()`` and a hash of the settings that shape the run (all but
log_every, checkpoint_every, validate_every, progress and num_workers). They are written atomically and only the newest
two are kept; all load with ``weights_only=True``.

Resume (``resume=True``): the newest checkpoint that loads is used; unreadable ones are
renamed ``*.corrupt`` with a warning. Settings whose hash differs from the checkpoint's, a
different shard index or a different number of ranks raise ValueError. metrics.jsonl loses
the records after the checkpoint's step and is then appended. ``resume=False`` deletes the
checkpoints and metrics of an earlier run in ``out_dir``.

Determinism: data order, crops and augmentations are functions of the seed and the step, not
of ``num_workers`` or of interruptions. On the CPU a rerun, and a run stopped at any point
(killed or by ``max_steps_this_run``) and resumed, end with bitwise identical weights on the
same machine and thread count. On CUDA the same holds up to non-deterministic kernels, unless
``deterministic`` is set, which calls ``torch.use_deterministic_algorithms(True)``.

Distributed data parallel: under torchrun (``WORLD_SIZE`` > 1 in the environment, or
``distributed=True``; ``cytopretrain.learning.distributed.launch`` starts it) the loop joins the
process group (NCCL on CUDA, gloo on the CPU) and wraps the method in
DistributedDataParallel; only rank 0 writes files. It is built so that R ranks of
``batch_size`` B compute what one process of batch R x B computes:

- data: every rank follows the one-process stream of global batches of R x B and decodes
  only its part (``cytopretrain.learning.data``, "Parts");
- augmentations: the ranks share one augmentation generator and draw for the global batch,
  each keeping its slice (``cytopretrain.learning.augment.batch_part``);
- batch norm: statistics over the global batch (``cytopretrain.learning.distributed``);
- gradients: each rank's loss is the mean over its part and DDP averages the gradients,
  which is the gradient of the mean over the global batch.

So the logged loss and the final weights equal those of the one-process run up to float
rounding (tested with 2 gloo processes). Two things stay per rank: validation, where each
rank takes its own validation shards (means summed over ranks, so every sample counts
once), and torch's global random stream, which only stochastic depth and dropout use
(EfficientNet and DenseNet backbones); with those layers runs agree in distribution, not
number for number.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from cytopretrain.core.devices import autocast_dtype, resolve_device
from cytopretrain.core.errors import SettingsError
from cytopretrain.core.tables import atomic_path, file_sha256
from cytopretrain.curation.shards import load_index, load_labels
from cytopretrain.learning import augment, data
from cytopretrain.learning.checkpoints import (
    CHECKPOINT_FORMAT,
    backbone_file,
    best_path,
    capture_rng,
    check_resumable,
    checkpoint_path,
    derive_seed,
    list_checkpoints,
    load_newest_checkpoint,
    prune_best,
    read_metrics,
    restore_rng,
    seed_everything,
    truncate_metrics,
    write_checkpoint,
)
from cytopretrain.learning.distributed import convert_batchnorm
from cytopretrain.learning.models import build_backbone, save_backbone
from cytopretrain.learning.monitors import MONITOR, Monitors, embedding_std, knn_accuracy
from cytopretrain.learning.optim import LARS, cosine_schedule
from cytopretrain.learning.pretext import PretextMethod, build_method, method_options
from cytopretrain.learning.settings import check_settings, config_hash, trajectory_hash

log = logging.getLogger(__name__)


def peak_lr(settings: dict, world_size: int = 1) -> float:
    """The peak learning rate: ``lr``, times global batch / 256 with ``lr_scaling: linear``."""
    if settings["lr_scaling"] == "linear":
        return settings["lr"] * settings["batch_size"] * world_size / 256
    return settings["lr"]


def weight_decay_at(settings: dict, step: int) -> float:
    """Weight decay of the 0-based optimizer step ``step`` (constant without ``weight_decay_end``)."""
    if settings["weight_decay_end"] is None:
        return settings["weight_decay"]
    return cosine_schedule(settings["weight_decay"], settings["weight_decay_end"], step, settings["steps"])


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based): linear warmup, cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------- runtime


@dataclass
class Runtime:
    """Where this process trains: device, precision, and its place among the ranks."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    joined_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def make_runtime(device: str, precision: str, deterministic: bool, distributed: bool | None) -> Runtime:
    if distributed is None:
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    target = resolve_device(device)
    joined = False
    rank, world_size = 0, 1
    if distributed:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
            joined = True
        rank, world_size = dist.get_rank(), dist.get_world_size()
    if target.type == "cuda":
        if distributed:
            target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        elif target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(target)
        _configure_cuda(deterministic)
    amp_dtype = autocast_dtype(target, precision)
    channels_last = target.type == "cuda" or amp_dtype is not None
    return Runtime(target, rank, world_size, amp_dtype, channels_last, joined)


def _configure_cuda(deterministic: bool) -> None:
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        # cuBLAS needs this workspace setting for reproducible results.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)


# --------------------------------------------------------------------------- model


class _LossModule(nn.Module):
    """forward = method.loss, so DistributedDataParallel sees the call and syncs gradients."""

    def __init__(self, method: PretextMethod) -> None:
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        return self.method.loss(images, labels, generator)


def build_model(settings: dict, n_classes: int) -> PretextMethod:
    backbone = build_backbone(
        settings["backbone"], in_channels=settings["in_channels"], weights=settings["weights"], pool=settings["pool"]
    )
    if settings["image_size"] % backbone.input_multiple:
        raise SettingsError(
            f"training settings: image_size {settings['image_size']} is not a multiple of {backbone.name}'s "
            f"patch size {backbone.input_multiple}"
        )
    options = dict(settings["method_options"])
    if "image_size" in method_options(settings["method"]):
        options.setdefault("image_size", settings["image_size"])  # the autoencoder's decoder size
    return build_method(settings["method"], backbone, n_classes=n_classes, **options)


def load_trained_method(method_path: str | os.PathLike, card_path: str | os.PathLike) -> tuple[PretextMethod, dict]:
    """A finished run's method from its method.pt and model card, in eval mode on the CPU, and
    the card. The backbone is built without the run's starting weights file: the trained state
    replaces them."""
    card = json.loads(Path(card_path).read_text())
    method = build_model({**card["settings"], "weights": None}, card["data"]["n_classes"])
    method.load_state_dict(torch.load(method_path, map_location="cpu", weights_only=True))
    return method.eval(), card


def build_optimizer(method: PretextMethod, settings: dict, world_size: int = 1) -> torch.optim.Optimizer:
    """Optimizer over the trainable parameters (module docstring, "Optimizer")."""
    params = method.trainable_parameters()
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": settings["weight_decay"], "apply_decay": True},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "apply_decay": False},
    ]
    groups = [g for g in groups if g["params"]]
    lr = peak_lr(settings, world_size)
    if settings["optimizer"] == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if settings["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if settings["optimizer"] == "lars":
        return LARS(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)


def build_scheduler(optimizer: torch.optim.Optimizer, settings: dict) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, total = settings["warmup_steps"], settings["steps"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))


@dataclass
class Interval:
    """Metric sums since the last log record (kept in checkpoints so resumed logs match).

    A metric is averaged over the steps that reported it: a method may report some metrics
    only in part of its training (DEC's kl in its clustering stage)."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
            self.counts[key] = self.counts.get(key, 0) + 1
        self.steps += 1

    def means(self, runtime: Runtime) -> dict[str, float]:
        sums, _ = sum_over_ranks(self.sums, self.steps, runtime)
        counts, _ = sum_over_ranks(self.counts, self.steps, runtime)
        return {key: value / counts[key] for key, value in sums.items()}


def sum_over_ranks(sums: dict[str, float], count: int, runtime: Runtime) -> tuple[dict[str, float], int]:
    """Per-key sums and a count added over all ranks (a rank without data has no keys)."""
    if runtime.world_size == 1:
        return dict(sorted(sums.items())), count
    every: list = [None] * runtime.world_size
    dist.all_gather_object(every, (sums, count))
    total: dict[str, float] = {}
    for rank_sums, _ in every:
        for key, value in rank_sums.items():
            total[key] = total.get(key, 0.0) + value
    return dict(sorted(total.items())), sum(rank_count for _, rank_count in every)


# --------------------------------------------------------------------------- the loop


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    position: int = 0  # batches of the current epoch already trained on
    wall_time: float = 0.0


class Trainer:
    """One training run: model, optimizer, data and the bookkeeping around them."""

    def __init__(self, settings: dict, shards_dir: Path, out_dir: Path, runtime: Runtime) -> None:
        self.settings = settings
        self.shards_dir = shards_dir
        self.out_dir = out_dir
        self.runtime = runtime
        self.index_sha256 = file_sha256(shards_dir / "index.tsv")
        index = load_index(shards_dir)
        self.n_samples = index.groupby("split")["n_samples"].sum().to_dict()
        self.n_classes = len(load_labels(shards_dir))
        self.has_validation = self.n_samples.get("validation", 0) > 0
        self.global_batch = settings["batch_size"] * runtime.world_size
        self.epoch_batches = data.epoch_length(shards_dir, "train", self.global_batch)
        if self.epoch_batches == 0:
            raise ValueError(
                f"{shards_dir}: the train split cannot fill one batch of {settings['batch_size']} "
                f"per rank ({runtime.world_size} rank(s))"
            )

        torch.manual_seed(settings["seed"])  # same initial weights on every rank
        self.method = build_model(settings, self.n_classes)
        if runtime.world_size > 1:
            self.method = convert_batchnorm(self.method, runtime.device.type)
        self.method = self.method.to(runtime.device)
        if runtime.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.method, settings, runtime.world_size)
        self.scheduler = build_scheduler(self.optimizer, settings)
        self.scaler = torch.amp.GradScaler("cuda") if runtime.amp_dtype == torch.float16 else None
        self.step_module: nn.Module = _LossModule(self.method)
        if runtime.world_size > 1:
            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=ids, find_unused_parameters=self.method.may_leave_parameters_unused
            )
        seed_everything(settings["seed"], runtime.rank)
        self.generator = torch.Generator(device=runtime.device)
        # One augmentation stream shared by all ranks: each draws for the global batch.
        self.generator.manual_seed(derive_seed(settings["seed"], "augment", 0))
        self.progress = Progress()
        self.interval = Interval()
        self.monitors = Monitors()
        self.last_record: dict = {}
        self.training_set = WholeTrainingSet(self)

    @property
    def done(self) -> bool:
        """All steps trained, or the method stopped early (converged)."""
        return self.progress.step >= self.settings["steps"] or self.method.stopped

    # ---------------------------------------------------------------- state

    def state(self) -> dict:
        rng = capture_rng(self.generator)
        if self.runtime.world_size > 1:
            every = [None] * self.runtime.world_size
            dist.all_gather_object(every, rng)
            rng_states = every
        else:
            rng_states = [rng]
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.progress.step,
            "epoch": self.progress.epoch,
            "position": self.progress.position,
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": rng_states,
            "interval": {
                "sums": dict(self.interval.sums),
                "steps": self.interval.steps,
                "counts": dict(self.interval.counts),
            },
            "method_state": self.method.training_state(),
            "settings": self.settings,
            "settings_hash": trajectory_hash(self.settings),
            "index_sha256": self.index_sha256,
            "world_size": self.runtime.world_size,
            "wall_time": self.progress.wall_time,
            "monitors": self.monitors.state(),
        }

    def load(self, state: dict) -> None:
        try:
            check_resumable(state, self.settings, self.index_sha256, self.runtime.world_size)
        except ValueError as mismatch:
            raise ValueError(f"{mismatch}; use another out_dir or resume=False") from None
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"][self.runtime.rank], self.generator)
        self.method.load_training_state(state.get("method_state", {}))
        sums, steps = dict(state["interval"]["sums"]), state["interval"]["steps"]
        self.interval = Interval(sums, steps, dict(state["interval"].get("counts", dict.fromkeys(sums, steps))))
        self.progress = Progress(state["step"], state["epoch"], state["position"], state["wall_time"])
        self.monitors = Monitors.from_state(state.get("monitors"))
        if self.runtime.is_main:  # best files of steps after the checkpoint belong to the lost part
            prune_best(self.out_dir, self.monitors.best_step)

    def save_checkpoint(self) -> None:
        state = self.state()  # collective under DDP: every rank takes part
        if self.runtime.is_main:
            write_checkpoint(self.out_dir, state)
            prune_best(self.out_dir, self.monitors.best_step)

    def write_best(self) -> None:
        """The evaluated backbone of this step as the best so far (written before the step's
        checkpoint names it; older best files go when that checkpoint is written)."""
        if self.runtime.is_main:
            save_backbone(self.method.evaluation_backbone(), best_path(self.out_dir, self.progress.step))

    # ---------------------------------------------------------------- steps

    def loader(self, split: str, epoch: int, skip: int = 0, batch_size: int | None = None, every_sample: bool = False):
        """Training: this rank's part of the global batches; validation, or every training
        sample once (``every_sample``): the rank's own shards."""
        s, rank, world_size = self.settings, self.runtime.rank, self.runtime.world_size
        if split == "train" and not every_sample:
            batch_size, placement = self.global_batch, {"part": (rank, world_size)}
        else:
            placement = {"rank": rank, "world_size": world_size, "drop_last": False}
        return data.make_loader(
            self.shards_dir,
            split,
            batch_size=batch_size or s["batch_size"],
            image_size=s["image_size"],
            in_channels=s["in_channels"],
            seed=s["seed"],
            epoch=epoch,
            num_workers=s["num_workers"],
            skip_batches=skip,
            **placement,
        )

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["image"].to(self.runtime.device, non_blocking=True)
        if self.runtime.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, batch["label"].to(self.runtime.device, non_blocking=True)

    def train_step(self, batch: dict) -> dict[str, float]:
        self.method.train()
        images, labels = self._inputs(batch)
        with self.runtime.autocast(), augment.batch_part(self.runtime.rank, self.runtime.world_size):
            loss, metrics = self.step_module(images, labels, self.generator)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"non-finite loss {metrics['loss']} at step {self.progress.step + 1}")
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # the method's clipping needs the true gradients
            self._before_optimizer_step()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self._before_optimizer_step()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.method.after_optimizer_step(self.progress.step + 1, self.settings["steps"])
        return metrics

    def _before_optimizer_step(self) -> None:
        decay = weight_decay_at(self.settings, self.progress.step)
        for group in self.optimizer.param_groups:
            if group["apply_decay"]:
                group["weight_decay"] = decay
        self.method.before_optimizer_step(self.progress.step + 1, self.settings["steps"])

    def validate(self) -> dict[str, float]:
        """Mean loss and metrics over the validation split, in eval mode, and the monitors
        (module docstring); random states are restored afterwards, so validating never changes
        the training run."""
        saved = capture_rng(self.generator)
        generator = torch.Generator(device=self.runtime.device)
        generator.manual_seed(derive_seed(self.settings["seed"], "validate", self.runtime.rank))
        sums: dict[str, float] = {}
        count = 0
        features, labels = [], []
        backbone = self.method.evaluation_backbone()
        self.method.eval()
        stream_size = len(self.loader("validation", 0).dataset)
        batch_size = _batch_size_without_singletons(stream_size, self.settings["batch_size"])
        with torch.no_grad():
            for batch in self.loader("validation", 0, batch_size=batch_size):
                images, batch_labels = self._inputs(batch)
                with self.runtime.autocast():
                    _, metrics = self.method.loss(images, batch_labels, generator)
                    features.append(backbone(images).float().cpu())
                labels.append(batch["label"])
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * len(images)
                count += len(images)
        self.method.train()
        restore_rng(saved, self.generator)
        sums, count = sum_over_ranks(sums, count, self.runtime)
        record = {f"val_{key}": value / count for key, value in sums.items()}
        # A rank of a small split may hold no validation crop: it still joins the gather.
        if not features:
            return {**record, **self._monitor_values(torch.empty(0), torch.empty(0, dtype=torch.long))}
        return {**record, **self._monitor_values(torch.cat(features), torch.cat(labels))}

    def _monitor_values(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """val_embedding_std and val_knn_accuracy over every rank's validation features."""
        if self.runtime.world_size > 1:
            every: list = [None] * self.runtime.world_size
            dist.all_gather_object(every, (features, labels))
            held = [(f, y) for f, y in every if len(f)]
            features, labels = torch.cat([f for f, _ in held]), torch.cat([y for _, y in held])
        values = {"val_embedding_std": embedding_std(features)}
        accuracy = knn_accuracy(features.numpy(), labels.numpy())
        if accuracy is not None:
            values[MONITOR] = accuracy
        return values

    # ---------------------------------------------------------------- run

    def run(self, max_steps: int | None) -> None:
        total = self.settings["steps"]
        stop_at = total if max_steps is None else min(total, self.progress.step + max_steps)
        bar = tqdm(
            total=total,
            initial=self.progress.step,
            file=sys.stderr,
            disable=not (self.settings["progress"] and self.runtime.is_main and sys.stderr.isatty()),
            dynamic_ncols=True,
        )
        started = interval_start = time.perf_counter()
        interval_images = interval_steps = 0
        if self.progress.step == 0:
            self.method.after_step(0, total, self.training_set)
        with bar:
            while self.progress.step < stop_at and not self.method.stopped:
                for batch in self.loader("train", self.progress.epoch, self.progress.position):
                    epoch = self.progress.epoch
                    self.method.begin_batch(batch["crop_id"])
                    self.interval.add(self.train_step(batch))
                    interval_images += len(batch["label"]) * self.runtime.world_size
                    interval_steps += 1
                    self._advance()
                    step = self.progress.step
                    self.method.after_step(step, total, self.training_set)
                    bar.update(1)
                    now = time.perf_counter()
                    self.progress.wall_time += now - started
                    started = now
                    record = {}
                    last = step == total or self.method.stopped
                    logged = step % self.settings["log_every"] == 0 or last
                    if logged:
                        record.update(self._train_record(interval_images / (now - interval_start)))
                        bar.set_postfix(loss=f"{record['loss']:.4f}")
                        self._log_progress(record, (now - interval_start) / interval_steps * (total - step))
                    if self.has_validation and (step % self.settings["validate_every"] == 0 or last):
                        record.update(self.validate())
                        self._watch(step, record)
                    if record:
                        self._log({"step": step, "epoch": epoch, **record})
                    if step % self.settings["checkpoint_every"] == 0 or step == stop_at or last:
                        self.save_checkpoint()
                    if logged:  # validation and checkpoints do not count against images/s
                        interval_start, interval_images, interval_steps = time.perf_counter(), 0, 0
                    if step >= stop_at or self.method.stopped:
                        break

    def _watch(self, step: int, record: dict) -> None:
        """Feed a validation record to the monitors: best checkpoint, warnings."""
        better, warnings = self.monitors.observe(step, record)
        if better:
            self.write_best()
        if self.runtime.is_main:
            for warning in warnings:
                log.warning("%s", warning)

    def best_summary(self) -> dict:
        """The model card's ``best``: the monitored best step, or the last step and why."""
        if self.monitors.best_step is not None:
            return {"step": self.monitors.best_step, "monitor": MONITOR, "value": self.monitors.best_value}
        reason = (
            "no validation split"
            if not self.has_validation
            else "the validation split holds a single weak label: no kNN monitor"
        )
        return {"step": self.progress.step, "monitor": None, "value": None, "reason": reason}

    def _log_progress(self, record: dict, eta_s: float) -> None:
        """One line per log interval, for a user watching the rule log of a long run."""
        if self.runtime.is_main:
            log.info(
                "step %d/%d (epoch %d): loss %.4f, %.1f images/s, ETA %s",
                self.progress.step,
                self.settings["steps"],
                self.progress.epoch,
                record["loss"],
                record["images_per_s"],
                time.strftime("%H:%M:%S", time.gmtime(eta_s)) if eta_s < 86400 else f"{eta_s / 86400:.1f} days",
            )

    def _advance(self) -> None:
        self.progress.step += 1
        self.progress.position += 1
        if self.progress.position == self.epoch_batches:
            self.progress.epoch += 1
            self.progress.position = 0

    def _train_record(self, images_per_s: float) -> dict:
        """Interval means of the loss and method metrics; the learning rate of the last step."""
        means = self.interval.means(self.runtime)
        self.interval = Interval()
        s = self.settings
        lr = peak_lr(s, self.runtime.world_size) * lr_factor(self.progress.step - 1, s["warmup_steps"], s["steps"])
        return {"loss": means.pop("loss"), "lr": lr, "images_per_s": images_per_s, **means}

    def _log(self, record: dict) -> None:
        self.last_record = {**self.last_record, **record}
        if self.runtime.is_main:
            with open(self.out_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    # ---------------------------------------------------------------- artifacts

    def write_artifacts(self) -> dict[str, str]:
        paths = {
            name: self.out_dir / f"{name}.{suffix}"
            for name, suffix in (("backbone", "pt"), ("method", "pt"), ("model_card", "json"))
        }
        paths["best_backbone"] = backbone_file(self.out_dir, "best")
        # Every rank takes part (the method may encode the training set); rank 0 writes.
        paths.update(self.method.write_outputs(self.training_set, self.out_dir if self.runtime.is_main else None))
        if not self.runtime.is_main:
            return {k: str(v) for k, v in paths.items()}
        save_backbone(self.method.evaluation_backbone(), paths["backbone"])
        best_step = self.monitors.best_step
        source = paths["backbone"] if best_step is None else best_path(self.out_dir, best_step)
        with atomic_path(paths["best_backbone"]) as tmp:
            tmp.write_bytes(source.read_bytes())
        state = {k: v.detach().cpu() for k, v in self.method.state_dict().items()}
        with atomic_path(paths["method"]) as tmp:
            torch.save(state, tmp)
        with atomic_path(paths["model_card"]) as tmp:
            tmp.write_text(json.dumps(self.model_card(), indent=2) + "\n")
        return {k: str(v) for k, v in paths.items()}

    def model_card(self) -> dict:
        s = self.settings
        details = self.method.describe(self.progress.step)
        return {
            "backbone": s["backbone"],
            "method": s["method"],
            "in_channels": s["in_channels"],
            "image_size": s["image_size"],
            "feature_dim": self.method.backbone.feature_dim,
            "data": {
                "shards_dir": str(self.shards_dir.resolve()),
                "index_sha256": self.index_sha256,
                "n_train": int(self.n_samples.get("train", 0)),
                "n_validation": int(self.n_samples.get("validation", 0)),
                "n_classes": self.n_classes,
            },
            "settings": s,
            "config_hash": config_hash(s),
            "final_metrics": self.final_metrics(),
            "best": self.best_summary(),
            "warnings": list(self.monitors.warnings),
            "steps": self.progress.step,
            "epochs": self.progress.step / self.epoch_batches,
            "wall_time_s": round(self.progress.wall_time, 3),
            "device": self.runtime.device.type,
            "precision": str(self.runtime.amp_dtype or torch.float32).removeprefix("torch."),
            "world_size": self.runtime.world_size,
            "torch_version": torch.__version__,
            **({"method_details": details} if details else {}),
        }

    def final_metrics(self) -> dict:
        """The last record of metrics.jsonl (written at the final step), minus bookkeeping."""
        path = self.out_dir / "metrics.jsonl"
        records = read_metrics(path) if path.exists() else []
        last = next((r for r in reversed(records) if r["step"] == self.progress.step), {})
        return {k: v for k, v in last.items() if k not in ("step", "epoch", "images_per_s")}


class WholeTrainingSet:
    """The train split as a method's hooks see it (``pretext.TrainingSet``): every crop once,
    cut as in epoch 0 (the crop offsets of ``learning.data`` for the run's seed and epoch 0),
    through ``function`` in eval mode without gradients, under the run's autocast. Rows are
    sorted by crop id, so they depend neither on the stream's order nor on the workers; under
    DDP each rank encodes its own shards and the parts are gathered, so every rank gets all
    rows. No random state is drawn (the loader has its own seeded generator)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.seed = trainer.settings["seed"]

    def encode(self, function) -> tuple[list[str], torch.Tensor]:
        trainer = self.trainer
        crop_ids: list[str] = []
        rows: list[torch.Tensor] = []
        mode = trainer.method.training
        trainer.method.eval()
        try:
            with torch.no_grad():
                for batch in trainer.loader("train", 0, every_sample=True):
                    images, _ = trainer._inputs(batch)
                    with trainer.runtime.autocast():
                        rows.append(function(images).float().cpu())
                    crop_ids += batch["crop_id"]
        finally:
            trainer.method.train(mode)
        parts = [(crop_ids, torch.cat(rows) if rows else None)]
        if trainer.runtime.world_size > 1:
            parts = [None] * trainer.runtime.world_size
            dist.all_gather_object(parts, (crop_ids, torch.cat(rows) if rows else None))
        crop_ids = [crop_id for ids, _ in parts for crop_id in ids]
        values = torch.cat([part for _, part in parts if part is not None])
        order = sorted(range(len(crop_ids)), key=crop_ids.__getitem__)
        return [crop_ids[i] for i in order], values[order]


def _batch_size_without_singletons(n: int, batch_size: int) -> int:
    """A batch size near ``batch_size`` whose last batch does not hold a single image
    (BatchNorm-based methods refuse batches of one)."""
    size = batch_size
    while n % size == 1 and size < n:
        size += 1
    return size


def _prepare_out_dir(out_dir: Path, resume: bool) -> None:
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    for folder in (out_dir, out_dir / "checkpoints"):
        for leftover in folder.glob(".*.part"):  # temporary files of a killed write
            leftover.unlink()
    if not resume:
        for _, path in list_checkpoints(out_dir):
            path.unlink()
        prune_best(out_dir, None)
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)


def discard_stale_checkpoints(
    out_dir: str | os.PathLike, settings: dict, shards_dir: str | os.PathLike, *, world_size: int = 1
) -> str | None:
    """Delete ``out_dir``'s checkpoints and metrics if its newest checkpoint cannot be resumed.

    For the workflow: a changed run config or a rebuilt shard set reruns ``train_pretext``,
    which must then start over instead of failing (``train(resume=True)`` refuses a
    checkpoint of other settings, shards or rank count). Returns why the checkpoints were
    discarded, or None when there were none or they fit.
    """
    out_dir = Path(out_dir)
    state = load_newest_checkpoint(out_dir)
    if state is None:
        return None
    try:
        check_resumable(state, check_settings(settings), file_sha256(Path(shards_dir) / "index.tsv"), world_size)
    except ValueError as mismatch:
        _prepare_out_dir(out_dir, resume=False)
        return str(mismatch)
    return None


def train(
    settings: dict,
    shards_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    device: str = "auto",
    resume: bool = True,
    max_steps_this_run: int | None = None,
    distributed: bool | None = None,
) -> dict:
    """Train (or resume training) a pretext method on the shards; see the module docstring.

    Returns ``{"finished", "step", "epoch", "metrics", "best", "warnings"}`` plus, once all
    steps are done, the artifact paths ``backbone``, ``best_backbone``, ``method`` and
    ``model_card``. ``max_steps_this_run`` stops
    after that many steps (with a checkpoint), e.g. to fit a cluster time limit.
    """
    settings = check_settings(settings)
    if max_steps_this_run is not None and max_steps_this_run < 1:
        raise ValueError(f"max_steps_this_run must be >= 1, got {max_steps_this_run}")
    shards_dir, out_dir = Path(shards_dir), Path(out_dir)
    runtime = make_runtime(device, settings["precision"], settings["deterministic"], distributed)
    try:
        if runtime.is_main:
            _prepare_out_dir(out_dir, resume)
        _barrier(runtime)
        trainer = Trainer(settings, shards_dir, out_dir, runtime)
        state = _agreed_checkpoint(out_dir, runtime) if resume else None
        if runtime.is_main:
            if state is not None:
                log.info(
                    "resuming from step %d (checkpoint %s)", state["step"], checkpoint_path(out_dir, state["step"])
                )
            else:
                why = "no checkpoint in" if resume else "resume=False, deleted the checkpoints of"
                log.info("starting over: %s %s", why, out_dir)
        if state is not None:
            trainer.load(state)
            if runtime.is_main:
                truncate_metrics(out_dir / "metrics.jsonl", state["step"])
        elif runtime.is_main:
            prune_best(out_dir, None)  # a fresh start: best files of an unreadable run go too
        if not trainer.done:
            trainer.run(max_steps_this_run)
        finished = trainer.done
        result = {
            "finished": finished,
            "step": trainer.progress.step,
            "epoch": trainer.progress.epoch,
            "metrics": trainer.final_metrics() if finished else trainer.last_record,
            "best": trainer.best_summary(),
            "warnings": list(trainer.monitors.warnings),
        }
        if finished:
            result.update(trainer.write_artifacts())
        _barrier(runtime)
        return result
    finally:
        if runtime.joined_group:
            dist.destroy_process_group()


def _barrier(runtime: Runtime) -> None:
    if runtime.world_size > 1:
        dist.barrier()


def _agreed_checkpoint(out_dir: Path, runtime: Runtime) -> dict | None:
    """Rank 0 picks the checkpoint (renaming broken ones); all ranks load that file."""
    if runtime.world_size == 1:
        return load_newest_checkpoint(out_dir)
    choice = [None]
    if runtime.is_main:
        state = load_newest_checkpoint(out_dir)
        choice = [None if state is None else state["step"]]
    dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None
    return torch.load(checkpoint_path(out_dir, choice[0]), map_location="cpu", weights_only=True)


def main(argv: list[str] | None = None) -> None:
    """Command line of one rank under torchrun (see ``cytopretrain.learning.distributed.launch``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cytopretrain.learning.train", description=main.__doc__)
    parser.add_argument("settings", type=Path, help="JSON file of training settings")
    parser.add_argument("shards_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-resume", dest="resume", action="store_false")
    parser.add_argument("--result", type=Path, help="rank 0 writes the result dict here as JSON")
    args = parser.parse_args(argv)
    result = train(
        json.loads(args.settings.read_text()), args.shards_dir, args.out_dir, device=args.device, resume=args.resume
    )
    if args.result and int(os.environ.get("RANK", "0")) == 0:
        with atomic_path(args.result) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
