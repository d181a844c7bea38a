"""Where models run and in which precision: one rule for training and feature extraction.

``device``: "auto" is the current CUDA device when one is available, else the CPU.
``precision`` -> the autocast dtype (None = plain float32):
- "fp32": None everywhere.
- "auto": bfloat16 on a CUDA device that supports it, float16 on an older one (training then
  scales the loss with a GradScaler); None on the CPU, where bf16 is only faster on processors
  with bf16 matrix units (ask for it with "bf16").
- "bf16": bfloat16 on the CPU and on a CUDA device that supports it; a device without it is an
  error rather than a silent change of precision.
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device; "auto" is CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if precision == "bf16":
            raise ValueError(f"precision bf16 requested but {device} does not support bfloat16; use auto or fp32")
        return torch.float16
    return torch.bfloat16
