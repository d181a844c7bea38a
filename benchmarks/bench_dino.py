"""Training-step throughput of DINO on a ViT against the bare forward + backward of its crops.

For each precision (fp32, bf16 autocast) the script times, after one untimed warm-up step:

- dino step: one optimizer step of the ``dino`` pretext method as ``train`` runs it (multi-crop
  views of the batch, student on every crop, EMA teacher on the two global crops, DINO head and
  loss, backward, per-parameter gradient clipping, AdamW step, teacher EMA update);
- bare: a forward + backward of the same crops (2 global of ``--global-size`` px, ``--local-crops``
  local of ``--local-size`` px, each crop size in one pass) through the same backbone, the loss
  being the mean of the features, and the same AdamW step on the backbone's parameters.

Images/s count source images (one image = 2 global + N local crops). On the CPU bf16 is
autocast (fast only where the processor has bf16 matrix units); on CUDA training uses bf16 as
the method's runs do (core.devices, precision auto).

    python benchmarks/bench_dino.py [--backbone vit_small_patch16] [--batch 4] [--steps 3]
        [--global-size 224] [--local-size 96] [--local-crops 6] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch
from harness import REPO

sys.path.insert(0, str(REPO))

from cytopretrain.learning.models import build_backbone  # noqa: E402
from cytopretrain.learning.pretext import build_method  # noqa: E402


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dino_rate(args, device: torch.device, precision: str) -> float:
    """Images/s of DINO optimizer steps."""
    torch.manual_seed(0)
    method = build_method(
        "dino",
        build_backbone(args.backbone, in_channels=1),
        local_crops=args.local_crops,
        global_size=args.global_size,
        local_size=args.local_size,
    ).to(device)
    method.train()
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-4, weight_decay=0.04)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 1, args.global_size, args.global_size, device=device)
    total = args.steps + 1

    def step(number: int) -> None:
        with autocast(device, precision):
            loss, _ = method.loss(images, None, generator)
        loss.backward()
        method.before_optimizer_step(number, total)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step(number, total)

    return _timed(step, args, device)


def bare_rate(args, device: torch.device, precision: str) -> float:
    """Images/s of forward + backward of the same crops through the bare backbone."""
    torch.manual_seed(0)
    backbone = build_backbone(args.backbone, in_channels=1).to(device).train()
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-4, weight_decay=0.04)
    global_crops = torch.rand(2 * args.batch, 1, args.global_size, args.global_size, device=device)
    local_crops = torch.rand(args.local_crops * args.batch, 1, args.local_size, args.local_size, device=device)

    def step(number: int) -> None:
        with autocast(device, precision):
            features = [backbone(global_crops)] + ([backbone(local_crops)] if args.local_crops else [])
            loss = torch.cat(features).float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _timed(step, args, device)


def _timed(step, args, device: torch.device) -> float:
    step(1)  # warm-up: allocations, oneDNN kernel selection
    synchronize(device)
    start = time.perf_counter()
    for number in range(2, args.steps + 2):
        step(number)
    synchronize(device)
    return args.steps * args.batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_small_patch16")
    parser.add_argument("--batch", type=int, default=4, help="source images per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--local-crops", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, load average "
        f"{os.getloadavg()[0]:.1f}; {args.backbone}, batch {args.batch}, 2 x {args.global_size} px + "
        f"{args.local_crops} x {args.local_size} px crops, {args.steps} timed steps"
    )
    print(f"{'precision':>10s}{'dino step img/s':>18s}{'bare fwd+bwd img/s':>21s}{'ratio':>8s}")
    for precision in args.precisions.split(","):
        dino, bare = dino_rate(args, device, precision), bare_rate(args, device, precision)
        print(f"{precision:>10s}{dino:18.2f}{bare:21.2f}{dino / bare:8.2f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
