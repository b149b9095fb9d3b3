"""Model families behind one interface, so that one engine trains, validates and
predicts them all.

A family differs from another only in its builder (``nucleiseg.models.build``), its
training targets (with how a batch of them is collated and turned into a
loss), and its raw output -> instances step. Everything else, the folds, the
crops and their augmentation, the optimiser, checkpoints, the epoch CSV,
resuming, out-of-fold predictions and their scoring, is shared.

- U-Net++: targets are body, border and separation maps; the raw output of
  an image is its probability maps (3, H, W); instances come from a seeded
  watershed (:mod:`nucleiseg.postprocessing.watershed`).
- Mask R-CNN: targets are a box and a mask per nucleus; the raw output is
  scored soft instances; instances come from thresholds, non-maximum
  suppression and overlap resolution (:mod:`nucleiseg.postprocessing.instances`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

from nucleiseg.data.dataset import to_tensor
from nucleiseg.data.intensity import normalize_input
from nucleiseg.data.modality import MODALITIES, classify_modality
from nucleiseg.data.reading import Sample
from nucleiseg.data.targets import make_targets
from nucleiseg.inference import detection, oof, predictor
from nucleiseg.inference.detection import detect
from nucleiseg.inference.predictor import InferenceOptions, predict_logits, predict_probabilities
from nucleiseg.models.config import TrainConfig, load_config
from nucleiseg.models.losses import get_loss
from nucleiseg.models.maskrcnn import detection_targets, rescale_sample
from nucleiseg.models.precision import autocast
from nucleiseg.models.runs import CONFIG, fold_dirs, postprocess_path, read_yaml
from nucleiseg.postprocessing.instances import (
    InstanceParams,
    Instances,
    SoftInstances,
    instances_to_labels,
    merge_views,
)
from nucleiseg.postprocessing.watershed import BODY, PostprocessParams, instances_from_probabilities

Params = PostprocessParams | InstanceParams


@dataclasses.dataclass(frozen=True)
class ByModality:
    """A family's thresholds with their own values for some imaging modalities.

    A run's ``postprocess.yaml`` may hold, beside the thresholds, a ``modalities``
    mapping of modality -> the settings that differ for its images
    (``scripts/tune_postprocess.py --by-modality``); an image's modality is
    :func:`nucleiseg.data.modality.classify_modality` of its pixels.

    Attributes:
        default: The thresholds of every modality without its own.
        modalities: (modality, its thresholds) pairs.
    """

    default: Params
    modalities: tuple[tuple[str, Params], ...] = ()

    def get(self, modality: str) -> Params:
        """The thresholds of images of ``modality``."""
        return dict(self.modalities).get(modality, self.default)

    def as_dict(self) -> dict[str, Any]:
        """The YAML form: the default thresholds, and under ``modalities`` what differs."""
        values = dataclasses.asdict(self.default)
        own = {
            name: {k: v for k, v in dataclasses.asdict(p).items() if values[k] != v}
            for name, p in self.modalities
        }
        return values | {"modalities": own} if own else values


Thresholds = Params | ByModality


def for_modality(params: Thresholds, modality: str) -> Params:
    """One family's thresholds for images of ``modality``."""
    return params.get(modality) if isinstance(params, ByModality) else params


def thresholds_for(params: Mapping[str, Thresholds], modality: str) -> dict[str, Params]:
    """Family name -> the thresholds of images of ``modality``."""
    return {name: for_modality(each, modality) for name, each in params.items()}


def image_thresholds(params: Mapping[str, Thresholds], image: np.ndarray) -> dict[str, Params]:
    """Family name -> the thresholds of this RGB uint8 image (its modality is classified
    only where some family's thresholds depend on it)."""
    if not any(isinstance(each, ByModality) for each in params.values()):
        return dict(params)
    return thresholds_for(params, classify_modality(image))


def with_settings(params: Thresholds, **changes: Any) -> Thresholds:
    """The thresholds with some settings changed (in every modality's, by modality)."""
    if isinstance(params, ByModality):
        return ByModality(
            dataclasses.replace(params.default, **changes),
            tuple((m, dataclasses.replace(p, **changes)) for m, p in params.modalities),
        )
    return dataclasses.replace(params, **changes)


def as_dict(params: Thresholds) -> dict[str, Any]:
    """Thresholds as ``postprocess.yaml`` writes them."""
    return params.as_dict() if isinstance(params, ByModality) else dataclasses.asdict(params)


def _plain(params: Thresholds) -> Params:
    if isinstance(params, ByModality):
        raise TypeError(
            "thresholds by modality: pick an image's with image_thresholds or thresholds_for"
        )
    return params


class Family(ABC):
    """What the engine needs to know about a model family."""

    name: ClassVar[str]
    params_type: ClassVar[type]

    def prepare(self, sample: Sample, config: TrainConfig) -> Sample:
        """A training image as the family trains on it: on the run's intensity scale."""
        return Sample(sample.image_id, network_image(sample.image, config), sample.labels)

    @abstractmethod
    def target_fn(self, config: TrainConfig) -> Callable[[np.ndarray], Any]:
        """Augmented label crop -> training targets of one item."""

    def collate(self, batch: Sequence[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, Any]:
        """Items -> (images (N, 3, H, W), targets of the batch)."""
        return default_collate(batch)

    @abstractmethod
    def training_loss(
        self, model: nn.Module, images: torch.Tensor, targets: Any, config: TrainConfig
    ) -> torch.Tensor:
        """The loss of a batch, already on the model's device; the model is in training mode."""

    @abstractmethod
    def evaluate(
        self, model: nn.Module, sample: Sample, config: TrainConfig, device: torch.device
    ) -> tuple[float, Any]:
        """Loss and raw output of the model on one whole labelled image."""

    @abstractmethod
    def predict(
        self,
        model: nn.Module,
        image: np.ndarray,
        config: TrainConfig,
        device: torch.device,
        options: InferenceOptions | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Any:
        """Raw output of the model for one whole RGB image, over the test-time views of
        ``options`` (None: one whole-image pass); the model is put in eval mode.
        ``progress`` is called with the number of tiles each forward pass covered."""

    @abstractmethod
    def tile_count(
        self, shape: tuple[int, int], config: TrainConfig, options: InferenceOptions
    ) -> int:
        """Forward passes (tiles, over every view) :meth:`predict` makes for an image of this
        (H, W)."""

    @abstractmethod
    def to_labels(self, raw: Any, params: Params) -> np.ndarray:
        """Raw output -> int32 label image, 0 = background."""

    @abstractmethod
    def combine(self, raws: Iterable[Any], options: InferenceOptions) -> Any:
        """One raw output from those of several models (folds) for the same image
        (a sequence, or an iterator consumed once as the models predict)."""

    @abstractmethod
    def instances(self, raw: Any, params: Params) -> SoftInstances:
        """Scored binary instances (as 0/1 soft masks), for merging with another family."""

    @abstractmethod
    def params(self, config: TrainConfig) -> Params:
        """The raw output -> instances thresholds of a configuration."""

    @abstractmethod
    def save_oof(self, fold_dir: Path, image_id: str, raw: Any, labels: np.ndarray) -> None:
        """Write one image's out-of-fold raw output and label image."""

    @abstractmethod
    def load_oof(self, fold_dir: Path) -> dict[str, Any]:
        """The saved out-of-fold raw outputs of one fold, by image id."""


class UnetPlusPlusFamily(Family):
    """U-Net++ with body, border and separation maps and a seeded watershed."""

    name = "unetpp"
    params_type = PostprocessParams

    def target_fn(self, config: TrainConfig) -> Callable[[np.ndarray], torch.Tensor]:
        return functools.partial(_semantic_targets, params=config.targets)

    def training_loss(self, model, images, targets, config):
        with autocast(images.device, config.amp):
            logits = model(images)
        return get_loss(config.loss)(logits, targets)

    def evaluate(self, model, sample, config, device):
        model.eval()
        logits = predict_logits(model, network_image(sample.image, config), device, config.amp)
        targets = _semantic_targets(sample.labels, config.targets)
        loss = get_loss(config.loss)(logits[None], targets[None]).item()
        return loss, torch.sigmoid(logits).numpy()

    def predict(self, model, image, config, device, options=None, progress=None):
        model.eval()
        image = network_image(image, config)
        return predict_probabilities(model, image, device, config.amp, options, progress)

    def tile_count(self, shape, config, options):
        return predictor.tile_count(shape, options)

    def to_labels(self, raw, params):
        return instances_from_probabilities(raw, _plain(params))

    def combine(self, raws, options):
        # Averaged maps: the models' agreement decides every boundary. Summed as they
        # come, so that only one model's maps exist beside the sum (the same float32
        # sum, in the same order, as a mean over the stacked maps).
        total, count = None, 0
        for raw in raws:
            total = np.array(raw, copy=True) if total is None else np.add(total, raw, out=total)
            count += 1
        if total is None:
            raise ValueError("no maps to combine")
        total /= count
        return total

    def instances(self, raw, params):
        return scored_instances(self.to_labels(raw, params), raw[BODY])

    def params(self, config):
        return config.postprocess

    def save_oof(self, fold_dir, image_id, raw, labels):
        oof.save_prediction(fold_dir, image_id, raw, labels)

    def load_oof(self, fold_dir):
        return oof.load_probabilities(fold_dir)


def network_image(image: np.ndarray, config: TrainConfig) -> np.ndarray:
    """A whole RGB image on the intensity scale its run trains and predicts on
    (:func:`nucleiseg.data.intensity.normalize_input` with ``config.input_norm``)."""
    return normalize_input(image, config.input_norm)


def scored_instances(labels: np.ndarray, body: np.ndarray) -> SoftInstances:
    """U-Net++ nuclei as instances, each scored by its mean body probability."""
    instances = Instances.from_labels(labels)
    scores = [
        float(body[y0:y1, x0:x1][mask].mean())
        for (y0, x0, y1, x1), mask in zip(instances.boxes, instances.masks, strict=True)
    ]
    scored = Instances(instances.shape, np.asarray(scores, float), instances.boxes, instances.masks)
    return SoftInstances.from_instances(scored)


def confident_instances(raw: SoftInstances, params: InstanceParams) -> SoftInstances:
    """Mask R-CNN instances above its score threshold, masks binarized at its mask threshold."""
    binary = raw.subset(raw.scores > params.score_threshold).binarize(params.mask_threshold)
    return SoftInstances.from_instances(binary)


def _semantic_targets(labels: np.ndarray, params) -> torch.Tensor:
    return torch.from_numpy(make_targets(labels, params).astype(np.float32))


class MaskRCNNFamily(Family):
    """torchvision's Mask R-CNN with a ResNet-FPN backbone, set up for nuclei."""

    name = "maskrcnn"
    params_type = InstanceParams

    def prepare(self, sample, config):
        return rescale_sample(super().prepare(sample, config), config.maskrcnn)

    def target_fn(self, config):
        return detection_targets

    def collate(self, batch):
        images, targets = zip(*batch, strict=True)
        return torch.stack(images), list(targets)

    def training_loss(self, model, images, targets, config):
        device = images.device
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        with autocast(device, config.amp):
            losses = model(list(images), targets)
        return sum(loss.float() for loss in losses.values())

    @torch.no_grad()
    def evaluate(self, model, sample, config, device):
        scaled = self.prepare(sample, config)
        image = to_tensor(scaled.image).to(device)
        targets = {k: v.to(device) for k, v in detection_targets(scaled.labels).items()}
        # The losses exist only in training mode; batch norm stays in eval mode so
        # that validation does not move its running statistics.
        model.train()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        with autocast(device, config.amp):
            losses = model([image], [targets])
        model.eval()
        loss = float(sum(v.float() for v in losses.values()))
        return loss, self.predict(model, sample.image, config, device)

    def predict(self, model, image, config, device, options=None, progress=None):
        image = network_image(image, config)
        return detect(model, image, config.maskrcnn, device, config.amp, options, progress)

    def tile_count(self, shape, config, options):
        return detection.tile_count(shape, config.maskrcnn, options)

    def to_labels(self, raw: SoftInstances, params: InstanceParams) -> np.ndarray:
        return instances_to_labels(raw, _plain(params))

    def combine(self, raws, options):
        # Found by at least ceil(vote_fraction x models) models, masks averaged.
        raws = list(raws)
        if len(raws) == 1:
            return raws[0]
        min_votes = max(1, math.ceil(options.vote_fraction * len(raws)))
        return merge_views(raws, options.vote_iou, min_votes)

    def instances(self, raw, params):
        return confident_instances(raw, params)

    def params(self, config):
        return config.instances

    def save_oof(self, fold_dir, image_id, raw, labels):
        oof.save_prediction(fold_dir, image_id, None, labels)
        oof.save_instances(fold_dir, image_id, raw)

    def load_oof(self, fold_dir):
        return oof.load_instances(fold_dir)


FAMILIES: dict[str, Family] = {f.name: f for f in (UnetPlusPlusFamily(), MaskRCNNFamily())}


def get_family(name: str) -> Family:
    """The family called ``name``.

    Raises:
        KeyError: For an unknown family, listing the known ones.
    """
    if name not in FAMILIES:
        raise KeyError(f"unknown model {name!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES[name]


def run_config(run_dir: str | Path) -> TrainConfig:
    """The configuration of a run's first fold that has one.

    Raises:
        FileNotFoundError: If no fold folder holds a ``config.yaml``.
    """
    for fold_dir in fold_dirs(run_dir).values():
        if (fold_dir / CONFIG).is_file():
            return load_config(fold_dir / CONFIG)
    raise FileNotFoundError(f"{run_dir}: no fold<K>/{CONFIG}")


def load_params(run_dir: str | Path) -> Thresholds:
    """The run's tuned thresholds (``postprocess.yaml``), else those its folds trained with.

    The thresholds are those of the run's family: watershed thresholds for
    U-Net++, instance thresholds for Mask R-CNN. Given one fold folder, they
    are those of its run: the ``postprocess.yaml`` of the folder above.
    """
    run_dir = Path(run_dir)
    config = run_config(run_dir)
    family = get_family(config.model)
    tuned = postprocess_path(run_dir)
    if tuned.is_file():
        return read_params(tuned, family)
    return family.params(config)


def read_params(path: str | Path, family: Family) -> Thresholds:
    """Thresholds of ``family`` from a YAML file such as a run's ``postprocess.yaml``.

    Settings the file leaves out keep their defaults. A ``modalities`` mapping
    (modality -> the settings that differ for its images) gives a
    :class:`ByModality`.

    Raises:
        ValueError: If the file names settings the family does not have, or
            modalities that do not exist.
        nucleiseg.data.reading.DataError: If it is not a YAML mapping, naming it.
    """
    values = read_yaml(path)
    own = values.pop("modalities", None)
    known = {f.name for f in dataclasses.fields(family.params_type)}

    def check(settings: Any, where: str) -> None:
        if not isinstance(settings, dict):
            raise ValueError(f"{path}: {where.rstrip()} must be a mapping of settings")
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"{path}: {where}not {family.name} settings: {', '.join(unknown)}")

    check(values, "")
    default = family.params_type(**values)
    if own is None:
        return default
    if not isinstance(own, dict) or not own:
        raise ValueError(f"{path}: modalities must map modalities to the settings that differ")
    strange = sorted(set(own) - set(MODALITIES))
    if strange:
        raise ValueError(
            f"{path}: unknown modalities {', '.join(map(str, strange))}; "
            f"choose from {', '.join(MODALITIES)}"
        )
    for modality, settings in own.items():
        check(settings, f"modalities: {modality}: ")
    return ByModality(
        default,
        tuple((m, dataclasses.replace(default, **own[m])) for m in MODALITIES if m in own),
    )


def params_by_family(runs: Sequence[str | Path]) -> dict[str, Thresholds]:
    """Thresholds per family: those of the first run of each family (see :func:`load_params`)."""
    params: dict[str, Thresholds] = {}
    for run in runs:
        name = run_config(run).model
        if name not in params:
            params[name] = load_params(run)
    return params
