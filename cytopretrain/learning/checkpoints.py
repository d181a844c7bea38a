"""Checkpoints that resume exactly: the random states, the files, and the metrics log.

A checkpoint holds the whole method state dict, optimizer, scheduler (and GradScaler), step,
epoch, batches done in the epoch, the random states of every rank, the metric sums of the
current log interval, the monitors' state (learning.monitors; optional, so checkpoints from
before the monitors still resume) and a hash of the settings that shape the run
(learning.settings). Files are written atomically; only the newest KEEP_CHECKPOINTS are kept;
all load with ``weights_only=True``. Beside them, ``best-<step>.pt`` holds the evaluated
backbone of the best monitored step (learning.train, "Monitors").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cytopretrain.core.errors import SettingsError
from cytopretrain.core.tables import atomic_path
from cytopretrain.learning.settings import RESUME_NEUTRAL, trajectory_hash

KEEP_CHECKPOINTS = 2
# Which backbone file of a finished run feature extraction reads (the workflow's runs.<run>.checkpoint).
BACKBONE_FILES = {"last": "backbone.pt", "best": "best_backbone.pt"}
CHECKPOINT_FORMAT = 1
CHECKPOINT_KEYS = (
    "format",
    "step",
    "epoch",
    "position",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "interval",
    "settings",
    "settings_hash",
    "index_sha256",
    "world_size",
    "wall_time",
)


def seed_everything(seed: int, rank: int) -> None:
    """Seed python, numpy and torch for the rank's own random streams."""
    derived = derive_seed(seed, "global", rank)
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)


def derive_seed(seed: int, purpose: str, rank: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{purpose}\0{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def capture_rng(generator: torch.Generator) -> dict:
    """Every random state the loop depends on, as tensors and plain values."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "python": random.getstate(),
        "generator": generator.get_state(),
    }


def restore_rng(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(_as_tuples(state["python"]))
    generator.set_state(state["generator"])


def _as_tuples(value: Any) -> Any:
    """random.setstate needs tuples where serialization may hand back lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# --------------------------------------------------------------------------- checkpoints


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step-{step:07d}.pt"


def backbone_file(run_dir: str | os.PathLike, checkpoint: str = "last") -> Path:
    """The backbone file of a finished run: the last step's or the best monitored step's."""
    if checkpoint not in BACKBONE_FILES:
        raise ValueError(f"checkpoint must be one of {tuple(BACKBONE_FILES)}, got {checkpoint!r}")
    return Path(run_dir) / BACKBONE_FILES[checkpoint]


def best_path(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"best-{step:07d}.pt"


def prune_best(out_dir: Path, keep_step: int | None) -> None:
    """Delete the best-backbone files of every step but ``keep_step``."""
    for path in (out_dir / "checkpoints").glob("best-*.pt"):
        number = path.stem.removeprefix("best-")
        if number.isdigit() and int(number) != keep_step:
            path.unlink()


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoint files in ``out_dir/checkpoints``, newest first."""
    found = []
    for path in (out_dir / "checkpoints").glob("step-*.pt"):
        number = path.stem.removeprefix("step-")
        if number.isdigit():
            found.append((int(number), path))
    return sorted(found, reverse=True)


def load_newest_checkpoint(out_dir: Path) -> dict | None:
    """The newest checkpoint that loads completely; broken ones are renamed ``*.corrupt``."""
    for step, path in list_checkpoints(out_dir):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            problem = _checkpoint_problem(state, step)
        except Exception as error:  # truncated zip, unpickling error, ...: all mean unusable
            problem = f"{type(error).__name__}: {error}"
        if problem is None:
            return state
        warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
        os.replace(path, path.with_name(path.name + ".corrupt"))
    return None


def _checkpoint_problem(state: Any, step: int) -> str | None:
    if not isinstance(state, dict):
        return "not a checkpoint dictionary"
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        return f"missing entries {missing}"
    if state["format"] != CHECKPOINT_FORMAT:
        return f"format {state['format']}, expected {CHECKPOINT_FORMAT}"
    if state["step"] != step:
        return f"holds step {state['step']}, file name says {step}"
    return None


def write_checkpoint(out_dir: Path, state: dict) -> None:
    """Write atomically, then keep only the newest KEEP_CHECKPOINTS files."""
    path = checkpoint_path(out_dir, state["step"])
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for _, old in list_checkpoints(out_dir)[KEEP_CHECKPOINTS:]:
        old.unlink()


def check_resumable(state: dict, settings: dict, index_sha256: str, world_size: int) -> None:
    if state["settings_hash"] != trajectory_hash(settings):
        changed = sorted(
            key
            for key in set(settings) | set(state["settings"])
            if key not in RESUME_NEUTRAL and settings.get(key) != state["settings"].get(key)
        )
        raise SettingsError(f"checkpoint at step {state['step']} was trained with other settings (changed: {changed})")
    if state["index_sha256"] != index_sha256:
        raise SettingsError(f"checkpoint at step {state['step']} was trained on another shard index")
    if state["world_size"] != world_size:
        raise SettingsError(
            f"checkpoint at step {state['step']} was written by {state['world_size']} rank(s), "
            f"this run has {world_size}"
        )


# --------------------------------------------------------------------------- metrics


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the records up to ``last_step`` (a killed run may have logged past its checkpoint
    or left a partial last line)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", math.inf) <= last_step:
            kept.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in kept))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
