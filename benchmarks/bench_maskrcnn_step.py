"""Seconds per Mask R-CNN training step: backbones and head widths, float32 and bfloat16.

    python benchmarks/bench_maskrcnn_step.py
    python benchmarks/bench_maskrcnn_step.py --variants r18-lite r18-coco --steps 2

One step = forward with the losses, backward and an AdamW update, on a batch
of crops holding drawn nuclei (``--nuclei`` discs of 4 to 12 px radius per
crop), as in training. The reference is the first variant in float32; every
other measurement is printed as a ratio against it, from the same process.
The last line gives the bfloat16 speed-up of the first variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings

import numpy as np
import torch
from skimage.draw import disk
from timing import train_step_seconds

from nucleiseg.data.dataset import to_tensor
from nucleiseg.inference.family import get_family
from nucleiseg.models.build import build_model
from nucleiseg.models.config import TrainConfig, load_config
from nucleiseg.models.maskrcnn import detection_targets

# name -> (backbone, settings of MaskRCNNParams)
VARIANTS = {
    "r18-lite": ("resnet18", {}),
    "r18-coco": (
        "resnet18",
        {
            "fpn_channels": 256,
            "box_head_dim": 1024,
            "mask_head_channels": 256,
            "box_batch_size_per_image": 512,
        },
    ),
    "r34-lite": ("resnet34", {}),
    "r50-lite": ("resnet50", {}),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--nuclei", type=int, default=40)
    parser.add_argument("--steps", type=int, default=3)
    return parser


def _batch(batch: int, size: int, nuclei: int, family):
    rng = np.random.default_rng(0)
    items = []
    for _ in range(batch):
        labels = np.zeros((size, size), np.int32)
        for label in range(1, nuclei + 1):
            center = tuple(rng.integers(0, size, 2))
            labels[disk(center, int(rng.integers(4, 13)), shape=labels.shape)] = label
        image = np.dstack([np.where(labels > 0, 200, 20).astype(np.uint8)] * 3)
        items.append((to_tensor(image), detection_targets(labels)))
    return family.collate(items)


def _config(variant: str, bf16: bool) -> TrainConfig:
    backbone, settings = VARIANTS[variant]
    config = load_config(overrides={"model": "maskrcnn", "encoder": backbone, "amp": bf16})
    return dataclasses.replace(config, maskrcnn=dataclasses.replace(config.maskrcnn, **settings))


def step_seconds(variant: str, bf16: bool, args: argparse.Namespace) -> float:
    config = _config(variant, bf16)
    torch.manual_seed(0)
    model = build_model(config)
    images, targets = _batch(args.batch, args.size, args.nuclei, get_family("maskrcnn"))
    return train_step_seconds(model, images, targets, config, args.steps, lr=1e-4)


def main(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore", category=UserWarning)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} "
        f"at {args.size}px, {args.nuclei} nuclei per crop"
    )
    print(f"{'variant':10s} {'params':>8s} {'fp32 s':>8s} {'bf16 s':>8s} {'fp32 vs ref':>12s}")
    reference = None
    speedups = []
    for variant in args.variants:
        params = sum(p.numel() for p in build_model(_config(variant, False)).parameters())
        fp32 = step_seconds(variant, False, args)
        bf16 = step_seconds(variant, True, args)
        reference = reference or fp32
        speedups.append(fp32 / bf16)
        print(
            f"{variant:10s} {params / 1e6:7.2f}M {fp32:8.2f} {bf16:8.2f} {fp32 / reference:11.2f}x"
        )
    print(f"bf16_speedup_{args.variants[0]}: {speedups[0]:.2f}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
