"""Settings of one pretraining run: the defaults, their checks and their hashes.

The workflow's config schema (``training.runs.<run>``) takes its defaults from DEFAULTS; a
test ties the two. Only ``method`` and ``backbone`` are required.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from cytopretrain.core.devices import PRECISIONS
from cytopretrain.core.errors import SettingsError
from cytopretrain.learning.models import POOLS

REQUIRED = ("method", "backbone")
DEFAULTS: dict[str, Any] = {
    "in_channels": 1,  # channels fed to the backbone (see learning.data)
    "image_size": 224,  # side of the square training images, px
    "batch_size": 64,  # images per step and rank (global batch = batch_size x ranks)
    "steps": 1000,  # total optimizer steps
    "lr": 0.001,  # peak learning rate (per 256 images of global batch with lr_scaling "linear")
    "lr_scaling": "none",  # none | linear: peak lr = lr x global batch / 256 (Goyal et al.; BYOL, DINO)
    "weights": None,  # local weights file for the backbone (None: random init)
    "pool": None,  # ViT feature: cls | mean | cls+mean (learning.models.POOLS); None: the backbone's own
    "weight_decay": 0.0,  # on weights of dimension >= 2 only (not biases, norm scales)
    "weight_decay_end": None,  # cosine schedule from weight_decay to this value (DINO); None: constant
    "optimizer": "adam",  # adam | adamw | sgd (momentum 0.9, Nesterov) | lars (learning.train.LARS)
    "warmup_steps": 0,  # linear warmup from lr / warmup_steps to lr
    "schedule": "cosine",  # cosine decay after warmup (to 0 at ``steps``)
    "checkpoint_every": 500,  # steps between checkpoints (one is also written at the end)
    "seed": 0,  # seeds model init, data order and augmentations
    "num_workers": 1,  # DataLoader workers (batches do not depend on it)
    "precision": "auto",  # auto | fp32 | bf16 (core.devices)
    "method_options": {},  # keyword options of the pretext method (learning.pretext)
    "log_every": 50,  # steps between metrics.jsonl records
    "validate_every": None,  # steps between validation passes (None: checkpoint_every)
    "progress": True,  # tqdm bar on stderr (shown only when stderr is a terminal)
    "deterministic": False,  # CUDA: deterministic algorithms, cudnn.benchmark off
}
# Settings that change neither the weights nor the data order: free to change on resume.
RESUME_NEUTRAL = ("log_every", "checkpoint_every", "validate_every", "progress", "num_workers")
OPTIMIZERS = ("adam", "adamw", "sgd", "lars")
LR_SCALINGS = ("none", "linear")


def check_settings(settings: dict) -> dict:
    """``settings`` with defaults filled in; a missing, unknown or bad key raises SettingsError."""
    missing = [key for key in REQUIRED if key not in settings]
    if missing:
        raise SettingsError(f"training settings: missing key(s) {missing}")
    unknown = sorted(set(settings) - set(REQUIRED) - set(DEFAULTS))
    if unknown:
        raise SettingsError(f"training settings: unknown key(s) {unknown}")
    full = {**DEFAULTS, **settings}
    full["method_options"] = full["method_options"] or {}
    _require(full, "method_options", isinstance(full["method_options"], dict), "a mapping")
    if full["weights"] is not None:
        full["weights"] = str(full["weights"])
    try:  # the settings go into JSON (hash, model card): plain JSON types from here on
        full = json.loads(json.dumps(full))
    except (TypeError, ValueError) as error:
        raise SettingsError(f"training settings are not JSON-serializable: {error}") from None
    if full["validate_every"] is None:
        full["validate_every"] = full["checkpoint_every"]
    for key in (
        "in_channels",
        "image_size",
        "batch_size",
        "steps",
        "checkpoint_every",
        "log_every",
        "validate_every",
    ):
        _require(full, key, _is_int(full[key]) and full[key] >= 1, "a positive integer")
    for key in ("warmup_steps", "seed", "num_workers"):
        _require(full, key, _is_int(full[key]) and full[key] >= 0, "an integer >= 0")
    _require(full, "lr", _is_number(full["lr"]) and full["lr"] > 0, "a number > 0")
    _require(full, "weight_decay", _is_number(full["weight_decay"]) and full["weight_decay"] >= 0, "a number >= 0")
    end = full["weight_decay_end"]
    _require(full, "weight_decay_end", end is None or (_is_number(end) and end >= 0), "null or a number >= 0")
    _require(full, "lr_scaling", full["lr_scaling"] in LR_SCALINGS, f"one of {LR_SCALINGS}")
    _require(full, "pool", full["pool"] in POOLS, f"one of {POOLS}")
    _require(full, "optimizer", full["optimizer"] in OPTIMIZERS, f"one of {OPTIMIZERS}")
    _require(full, "schedule", full["schedule"] == "cosine", "'cosine'")
    _require(full, "precision", full["precision"] in PRECISIONS, f"one of {PRECISIONS}")
    for key in ("progress", "deterministic"):
        _require(full, key, isinstance(full[key], bool), "true or false")
    return full


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(settings: dict, key: str, ok: bool, what: str) -> None:
    if not ok:
        raise SettingsError(f"training settings: {key} must be {what}, got {settings[key]!r}")


def config_hash(settings: dict) -> str:
    """sha256 of the canonical JSON of ``settings`` (sorted keys, no spaces)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def trajectory_hash(settings: dict) -> str:
    """Hash of the settings that shape the weights (a resumed run must match it)."""
    return config_hash({k: v for k, v in settings.items() if k not in RESUME_NEUTRAL})
