"""Running a trained model over images: devices, precision, loading fold models, and
the semantic family's prediction with tiles and test-time augmentation.

Images are padded (by reflection) to a multiple of the network's stride rather
than resized, so that nuclei keep the size the model was trained on, and the
output is cropped back to the image. Test-time views (D4 transforms, scales)
are predicted one by one, inverted exactly, and averaged as probabilities.
A view whose whole-image pass would take more memory than
``InferenceOptions.max_memory`` is predicted in tiles, so any image size fits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nucleiseg.cli import DEVICES
from nucleiseg.data.dataset import to_tensor
from nucleiseg.data.sizing import TRAIN_MEDIAN_DIAMETER, resize_image
from nucleiseg.inference import tta
from nucleiseg.inference.options import FAMILY_MERGES
from nucleiseg.inference.tiling import (
    auto_tile,
    check_tile,
    count_tiles,
    pad_to_stride,
    padded_shape,
    predict_dense_tiled,
)
from nucleiseg.models.build import build_model, load_weights
from nucleiseg.models.config import TrainConfig, load_config
from nucleiseg.models.precision import autocast
from nucleiseg.models.runs import CONFIG, Split, fold_dirs, read_split, weights_path

# Peak memory of a U-Net++ (tu-efficientnet_b0) forward pass per input pixel, float32:
# measured 630 B on a whole 1 MP image and 480 B on 4 MP (bfloat16: 340 and 230 B).
UNETPP_BYTES_PER_PIXEL = 600


@dataclass(frozen=True)
class InferenceOptions:
    """How images are predicted: test-time views, tiling, and how views are merged.

    Attributes:
        tta: D4 views: ``none``, ``flip`` (identity, left-right, up-down) or
            ``d4`` (all 8 flips and quarter turns).
        scales: Resize factors; each scale is predicted with every D4 view.
        tile: Tile side in pixels (a multiple of 32), or None for whole images
            (tiled only where ``max_memory`` says so).
        overlap: Pixels shared by neighbouring tiles; for Mask R-CNN it must
            exceed the largest nucleus, so that each one is whole in some tile.
        batch_size: Tiles per forward pass, when ``tile`` is given.
        max_memory: Without ``tile``: gigabytes one forward pass may take; a
            view whose whole-image pass would take more is cut into the
            largest tiles that fit, one a pass (``inf``: never).
        vote_fraction: Mask R-CNN: share of the views (D4 x scales) that must
            find a nucleus for it to be kept.
        vote_iou: Mask R-CNN: mask IoU above which instances of two views are
            the same nucleus.
        family_merge: How two families are combined: ``maps`` (Mask R-CNN's
            scored soft masks blended into U-Net++'s body map before its
            watershed; the default, the best measured out of fold), ``nms``
            (pooled instances, the higher-scored of two overlapping ones kept),
            ``vote`` (matched instances' masks averaged, unmatched ones kept),
            ``agree`` (only nuclei both families found) or ``fill`` (every
            nucleus of the first run's family, plus the other family's nuclei
            it did not find).
        family_iou: Mask IoU above which instances of two families are the
            same nucleus.
        map_weight: ``maps``: share of Mask R-CNN in the fused body map.
        size_adaptive: Segment each image once (one view), measure its median
            nucleus diameter and, outside the band ``size_target`` x/÷
            ``size_tolerance``, predict again with every scale multiplied by
            ``size_target / diameter`` (see :mod:`nucleiseg.data.sizing`).
        size_target: Median equivalent diameter to bring nuclei to, in pixels
            (the training set's).
        size_tolerance: Diameters within this factor of the target are left alone.
    """

    tta: str = "none"
    scales: tuple[float, ...] = (1.0,)
    tile: int | None = None
    overlap: int = 128
    batch_size: int = 4
    max_memory: float = 2.0
    vote_fraction: float = 0.5
    vote_iou: float = 0.5
    family_merge: str = "maps"
    family_iou: float = 0.5
    map_weight: float = 0.35
    size_adaptive: bool = False
    size_target: float = TRAIN_MEDIAN_DIAMETER
    size_tolerance: float = 1.25

    def __post_init__(self) -> None:
        if self.family_merge not in FAMILY_MERGES:
            choices = ", ".join(FAMILY_MERGES)
            raise ValueError(f"unknown family merge {self.family_merge!r}; choose from {choices}")
        if not 0.0 <= self.map_weight <= 1.0:
            raise ValueError(f"map weight must be in [0, 1], got {self.map_weight}")
        tta.transforms(self.tta)
        tta.parse_scales(self.scales)
        if self.tile is not None:
            check_tile(self.tile, self.overlap)
        if not self.max_memory > 0:
            raise ValueError(f"max_memory must be positive (GB), got {self.max_memory}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0 < self.vote_fraction <= 1:
            raise ValueError(f"vote_fraction must be in (0, 1], got {self.vote_fraction}")
        if not self.size_target > 0 or not self.size_tolerance >= 1:
            raise ValueError(
                f"size_target must be positive and size_tolerance at least 1, got "
                f"{self.size_target} and {self.size_tolerance}"
            )

    def views(self) -> list[tuple[float, tta.Transform]]:
        """Every (scale, D4 transform) view, scales outermost."""
        return [(s, t) for s in self.scales for t in tta.transforms(self.tta)]

    def tiling(self, shape: tuple[int, int], bytes_per_pixel: float) -> tuple[int | None, int]:
        """Tile side (None: whole) and tiles per pass for a network input of this (H, W).

        Args:
            shape: (H, W) of the input.
            bytes_per_pixel: Memory the family's forward pass takes per input pixel.
        """
        if self.tile is not None:
            return self.tile, self.batch_size
        return auto_tile(shape, bytes_per_pixel, self.max_memory * 2**30, self.overlap), 1


def with_options(base: InferenceOptions, given: dict) -> InferenceOptions:
    """``base`` with the fields in ``given`` replaced (scales as a tuple)."""
    if "scales" in given:
        given = {**given, "scales": tuple(given["scales"])}
    return dataclasses.replace(base, **given)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but no CUDA device is available")
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    return torch.device(name)


@torch.no_grad()
def predict_logits(
    model: nn.Module, image: np.ndarray, device: torch.device, amp: bool = False
) -> torch.Tensor:
    """Logits of the model for one whole image.

    Args:
        model: Model in eval mode, mapping (N, 3, H, W) to (N, C, H, W).
        image: RGB uint8 image, shape (H, W, 3).
        device: Where to run.
        amp: Use mixed precision.

    Returns:
        float32 CPU tensor of shape (C, H, W).
    """
    height, width = image.shape[:2]
    batch = to_tensor(pad_to_stride(image))[None].to(device)
    with autocast(device, amp):
        logits = model(batch)
    return logits[0, :, :height, :width].float().cpu()


def predict_probabilities(
    model: nn.Module,
    image: np.ndarray,
    device: torch.device,
    amp: bool = False,
    options: InferenceOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Sigmoid probabilities of the model for one image, averaged over test-time views.

    Args:
        model: Model in eval mode, mapping (N, 3, H, W) to logits (N, C, H, W).
        image: RGB uint8 image, shape (H, W, 3).
        device: Where to run.
        amp: Use mixed precision.
        options: Views and tiling; None is one whole-image pass.
        progress: Called with the number of tiles each forward pass covered
            (see :func:`tile_count` for their total).

    Returns:
        float32 (C, H, W) in [0, 1].
    """
    options = options or InferenceOptions()

    @torch.no_grad()
    def probabilities(batch: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            logits = model(batch.to(device))
        return torch.sigmoid(logits.float())

    views = options.views()
    total = None
    for scale, transform in views:
        view = tta.apply(resize_image(image, scale), transform)
        tile, batch_size = options.tiling(view.shape[:2], UNETPP_BYTES_PER_PIXEL)
        maps = predict_dense_tiled(probabilities, view, tile, options.overlap, batch_size, progress)
        maps = tta.resize_maps(tta.invert_maps(maps, transform), image.shape[:2])
        if total is None:
            total = np.ascontiguousarray(maps)
        else:
            total += maps
    total /= len(views)
    return total


def tile_count(shape: tuple[int, int], options: InferenceOptions | None = None) -> int:
    """Forward passes :func:`predict_probabilities` makes for an image of this (H, W)."""
    options = options or InferenceOptions()
    count = 0
    for scale, transform in options.views():
        view = tta.view_shape(shape, scale, transform)
        tile, _ = options.tiling(view, UNETPP_BYTES_PER_PIXEL)
        count += count_tiles(padded_shape(view), tile, options.overlap)
    return count


@dataclass
class FoldModel:
    """A trained fold's model, ready for inference, with the configuration it was trained with.

    ``split`` is the images it trained on and held out, None where its fold
    folder keeps no record of them.
    """

    fold: int
    config: TrainConfig
    model: nn.Module
    split: Split | None = None


def load_fold_models(
    run_dir: Path, device: torch.device, folds: Collection[int] | None = None
) -> list[FoldModel]:
    """Every finished fold of a run: its compact weights and its configuration.

    Args:
        run_dir: Run folder holding ``fold<K>/`` folders, or one fold folder.
        device: Where the models will run.
        folds: Load only these folds (None: all of them).

    Returns:
        One model per fold that has compact weights (float16 or int8), in eval mode.

    Raises:
        FileNotFoundError: If no fold of the run has finished.
    """
    loaded = []
    for fold, fold_dir in fold_dirs(run_dir).items():
        weights = weights_path(fold_dir)
        if weights is None or (folds is not None and fold not in folds):
            continue
        config = load_config(fold_dir / CONFIG, {"encoder_weights": None, "init_from": None})
        model = build_model(config)
        load_weights(model, weights)
        model.to(device).eval()
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        loaded.append(FoldModel(fold, config, model, read_split(fold_dir)))
    if not loaded:
        among = "" if folds is None else f" among folds {sorted(folds)}"
        raise FileNotFoundError(
            f"{run_dir}: no fold with compact weights{among}; has a fold finished training?"
        )
    return loaded


def fast_preset_index(families: Sequence[str]) -> int:
    """Which model the fast preset keeps, given the families of the models in order: the
    first U-Net++, else the first model.

    One U-Net++ pass costs a fraction of one Mask R-CNN pass on a CPU (the README's
    inference-cost tables), so the preset keeps U-Net++ whenever the ensemble has it.
    """
    return list(families).index("unetpp") if "unetpp" in families else 0


def fast_preset_models(models: Sequence[FoldModel]) -> list[FoldModel]:
    """The fast preset's single model (see :func:`fast_preset_index`); none of none."""
    if not models:
        return []
    return [models[fast_preset_index([member.config.model for member in models])]]
