"""Training monitors: is a run learning something, is it collapsing, which step was best.

At every validation (``validate_every`` steps and at the end, when the shards have a validation
split) the loop passes the validation images, unaugmented and in eval mode, through the
method's evaluated backbone (``PretextMethod.evaluation_backbone``: DINO's teacher, the
backbone otherwise) and logs two monitors beside the validation loss:

- ``val_embedding_std``: the per-dimension standard deviation of the L2-normalised features,
  averaged over dimensions (SimSiam's collapse measure, Chen & He 2021). A collapsed
  embedding (every image on one point) gives 0; features spread evenly over the sphere give
  about 1/sqrt(D). Random-init networks already sit well below that (about 0.12/sqrt(D) for a
  ResNet-18 on yeast cells: ReLU features share one main direction), so a collapse is judged
  by the fall of the monitor, not by its level.
- ``val_knn_accuracy``: leave-one-out 11-NN accuracy of those features against the validation
  split's weak labels, by the workflow's own ``knn_loo`` protocol (z-scored features,
  Euclidean distance). The weak labels are only watched: no self-supervised method trains on
  them. Logged when the validation split holds at least two labels.

The best step is the one with the highest ``val_knn_accuracy`` (the first on ties); the loop
keeps its evaluated backbone as the ``best`` checkpoint beside the last one.

Warnings (logged by ``learning.train`` and kept in the model card): the embedding is
collapsing when ``val_embedding_std`` falls below COLLAPSE_FRACTION of the highest value the
run has had; the loss is rising when ``val_loss`` has risen at RISING_VALIDATIONS validations
in a row (BYOL's failure in issue 19: its loss fell, then rose for the last half of the run
while its features got worse than random init).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cytopretrain.evaluation.protocols.neighbours import knn_loo

MONITOR = "val_knn_accuracy"  # picks the best checkpoint; higher is better
RISING_VALIDATIONS = 3
COLLAPSE_FRACTION = 0.25


def embedding_std(features: torch.Tensor) -> float:
    """Mean over dimensions of the standard deviation (over rows) of the L2-normalised rows."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"embedding_std needs (N >= 2, D) features, got shape {tuple(features.shape)}")
    return float(F.normalize(features.double(), dim=1).std(dim=0).mean())


def knn_accuracy(features: np.ndarray, labels: np.ndarray) -> float | None:
    """knn_loo accuracy (k = 11) of the features against the labels; None with fewer than two
    labels or three rows (nothing to tell apart)."""
    if len(np.unique(labels)) < 2 or len(labels) < 3:
        return None
    frame = pd.DataFrame(np.asarray(features, dtype=np.float32), columns=[f"f_{i}" for i in range(features.shape[1])])
    frame.insert(0, "Metadata_label", np.asarray(labels).astype(str))
    return float(knn_loo(frame)["accuracy"])


@dataclass
class Monitors:
    """What the run has seen at its validations: the best step, and what the warnings need.

    Saved in checkpoints (``state`` / ``from_state``), so a resumed run keeps its best and its
    warnings exactly as the uninterrupted run has them.
    """

    best_step: int | None = None
    best_value: float | None = None
    highest_std: float | None = None
    val_losses: list[float] = field(default_factory=list)  # the last RISING_VALIDATIONS + 1
    warnings: list[str] = field(default_factory=list)

    def observe(self, step: int, record: dict) -> tuple[bool, list[str]]:
        """Take one validation record (``val_*`` keys); return (new best?, new warnings)."""
        new: list[str] = []
        std = record.get("val_embedding_std")
        if std is not None:
            if self.highest_std is not None and std < COLLAPSE_FRACTION * self.highest_std:
                new.append(
                    f"step {step}: the embedding is collapsing: val_embedding_std {std:.3g} is below "
                    f"{COLLAPSE_FRACTION:g} x its highest value {self.highest_std:.3g}"
                )
            self.highest_std = std if self.highest_std is None else max(self.highest_std, std)
        loss = record.get("val_loss")
        if loss is not None:
            self.val_losses = [*self.val_losses, float(loss)][-(RISING_VALIDATIONS + 1) :]
            history = self.val_losses
            if len(history) > RISING_VALIDATIONS and all(a < b for a, b in zip(history, history[1:])):
                new.append(
                    f"step {step}: val_loss has risen at {RISING_VALIDATIONS} validations in a row "
                    f"({' -> '.join(f'{v:.4g}' for v in history)}); lower the learning rate or raise the EMA rate"
                )
        self.warnings += new
        value = record.get(MONITOR)
        better = value is not None and (self.best_value is None or value > self.best_value)
        if better:
            self.best_step, self.best_value = step, float(value)
        return better, new

    def state(self) -> dict:
        return {
            "best_step": self.best_step,
            "best_value": self.best_value,
            "highest_std": self.highest_std,
            "val_losses": list(self.val_losses),
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_state(cls, state: dict | None) -> Monitors:
        """From ``state()``; None (a checkpoint written before monitors existed) starts afresh."""
        if state is None:
            return cls()
        return cls(
            state["best_step"],
            state["best_value"],
            state["highest_std"],
            list(state["val_losses"]),
            list(state["warnings"]),
        )
