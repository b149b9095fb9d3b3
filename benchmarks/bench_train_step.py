"""Seconds per U-Net++ training step for a few encoders, float32 against bfloat16 autocast.

    python benchmarks/bench_train_step.py
    python benchmarks/bench_train_step.py --encoders tu-efficientnet_b0 resnet34 --batch 4

One step = forward, BCE + Dice loss, backward and an AdamW update on a random
batch, as in training. For each encoder the float32 step (contiguous memory)
is the reference and bfloat16 autocast with channels_last is timed against it
in the same process; the last line gives the ratio for the first encoder.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from timing import train_step_seconds

from nucleiseg.models.build import build_model
from nucleiseg.models.config import TrainConfig


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--encoders",
        nargs="+",
        default=["tu-efficientnet_b0", "timm-efficientnet-b0", "resnet18", "resnet34"],
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    return parser


def step_seconds(encoder: str, bf16: bool, batch: int, size: int, steps: int) -> float:
    torch.manual_seed(0)
    config = TrainConfig(encoder=encoder, amp=bf16)
    model = build_model(config)
    images = torch.randn(batch, 3, size, size)
    if bf16:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    targets = (torch.rand(batch, 3, size, size) > 0.5).float()
    return train_step_seconds(model, images, targets, config, steps, lr=1e-3)


def main(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, batch {args.batch} at {args.size}px")
    print(f"{'encoder':24s} {'params':>8s} {'fp32 s':>8s} {'bf16 s':>8s} {'fp32/bf16':>10s}")
    ratios = []
    for encoder in args.encoders:
        params = sum(p.numel() for p in build_model(TrainConfig(encoder=encoder)).parameters())
        fp32 = step_seconds(encoder, False, args.batch, args.size, args.steps)
        bf16 = step_seconds(encoder, True, args.batch, args.size, args.steps)
        ratios.append(fp32 / bf16)
        print(f"{encoder:24s} {params / 1e6:7.2f}M {fp32:8.2f} {bf16:8.2f} {fp32 / bf16:9.2f}x")
    print(f"bf16_speedup_{args.encoders[0]}: {ratios[0]:.2f}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
