"""Optimizer pieces of the self-supervised recipes: LARS and the cosine schedule.

- :class:`LARS` (You, Gitman & Ginsburg 2017) as BYOL uses it (Grill et al. 2020, appendix C):
  SGD with momentum whose step for each weight tensor is scaled by the trust ratio
  eta ||w|| / ||g + wd w||; biases and normalisation parameters (groups with
  ``apply_decay=False``) get neither the weight decay nor the trust ratio.
- :func:`cosine_schedule`: a value moving from ``start`` to ``end`` along half a cosine, as
  BYOL's target EMA rate (0.99 or 0.996 -> 1) and DINO's teacher momentum (0.996 -> 1) and
  weight decay (0.04 -> 0.4) do.
"""

from __future__ import annotations

import math

import torch


def cosine_schedule(start: float, end: float, step: int, total_steps: int) -> float:
    """``end + (start - end) (1 + cos(pi step / total_steps)) / 2``: ``start`` at step 0,
    ``end`` at ``total_steps``."""
    if total_steps < 1 or not 0 <= step <= total_steps:
        raise ValueError(f"need 0 <= step <= total_steps and total_steps >= 1, got {step} of {total_steps}")
    return end + (start - end) * (1 + math.cos(math.pi * step / total_steps)) / 2


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling on SGD with momentum (BYOL's optimizer).

    Per parameter tensor p with gradient g, in groups with ``apply_decay`` (the default):
    u = g + weight_decay p, u <- u * trust_coefficient ||p|| / ||u|| when both norms are
    positive; in other groups u = g. Then v <- momentum v + u and p <- p - lr v.
    """

    def __init__(self, params, lr: float, *, momentum: float = 0.9, weight_decay: float = 0.0, trust_coefficient=1e-3):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(
                f"LARS needs lr > 0, 0 <= momentum < 1, weight_decay >= 0 and trust_coefficient > 0, got "
                f"{lr}, {momentum}, {weight_decay}, {trust_coefficient}"
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "apply_decay": True,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if group["apply_decay"]:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["trust_coefficient"] * param_norm / update_norm,
                        torch.ones_like(param_norm),
                    )
                    update = update.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(update).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss
