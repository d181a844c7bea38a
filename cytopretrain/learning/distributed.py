"""Data-parallel training pieces: batch norm over the global batch, and the torchrun launch.

With DistributedDataParallel every rank normalizes with the statistics of its own slice of the
batch, so 2 ranks of batch B do not compute what 1 process of batch 2B computes. The ranks'
batch norms are therefore replaced by ones whose training statistics cover the whole global
batch: torch's ``SyncBatchNorm`` on CUDA, and :class:`GlobalBatchNorm` elsewhere, because
``SyncBatchNorm`` refuses CPU tensors (the gloo backend).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from cytopretrain import REPO_ROOT


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: every rank's loss depends
    on the sum, so each rank's input receives the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def all_reduce(tensor: Tensor) -> Tensor:
    """Differentiable sum of ``tensor`` over the ranks of the default process group."""
    return _SumOverRanks.apply(tensor)


class GlobalBatchNorm(_BatchNorm):
    """Batch norm whose training statistics are those of the global batch of all ranks.

    Input (N, C, *) of any rank count. In training mode under an initialized process group
    of more than one rank: mean and biased variance per channel over every rank's samples
    (two all-reduces; the variance from centred values, which stays accurate where
    E[x^2] - E[x]^2 would cancel), computed in float32; running statistics updated with the
    unbiased variance, as BatchNorm does. The all-reduces are differentiable, so each rank's
    gradient carries the other ranks' terms through the shared statistics, and DDP's gradient
    average equals the gradient of one process on the whole batch. Otherwise (eval mode, one
    rank) it is plain batch norm. Parameters and buffers are those of BatchNorm1d/2d, so
    state dicts load into either.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected input of shape (N, C, *), got {tuple(input.shape)}")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        spread = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not (self.training and spread):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()
        count = torch.tensor([input.numel() // input.shape[1]], dtype=torch.float32, device=x.device)
        totals = all_reduce(torch.cat([x.sum(dims), count]))
        n = totals[-1].detach()
        mean = totals[:-1] / n
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n)
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        self.num_batches_tracked += 1
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * n / (n - 1).clamp(min=1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def convert_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """``module`` with every batch norm replaced by a global-batch one (see the module doc):
    ``nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` otherwise. Weights and running
    statistics, train/eval mode and frozen parameters are kept; the state dict keys do not
    change."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, (GlobalBatchNorm, nn.SyncBatchNorm)):
        replacement = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        replacement.load_state_dict(module.state_dict())
        replacement.train(module.training)
        for name, parameter in replacement.named_parameters():  # e.g. BYOL's frozen target
            parameter.requires_grad_(getattr(module, name).requires_grad)
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        return replacement.to(tensors[0].device) if tensors else replacement
    for name, child in module.named_children():
        setattr(module, name, convert_batchnorm(child, device_type))
    return module


def launch(
    settings: dict,
    shards_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    processes: int,
    device: str = "auto",
    threads: int = 1,
    resume: bool = True,
) -> dict:
    """Train under ``torchrun`` with ``processes`` ranks on this node and return rank 0's result.

    The settings go to ``out_dir/launch_settings.json``; each rank runs ``python -m
    cytopretrain.learning.train`` with ``threads // processes`` intra-op threads (at least 1). The
    per-rank batch is ``settings["batch_size"]``, so the global batch is ``processes`` times
    that. A failing rank makes torchrun, and this call, fail (CalledProcessError).
    """
    if processes < 2:
        raise ValueError(f"launch needs at least 2 processes, got {processes}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings_path = out_dir / "launch_settings.json"
    settings_path.write_text(json.dumps(settings, indent=2) + "\n")
    result_path = out_dir / "launch_result.json"
    result_path.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc-per-node={processes}",
        "-m", "cytopretrain.learning.train",
        str(settings_path), str(shards_dir), str(out_dir),
        f"--device={device}", f"--result={result_path}",
    ]  # fmt: skip
    if not resume:
        command.append("--no-resume")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = str(max(1, threads // processes))
    subprocess.run(command, env=env, check=True)
    return json.loads(result_path.read_text())
