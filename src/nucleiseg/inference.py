"""Running a trained model over whole images.

Images are padded (by reflection) to a multiple of the network's stride rather
than resized, so that nuclei keep the size the model was trained on, and the
output is cropped back to the image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from nucleiseg.config import TrainConfig, load_config
from nucleiseg.data import read_image
from nucleiseg.dataset import to_tensor
from nucleiseg.models import build_model, load_weights
from nucleiseg.postprocess import PostprocessParams, instances_from_probabilities
from nucleiseg.runs import CONFIG, WEIGHTS, fold_dirs

STRIDE = 32


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision for the device: bfloat16 on CPU, float16 on CUDA, or nothing."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def pad_to_stride(image: np.ndarray, stride: int = STRIDE) -> np.ndarray:
    """Reflect-pad an (H, W, C) image at the bottom and right to multiples of ``stride``."""
    height, width = image.shape[:2]
    pad_y, pad_x = -height % stride, -width % stride
    if not pad_y and not pad_x:
        return image
    # Reflection needs the pad to be shorter than the side; symmetric has no such limit.
    mode = "reflect" if pad_y < height and pad_x < width else "symmetric"
    return np.pad(image, ((0, pad_y), (0, pad_x), (0, 0)), mode=mode)


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
    model: nn.Module, image: np.ndarray, device: torch.device, amp: bool = False
) -> np.ndarray:
    """Sigmoid probabilities of the model for one whole image, float32 (C, H, W)."""
    return torch.sigmoid(predict_logits(model, image, device, amp)).numpy()


@dataclass
class FoldModel:
    """A trained fold's model, ready for inference, with the configuration it was trained with."""

    fold: int
    config: TrainConfig
    model: nn.Module


def load_fold_models(run_dir: Path, device: torch.device) -> list[FoldModel]:
    """Every finished fold of a run: its compact weights and its configuration.

    Args:
        run_dir: Run folder holding ``fold<K>/`` folders, or one fold folder.
        device: Where the models will run.

    Returns:
        One model per fold that has ``weights_fp16.pt``, in eval mode.

    Raises:
        FileNotFoundError: If no fold of the run has finished.
    """
    loaded = []
    for fold, fold_dir in fold_dirs(run_dir).items():
        if not (fold_dir / WEIGHTS).is_file():
            continue
        config = load_config(fold_dir / CONFIG, {"encoder_weights": None, "init_from": None})
        model = build_model(config)
        load_weights(model, fold_dir / WEIGHTS)
        model.to(device).eval()
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        loaded.append(FoldModel(fold, config, model))
    if not loaded:
        raise FileNotFoundError(f"{run_dir}: no fold with {WEIGHTS}; has a fold finished training?")
    return loaded


def predict_ensemble(
    models: Sequence[FoldModel], image: np.ndarray, device: torch.device
) -> np.ndarray:
    """Probabilities averaged over models, float32 (C, H, W).

    Averaging probability maps before postprocessing, rather than merging
    instances, lets the models' agreement decide every boundary.
    """
    total = None
    for member in models:
        probabilities = predict_probabilities(member.model, image, device, member.config.amp)
        total = probabilities if total is None else total + probabilities
    return total / len(models)


def segment_images(
    models: Sequence[FoldModel],
    images: Mapping[str, Path],
    params: PostprocessParams,
    device: torch.device,
) -> dict[str, np.ndarray]:
    """Label images of image files, from the models' averaged probabilities.

    Args:
        models: Fold models (see :func:`load_fold_models`).
        images: Image id -> image file (see :func:`nucleiseg.data.find_images`).
        params: Postprocessing thresholds.
        device: Where the models run.

    Returns:
        Image id -> int32 label image.
    """
    labels = {}
    for image_id, path in tqdm(images.items(), desc="predict", unit="image"):
        probabilities = predict_ensemble(models, read_image(path), device)
        labels[image_id] = instances_from_probabilities(probabilities, params)
    return labels
