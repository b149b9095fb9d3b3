"""Training configuration: dataclass defaults, then a YAML file, then command-line flags.

The resolved configuration is written next to every checkpoint and prediction,
so a result can always be traced to the exact settings that made it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nucleiseg.atomic import atomic_path
from nucleiseg.data.augment import ColourParams
from nucleiseg.data.intensity import InputNorm
from nucleiseg.data.modality import BRIGHTFIELD, FLUORESCENCE, TISSUE
from nucleiseg.data.sources import parse_sources
from nucleiseg.data.targets import TargetParams
from nucleiseg.models.maskrcnn import MaskRCNNParams
from nucleiseg.models.runs import read_yaml
from nucleiseg.postprocessing.instances import InstanceParams
from nucleiseg.postprocessing.watershed import PostprocessParams


@dataclass
class TrainConfig:
    """Everything that decides a training run and its out-of-fold predictions.

    Attributes:
        experiment: Name of the run; the default output is ``runs/<experiment>/fold<K>``.
        model: Model family, a key of ``nucleiseg.inference.family.FAMILIES``; its
            entry in :data:`FAMILY_DEFAULTS` replaces these defaults.
        encoder: Encoder name for the family's builder: an smp encoder for
            U-Net++, a ResNet (``resnet18/34/50``) for Mask R-CNN's FPN backbone.
        encoder_weights: Pretrained encoder weights to load (e.g. ``imagenet``),
            or None to start from scratch (nothing can be downloaded offline).
        init_from: Local checkpoint whose model weights start the run; ``{fold}`` in
            it stands for each fold's number (see :meth:`for_fold`).
        epochs: Training epochs.
        samples_per_epoch: Random crops drawn per epoch.
        batch_size: Crops per optimisation step.
        crop_size: Side of the square training crops, in pixels.
        scale_range: Range of the random rescaling before cropping.
        colour_augment: Use the colour, inversion, blur and noise steps of
            :func:`nucleiseg.data.augment.train_transform` (off: crops and D4 only).
        colour: Probability of each colour step, 0 leaving it out
            (:class:`nucleiseg.data.augment.ColourParams`).
        input_norm: Intensity scale of the network input, fixed (/255) or each
            image stretched between two percentiles, the same in training and
            inference (:class:`nucleiseg.data.intensity.InputNorm`).
        extra_data: External labelled folders that join every fold's training
            images (never its validation), each a mapping with ``path``,
            ``weight`` (share of crops relative to the competition images' 1),
            optional ``tile`` and ``name`` (see :mod:`nucleiseg.data.sources`).
        modality_weights: Relative sampling weight of an image of each modality;
            the rarer kinds are drawn more often than their share of the data.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_epochs: Linear warm-up length before the cosine decay.
        val_every: Score the validation images every this many epochs (and
            always after the last one).
        amp: Mixed precision where it pays: float16 on CUDA, bfloat16 on a CPU
            with bfloat16 instructions, float32 on other CPUs (nucleiseg.models.precision).
        channels_last: Memory format of the model and inputs (faster convolutions).
        num_workers: DataLoader worker processes.
        loss: Loss of the semantic family: ``bce_dice`` is per-channel sigmoid
            binary cross-entropy plus soft Dice, each channel a separate binary map
            (body, border and separation overlap, so no softmax); ``bce`` drops the Dice.
        seed: Seed of weights, crops and augmentation.
        targets: How the training targets are drawn.
        postprocess: U-Net++ probabilities -> instances thresholds used for
            validation and OOF labels.
        maskrcnn: Mask R-CNN anchors, head widths, detection counts and input scale.
        instances: Mask R-CNN detections -> instances thresholds used for
            validation and OOF labels.
    """

    experiment: str = "unetpp_effb0"
    model: str = "unetpp"
    encoder: str = "tu-efficientnet_b0"
    encoder_weights: str | None = None
    init_from: str | None = None
    epochs: int = 30
    samples_per_epoch: int = 576
    batch_size: int = 8
    crop_size: int = 256
    scale_range: tuple[float, float] = (0.6, 1.6)
    colour_augment: bool = True
    colour: ColourParams = field(default_factory=ColourParams)
    input_norm: InputNorm = field(default_factory=InputNorm)
    extra_data: list[dict[str, Any]] = field(default_factory=list)
    modality_weights: dict[str, float] = field(
        default_factory=lambda: {FLUORESCENCE: 1.0, BRIGHTFIELD: 3.0, TISSUE: 2.0}
    )
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    val_every: int = 5
    amp: bool = True
    channels_last: bool = True
    num_workers: int = 1
    loss: str = "bce_dice"
    seed: int = 0
    targets: TargetParams = field(default_factory=TargetParams)
    postprocess: PostprocessParams = field(default_factory=PostprocessParams)
    maskrcnn: MaskRCNNParams = field(default_factory=MaskRCNNParams)
    instances: InstanceParams = field(default_factory=InstanceParams)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), as written to YAML."""
        return plain(dataclasses.asdict(self))

    def for_fold(self, fold: int) -> TrainConfig:
        """The configuration fold ``fold`` trains with: ``{fold}`` in ``init_from`` becomes
        its number, so each fold of a K-fold fine-tune starts from the same fold of an
        earlier run (``runs/<run>/fold{fold}/weights_int8.pt``)."""
        if self.init_from is None or FOLD_FIELD not in self.init_from:
            return self
        return dataclasses.replace(self, init_from=self.init_from.replace(FOLD_FIELD, str(fold)))


FOLD_FIELD = "{fold}"

# What each family changes in the defaults above (the dataclass defaults are U-Net++'s).
# Mask R-CNN: a ResNet-18 FPN is what trains in reasonable time on a CPU; a batch
# of 4 crops of 256 px holds 50-150 nuclei, enough for the box and mask heads;
# plain (not channels_last) tensors, since most of its time is in the heads.
# 16 epochs of 100 steps (6,400 crops) take about 42 min on 2 CPU cores at
# 1.55 s a step (bfloat16); validating 133 whole images takes about 4.5 min, so
# it runs once, after the last epoch, in the same pass as the OOF predictions.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "unetpp": {},
    "maskrcnn": {
        "experiment": "maskrcnn_r18",
        "encoder": "resnet18",
        "batch_size": 4,
        "samples_per_epoch": 400,
        "epochs": 16,
        "lr": 1e-3,
        "val_every": 16,
        "channels_last": False,
    },
}


def plain(value: Any) -> Any:
    """``value`` as YAML writes it safely: nested dicts kept, tuples as lists."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate a config dataclass from a dict, rejecting unknown keys by name."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {name} must be a mapping")
            value = _build(hint, value, f"{where}.{name}")
        elif typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update: nested mappings are merged, other values replaced."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults, the model family's defaults, a YAML file, then explicit overrides.

    The family is the one named by the overrides, else by the file, else U-Net++.

    Args:
        path: YAML file with any subset of the settings (nested for ``targets``
            and ``postprocess``), or None.
        overrides: Settings given on the command line; None values are ignored
            so that unset flags keep the file's value.

    Returns:
        The resolved configuration.

    Raises:
        ValueError: On an unknown setting, naming it.
    """
    loaded: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        loaded = read_yaml(path)  # names the file when it is not a YAML mapping
        where = str(path)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    values = TrainConfig().to_dict()
    family = overrides.get("model", loaded.get("model", values["model"]))
    if family not in FAMILY_DEFAULTS:
        raise ValueError(f"unknown model {family!r}; choose from {', '.join(FAMILY_DEFAULTS)}")
    values = merge(merge(merge(values, FAMILY_DEFAULTS[family]), loaded), overrides)
    config = _build(TrainConfig, values, where)
    parse_sources(config.extra_data)
    return config


def config_changes(
    before: TrainConfig, after: TrainConfig, ignored: tuple[str, ...] = ()
) -> list[str]:
    """Every setting that differs between two configurations, as ``name: old -> new``.

    Nested settings are named with dots (``targets.border_width``).

    Args:
        before: The configuration a run was started with.
        after: The one it would go on with.
        ignored: Top-level settings allowed to differ.

    Returns:
        One entry per differing setting, in the dataclass's order.
    """

    def flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        items = {}
        for key, value in values.items():
            if isinstance(value, dict) and value:
                items |= flat(value, f"{prefix}{key}.")
            else:
                items[f"{prefix}{key}"] = value
        return items

    old, new = flat(before.to_dict()), flat(after.to_dict())
    return [
        f"{name}: {old.get(name)!r} -> {new.get(name)!r}"
        for name in dict.fromkeys([*old, *new])
        if name.split(".")[0] not in ignored and old.get(name) != new.get(name)
    ]


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved configuration as YAML, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
