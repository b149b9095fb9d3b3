"""Why tiles change a U-Net++'s maps: squeeze-and-excitation pools over the whole input.

    python benchmarks/tile_context.py
    python benchmarks/tile_context.py --run runs/unetpp_effb0 --fold 0 --window 256
    python benchmarks/tile_context.py --folder ../shared/data/monuseg/test

Each squeeze-and-excitation block of the EfficientNet encoder scales its
channels by a gate computed from the mean of its whole feature map, so what a
pixel gets depends on everything else in the input: a 512 px tile and the
whole 1000 px image give the same pixel different gates. The benchmark
segments one labelled image whole and in ``--tile`` tiles with one U-Net++
fold, twice: as trained (global pooling) and with every block's mean taken
instead over a window of ``--window`` input pixels around each position (by
default the side of the training crops, which is what the blocks saw in
training). With the window, a position's gate is the same whole or tiled
except within a window of a tile's edge, so if pooling is what moves the maps,
the windowed run's tiled and whole maps agree far better.

It prints one row per pooling and mode: nuclei, mean AP against the truth,
seconds, and for the tiled rows how far the body probabilities moved from the
whole image's (max, mean) and the mean AP of the tiled nuclei scored against
the whole image's (1.0: the same nuclei). With ``--folder``, it scores instead
every image of a labelled folder whole under both poolings, to show what the
window does to accuracy. A diagnostic, not a product option:
windowed pooling is not what the models were trained with, and costs time.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_IMAGE = Path("../shared/data/monuseg/test/images/TCGA-2Z-A9J9-01A-01-TS1.png")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="image of a folder pair")
    parser.add_argument("--run", type=Path, default=Path("runs/unetpp_effb0_generalized"))
    parser.add_argument("--fold", type=int, default=0, help="fold model of the run")
    parser.add_argument("--tile", type=int, default=512, help="tile side of the tiled mode")
    parser.add_argument("--window", type=int, default=256, help="pooling window, input pixels")
    parser.add_argument("--folder", type=Path, help="score this labelled folder whole instead")
    return parser


def box_mean(x: torch.Tensor, side: int) -> torch.Tensor:
    """Mean over a ``side`` x ``side`` window around each position, cut at the borders.

    Summed-area differences, so the cost does not grow with ``side``.
    """
    x = x.float()
    for dim in (2, 3):
        length = x.shape[dim]
        start = torch.arange(length, device=x.device) - side // 2
        first, last = start.clamp(0, length), (start + side).clamp(0, length)
        sums = F.pad(x.cumsum(dim), (0, 0, 1, 0) if dim == 2 else (1, 0))
        counts = (last - first).float()
        shape = [1, 1, -1, 1] if dim == 2 else [1, 1, 1, -1]
        x = (sums.index_select(dim, last) - sums.index_select(dim, first)) / counts.view(shape)
    return x


class WindowedExcitation(nn.Module):
    """A timm ``SqueezeExcite`` block whose mean is taken over a window, not the whole map."""

    def __init__(self, block: nn.Module, window: int, input_height: list[int]) -> None:
        super().__init__()
        self.block, self.window, self.input_height = block, window, input_height

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = max(1, self.window * x.shape[-2] // self.input_height[0])
        if x.shape[-2] <= side and x.shape[-1] <= side:
            return self.block(x)  # the window holds the whole map: the block as trained
        block = self.block
        pooled = box_mean(x, side).to(x.dtype)
        return x * block.gate(block.conv_expand(block.act1(block.conv_reduce(pooled))))


@contextlib.contextmanager
def windowed_excitation(model: nn.Module, window: int) -> Iterator[int]:
    """Swap every squeeze-and-excitation block of ``model`` for a windowed one, then back.

    Yields:
        The number of blocks swapped.
    """
    input_height = [0]

    def record(_, inputs) -> None:
        input_height[0] = inputs[0].shape[-2]

    hook = model.register_forward_pre_hook(record)
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "SqueezeExcite":
                setattr(parent, name, WindowedExcitation(child, window, input_height))
                swapped.append((parent, name, child))
    try:
        yield len(swapped)
    finally:
        hook.remove()
        for parent, name, child in swapped:
            setattr(parent, name, child)


def _poolings(model: nn.Module, window: int) -> Iterator[str]:
    """Run the caller's loop body once as trained, then once with windowed pooling."""
    yield "global (as trained)"
    with windowed_excitation(model, window):
        yield f"window {window} px"


def score_folder(models, params, folder: Path, window: int) -> None:
    """Mean AP of every image of ``folder``, whole, under both poolings."""
    from nucleiseg.competition.metric import average_precision, mean_average_precision
    from nucleiseg.data.reading import find_images, labels_of, read_image
    from nucleiseg.inference.ensemble import segment_image
    from nucleiseg.inference.predictor import InferenceOptions

    images = find_images(folder)
    options = InferenceOptions(max_memory=float("inf"))
    print(f"| pooling | images of {folder} | mean AP |")
    print("| --- | --- | --- |")
    for pooling in _poolings(models[0].model, window):
        scores = [
            average_precision(
                labels_of(path),
                segment_image(models, read_image(path), params, torch.device("cpu"), options),
            )
            for path in images.values()
        ]
        print(f"| {pooling} | {len(scores)} | {mean_average_precision(scores):.4f} |", flush=True)


def compare_tiles(models, params, image_path: Path, tile: int, window: int) -> None:
    """One image whole and tiled under both poolings: nuclei, accuracy and agreement."""
    from nucleiseg.competition.metric import average_precision
    from nucleiseg.data.reading import labels_of, read_image
    from nucleiseg.inference.ensemble import segment_image
    from nucleiseg.inference.predictor import InferenceOptions, predict_probabilities

    image, truth = read_image(image_path), labels_of(image_path)
    device = torch.device("cpu")
    print(f"{image_path.name}: {len(np.unique(truth)) - 1} true nuclei")
    print(
        "| pooling | mode | nuclei | mean AP vs truth | s "
        "| body change max / mean | mean AP vs whole |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for pooling in _poolings(models[0].model, window):
        whole = None
        for side in (None, tile):
            options = InferenceOptions(tile=side, max_memory=float("inf"))
            started = time.perf_counter()
            labels = segment_image(models, image, params, device, options)
            seconds = time.perf_counter() - started
            body = predict_probabilities(models[0].model, image, device, False, options)[0]
            score = average_precision(truth, labels).score
            if whole is None:
                whole, mode, moved, agreement = (body, labels), "whole", "-", "-"
            else:
                change = np.abs(body - whole[0])
                mode, moved = f"tiled {side}", f"{change.max():.3f} / {change.mean():.4f}"
                agreement = f"{average_precision(whole[1], labels).score:.4f}"
            print(
                f"| {pooling} | {mode} | {len(np.unique(labels)) - 1} | {score:.4f} "
                f"| {seconds:.1f} | {moved} | {agreement} |",
                flush=True,
            )


def main(args: argparse.Namespace) -> None:
    from nucleiseg.inference.family import params_by_family
    from nucleiseg.inference.predictor import load_fold_models

    torch.manual_seed(0)
    models = load_fold_models(args.run, torch.device("cpu"), {args.fold})
    if models[0].config.model != "unetpp":
        raise SystemExit(f"{args.run}: fold {args.fold} is not a U-Net++")
    params = params_by_family([args.run])
    print(f"{args.run} fold {args.fold}")
    if args.folder is not None:
        score_folder(models, params, args.folder, args.window)
    else:
        compare_tiles(models, params, args.image, args.tile, args.window)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
