"""Model builders, looked up by family name so that a typo fails where it is made."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
from torch import nn
from torchvision.models import get_model_weights

from nucleiseg.data.reading import DataError
from nucleiseg.data.targets import CHANNELS
from nucleiseg.models.compact import expand_state
from nucleiseg.models.config import TrainConfig
from nucleiseg.models.maskrcnn import build_maskrcnn
from nucleiseg.models.runs import weights_problem

_LOCAL_WEIGHTS = (".pt", ".pth", ".bin", ".safetensors")


def build_unetpp(config: TrainConfig) -> nn.Module:
    """U-Net++ with one logit map per target channel (body, border, separation).

    Args:
        config: ``encoder`` names the smp encoder; ``encoder_weights`` is None
            (random initialisation), a file holding the encoder's pretrained
            state dict (works offline), or a name smp knows, e.g. ``imagenet``
            (fetched from the model hub, or its local cache).

    Returns:
        The model, producing logits of shape (N, 3, H, W) for inputs whose
        sides are multiples of 32.
    """
    weights = config.encoder_weights
    local = weights is not None and Path(weights).suffix in _LOCAL_WEIGHTS
    try:
        model = smp.UnetPlusPlus(
            encoder_name=config.encoder,
            encoder_weights=None if local else weights,
            in_channels=3,
            classes=len(CHANNELS),
        )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        if weights is None:
            raise
        raise RuntimeError(
            f"could not load encoder weights {weights!r} for {config.encoder}: {error}. "
            "They come from the model hub: with no network, put them in the local hub cache, "
            "pass a local file with --encoder-weights PATH, or start from --init-from CKPT."
        ) from error
    if local:
        load_encoder_weights(model, weights)
    return model


def build_maskrcnn_model(config: TrainConfig) -> nn.Module:
    """Mask R-CNN with the ResNet-FPN backbone named by ``config.encoder``.

    Args:
        config: ``encoder`` names the ResNet; ``maskrcnn`` holds anchors, head
            widths and detection counts; ``encoder_weights`` is None (random
            initialisation), a local file with the ResNet's ImageNet state
            dict (works offline), or ``imagenet`` (torchvision's weights, from
            the download cache or the network).

    Returns:
        The model (see :func:`nucleiseg.models.maskrcnn.build_maskrcnn`).
    """
    model = build_maskrcnn(config.encoder, config.maskrcnn)
    weights = config.encoder_weights
    if weights is None:
        return model
    if Path(weights).suffix in _LOCAL_WEIGHTS:
        _load_backbone(model.backbone.body, weights)
        return model
    if weights != "imagenet":
        raise ValueError(f"encoder_weights {weights!r}: expected imagenet or a local file")
    try:
        state = get_model_weights(config.encoder).DEFAULT.get_state_dict(progress=False)
    except (OSError, RuntimeError, ValueError) as error:
        raise RuntimeError(
            f"could not load ImageNet weights for {config.encoder}: {error}. With no network, "
            "put them in the torch hub cache, pass a local file with --encoder-weights PATH, "
            "or start from --init-from CKPT."
        ) from error
    model.backbone.body.load_state_dict(state, strict=False)
    return model


def load_encoder_weights(model: nn.Module, path: str | Path) -> None:
    """Load a pretrained classification network's weights into an smp model's encoder.

    Layers the encoder does not have (the classifier head) are ignored; every
    encoder layer must be found in the file.

    Args:
        model: An smp model.
        path: State dict of the encoder's backbone (e.g. a timm or torchvision
            ImageNet checkpoint), possibly wrapped in ``{"state_dict": ...}``.
    """
    # timm-based encoders keep the backbone in .model; smp's own ones are the backbone.
    _load_backbone(getattr(model.encoder, "model", model.encoder), path)


def _load_backbone(backbone: nn.Module, path: str | Path) -> None:
    """Load a classification network's state dict into a backbone that lacks its head.

    Raises:
        FileNotFoundError: If there is no such file.
        ValueError: If a backbone weight is not in the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such encoder weights file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    missing, _ = backbone.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"{path}: {len(missing)} encoder weights missing, e.g. {missing[0]}")


BUILDERS: dict[str, Callable[[TrainConfig], nn.Module]] = {
    "unetpp": build_unetpp,
    "maskrcnn": build_maskrcnn_model,
}


def build_model(config: TrainConfig) -> nn.Module:
    """Build the model of ``config.model``, then load ``config.init_from`` if given.

    Raises:
        KeyError: For an unknown family, listing the known ones.
    """
    if config.model not in BUILDERS:
        raise KeyError(f"unknown model {config.model!r}; choose from {', '.join(BUILDERS)}")
    model = BUILDERS[config.model](config)
    if config.init_from:
        load_weights(model, config.init_from)
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load model weights from a training checkpoint or a compact state dict.

    Args:
        model: Model to load into; every parameter must match.
        path: A checkpoint written by the engine (its ``model`` entry is used),
            a bare state dict (e.g. the fp16 weights of a finished fold) or
            int8 weights (:mod:`nucleiseg.models.compact`).

    Raises:
        FileNotFoundError: If there is no such file.
        nucleiseg.data.reading.DataError: Naming the file, if it differs from the
            checksum recorded when it was written, is truncated or corrupt,
            or does not fit the model (see :func:`nucleiseg.models.runs.weights_problem`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    problem = weights_problem(path)
    if problem is not None:
        raise DataError(problem)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise DataError(f"{path}: not a readable weights file ({error})") from error
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    state = expand_state(state)
    reference = model.state_dict()
    try:
        model.load_state_dict(
            {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}
        )
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise DataError(f"{path}: weights that do not fit the model ({first})") from error
