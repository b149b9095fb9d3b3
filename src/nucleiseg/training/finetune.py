"""Fine-tuning a trained model on a small labelled set of one's own images.

Someone with a few dozen annotated images of a new stain or microscope starts
from a trained model (the reference bundle, a run or one fold of a run) rather
than from random weights: the model keeps its architecture, targets and
thresholds, and trains for a few epochs on the new images at a lower learning
rate (:class:`FinetuneConfig`). The flow::

    images/ + labels/ -> checked samples -> folds of whole images
      -> training images cut into tiles -> engine.train_fold per fold,
         from the start model's weights
      -> thresholds re-tuned on the validation images' raw outputs
      -> a bundle in the layout of weights/, which predict.py --weights uses

Fold 0 of K (1/K of the images, K = ``folds``; see :func:`split_folds`) is
held out for validation; with fewer images than ``every_fold_below`` every
fold trains, so that each image is validated by a model that did not train
on it and every image helps to tune the thresholds (the bundle then holds
all K fold models). Whole images
go into the folds, never tiles, so no validation image shares pixels with a
training one. The validation images' labels and raw outputs stay in each fold's
``oof/`` folder, as after ``scripts/train.py``.

Everything that can be checked is checked before any model loads
(:func:`plan_finetune`): the output folders, the start model's files, and
every image and label image (see :func:`load_labelled_set`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import typing
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from nucleiseg.atomic import write_text
from nucleiseg.competition.folds import FOLD_COLUMNS, write_folds
from nucleiseg.competition.metric import average_precision
from nucleiseg.data.modality import MODALITIES, classify_modality
from nucleiseg.data.reading import (
    LABEL_IMAGES,
    LABEL_LABELS,
    LABEL_SUFFIXES,
    DataError,
    Sample,
    load_sample,
)
from nucleiseg.data.sources import load_source, parse_sources, tile_sample
from nucleiseg.inference.family import (
    Family,
    Params,
    Thresholds,
    for_modality,
    get_family,
    load_params,
    run_config,
)
from nucleiseg.inference.predictor import load_fold_models
from nucleiseg.models.compact import PRECISIONS
from nucleiseg.models.config import TrainConfig, load_config, merge
from nucleiseg.models.runs import (
    CONFIG,
    EPOCHS_CSV,
    POSTPROCESS_YAML,
    fold_dirs,
    read_yaml,
    run_root,
    weights_path,
    write_run_info,
    write_split,
)
from nucleiseg.postprocessing.tuning import coordinate_search, mean_score
from nucleiseg.training import engine
from nucleiseg.training.checks import (
    bundle_problems,
    labelled_problems,
    output_problems,
    run_problems,
)
from nucleiseg.training.reference import (
    MANIFEST,
    BundlePart,
    ReferenceWeightsError,
    export,
    read_manifest,
)

log = logging.getLogger(__name__)

FOLDS_CSV = "folds.csv"
FINETUNE_YAML = "finetune.yaml"
SEARCH_CSV = "postprocess_search.csv"
BUNDLE_DIR = "bundle"

# Settings that make the start model what it is: a fine-tune keeps them.
ARCHITECTURE = ("model", "encoder", "maskrcnn")
# Settings the fine-tune sets itself: the run's name and the weights it starts from.
MANAGED = ("experiment", "init_from", "encoder_weights")


def _training_defaults() -> dict[str, Any]:
    # Fine-tuning values, not from-scratch ones: a quarter of the from-scratch
    # learning rate (2e-3), so the start weights are adjusted rather than
    # overwritten; 8 epochs of 24 steps of 8 crops (1,536 crops, against 17,280
    # for a reference fold), so 10 images fine-tune in minutes on 2 CPU cores;
    # a warm-up of one epoch (1/8 of the steps) while AdamW's moment estimates
    # settle on the new images; validation half-way and at the end. Images are
    # drawn equally often whatever their modality: a user's set is one kind.
    # External sources the start model trained with are not drawn again.
    return {
        "epochs": 8,
        "samples_per_epoch": 192,
        "lr": 5e-4,
        "warmup_epochs": 1,
        "val_every": 4,
        "modality_weights": dict.fromkeys(MODALITIES, 1.0),
        "extra_data": [],
    }


@dataclass
class FinetuneConfig:
    """How a fine-tune splits, cuts and trains a small labelled set.

    Attributes:
        folds: The images are dealt into this many folds (K; fewer when there
            are fewer images), spread by modality; fold 0 is held out to
            validate on and to tune the thresholds on (1/K of the images).
        every_fold_below: With fewer images than this, every fold trains
            (K-fold, K = the number of images): each image is validated by
            the model that did not train on it, and the bundle holds every
            fold model.
        tile: Training images larger than this are cut into tiles of at most
            this side (as external sources are, :func:`nucleiseg.data.sources.tile_sample`),
            so that a large image is drawn as often as its area says.
            Validation images stay whole.
        precision: How the bundle stores the weights: ``int8`` (half the
            size, measured to cost no accuracy) or ``float16``.
        train: Training settings (fields of :class:`nucleiseg.models.config.TrainConfig`)
            laid over the start model's own configuration; its architecture
            (``model``, ``encoder``, ``maskrcnn``) cannot be changed.
    """

    folds: int = 5
    every_fold_below: int = 5
    tile: int = 512
    precision: str = "int8"
    train: dict[str, Any] = field(default_factory=_training_defaults)

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ValueError(f"folds must be at least 2, got {self.folds}")
        if self.tile < 32:
            raise ValueError(f"tile must be at least 32 pixels, got {self.tile}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
        check_train_settings(self.train)


def check_train_settings(train: dict[str, Any]) -> None:
    """Training settings laid over a start model's configuration: known, and not its
    architecture or the weights it starts from.

    Raises:
        ValueError: Naming every unknown or fixed setting.
    """
    known = set(typing.get_type_hints(TrainConfig))
    unknown = sorted(set(train) - known)
    if unknown:
        raise ValueError(f"train: unknown setting(s) {', '.join(unknown)}")
    fixed = sorted(set(train) & {*ARCHITECTURE, *MANAGED})
    if fixed:
        raise ValueError(
            f"train: {', '.join(fixed)} cannot be set: the architecture is the start "
            "model's, and the weights to start from are its own"
        )


def load_finetune_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> FinetuneConfig:
    """The defaults, then a YAML file, then overrides (nested ``train`` settings are merged).

    Args:
        path: YAML file with any of the :class:`FinetuneConfig` settings, or None.
        overrides: Settings given on the command line, in the same shape
            (``{"train": {"epochs": 4}}``); None values are ignored.

    Raises:
        ValueError: On an unknown or fixed setting, naming it.
    """
    return load_settings(FinetuneConfig, "fine-tune settings", path, overrides)


def load_settings(
    cls: type, name: str, path: str | Path | None, overrides: dict[str, Any] | None
) -> Any:
    """A settings dataclass from its defaults, then a YAML file, then overrides (nested
    mappings merged), as fine-tuning and adaptation read theirs.

    Args:
        cls: The settings dataclass.
        name: What the settings are, naming them in errors when no file does.
        path: YAML file with any subset of the settings, or None.
        overrides: Settings given on the command line; None values are ignored.

    Raises:
        ValueError: On an unknown setting, or one the dataclass refuses, naming it.
    """
    values = dataclasses.asdict(cls())
    where = name
    if path is not None:
        loaded = read_yaml(path)
        where = str(path)
        unknown = sorted(set(loaded) - set(values))
        if unknown:
            raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)}")
        values = merge(values, loaded)
    values = merge(values, given_settings(overrides or {}))
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from error


def given_settings(values: dict[str, Any]) -> dict[str, Any]:
    """Settings with the None values (options not given) left out, nested mappings too."""
    return {
        key: given_settings(value) if isinstance(value, dict) else value
        for key, value in values.items()
        if value is not None
    }


@dataclass(frozen=True)
class StartModel:
    """The trained fold model a fine-tune starts from.

    Attributes:
        source: What was given: a bundle, a run or a fold folder.
        fold_dir: Its fold folder (``config.yaml`` and weights).
        weights: Its compact weights.
        config: The configuration it was trained with.
        params: The thresholds it predicts with: its run's tuned ones (by modality
            where they differ by modality), else those it trained with.
    """

    source: Path
    fold_dir: Path
    weights: Path
    config: TrainConfig
    params: Thresholds


def resolve_start(
    source: str | Path, family: str | None = None, fold: int | None = None
) -> tuple[StartModel | None, list[str]]:
    """The fold model to start from, and what is wrong with what was given.

    Args:
        source: A bundle (a folder with ``manifest.yaml``, e.g. ``weights/``),
            a run folder or one of its ``fold<K>`` folders. Every file is
            checked (the bundle against its manifest, a run's weights against
            their recorded checksums) before anything is loaded.
        family: The family to take from a bundle or run holding several
            (default: the first one, U-Net++ in the reference bundle).
        fold: The fold model to take (default: the lowest finished fold).

    Returns:
        The start model (None when there is a problem), and the problems.
    """
    source = Path(source)
    if (source / MANIFEST).is_file():
        runs, problems = bundle_problems(source)
    else:
        runs, problems = [source], run_problems([source])
    if problems:
        return None, problems
    by_family: dict[str, Path] = {}
    for run in runs:
        by_family.setdefault(run_config(run).model, run)
    chosen = family or next(iter(by_family))
    if chosen not in by_family:
        return None, [f"{source}: no {chosen} model; it holds {', '.join(by_family)}"]
    finished = {k: d for k, d in fold_dirs(by_family[chosen]).items() if weights_path(d)}
    fold = min(finished) if fold is None else fold
    if fold not in finished:
        folds = ", ".join(map(str, finished))
        return None, [f"{source}: no finished {chosen} fold {fold}; it has fold(s) {folds}"]
    fold_dir = finished[fold]
    config = load_config(fold_dir / CONFIG)
    return StartModel(source, fold_dir, weights_path(fold_dir), config, load_params(fold_dir)), []


def load_labelled_set(
    folder: str | Path, image_ids: Sequence[str] | None = None
) -> tuple[list[Sample], list[str]]:
    """Read a labelled folder for fine-tuning, collecting every problem rather than the first.

    Errors (one line each, naming the file): a missing folder, unreadable
    images, images without a label image (or a missing ``labels/`` folder),
    label images of another size than their image, in colour, negative or
    fractional, and fewer than 2 labelled images. Warnings: a label image that
    is a binary mask (its separate regions become nuclei, touching nuclei one;
    :class:`nucleiseg.data.reading.BinaryLabelsWarning`), a label image with no
    nucleus, and label images without an image (left out).

    Args:
        folder: ``images/`` + ``labels/`` (or the competition layout with masks).
        image_ids: Read only these images (default: all).

    Returns:
        The samples, in image-id order (empty when there is a problem), and the problems.
    """
    folder = Path(folder)
    if (folder / LABEL_IMAGES).is_dir() and not (folder / LABEL_LABELS).is_dir():
        return [], [
            f"{folder}: holds {LABEL_IMAGES}/ but no {LABEL_LABELS}/ folder beside it; give "
            f"every image a label image {LABEL_LABELS}/<name>.png (0 = background, one value "
            "per nucleus)"
        ]
    images, problems = labelled_problems(folder)
    if image_ids is not None:
        missing = sorted(set(image_ids) - set(images))
        if missing and images:
            problems.append(f"{folder}: no image {', '.join(missing[:5])}")
        images = {i: p for i, p in images.items() if i in set(image_ids)}
    if problems:
        return [], problems
    labels_dir = folder / LABEL_LABELS
    if labels_dir.is_dir() and image_ids is None:
        orphans = sorted(
            p.name
            for p in labels_dir.iterdir()
            if p.suffix.lower() in LABEL_SUFFIXES and p.stem not in images
        )
        if orphans:
            warnings.warn(
                f"{labels_dir}: {len(orphans)} label image(s) without an image, left out: "
                + ", ".join(orphans[:5]),
                UserWarning,
                stacklevel=2,
            )
    samples = []
    for image_id, path in images.items():
        try:
            sample = load_sample(image_id, path)
        except DataError as error:
            problems.append(str(error))
            continue
        if not sample.labels.any():
            warnings.warn(
                f"{path}: its label image holds no nucleus; it trains as background only",
                UserWarning,
                stacklevel=2,
            )
        samples.append(sample)
    if not problems and len(samples) < 2:
        problems.append(
            f"{folder}: {len(samples)} labelled image(s); fine-tuning needs at least 2, one to "
            "train on and one to validate and tune the thresholds on"
        )
    return ([] if problems else samples), problems


def split_folds(
    samples: Sequence[Sample], settings: FinetuneConfig, seed: int
) -> tuple[pd.DataFrame, list[int]]:
    """Folds of whole images, and the folds to train.

    The images are sorted by modality (:func:`nucleiseg.data.modality.classify_modality`),
    shuffled with the seed within each, and dealt to the folds in turn, so
    every modality is spread over the folds as evenly as its count allows and
    fold sizes differ by at most one image (fold 0 the largest), whatever the
    number of images.

    Returns:
        The folds (columns :data:`nucleiseg.competition.folds.FOLD_COLUMNS`, one group per
        image, sorted by image id) and the folds to train: ``[0]`` for a
        held-out split, every fold when there are fewer images than
        ``every_fold_below``.
    """
    ids = sorted(s.image_id for s in samples)
    modalities = {s.image_id: classify_modality(s.image) for s in samples}
    keys = dict(zip(ids, np.random.default_rng(seed).permutation(len(ids)), strict=True))
    k = min(settings.folds, len(ids))
    dealt = sorted(ids, key=lambda i: (modalities[i], keys[i]))
    fold_of = {image_id: n % k for n, image_id in enumerate(dealt)}
    frame = pd.DataFrame(
        {
            "image_id": ids,
            "fold": [fold_of[i] for i in ids],
            "modality": [modalities[i] for i in ids],
            "group": range(len(ids)),
        }
    )
    trained = list(range(k)) if len(ids) < settings.every_fold_below else [0]
    return frame[list(FOLD_COLUMNS)], trained


@dataclass
class FinetunePlan:
    """A fine-tune, every input checked, ready to run (see :func:`plan_finetune`)."""

    images_dir: Path
    samples: list[Sample]
    folds: pd.DataFrame
    trained_folds: list[int]
    start: StartModel
    config: TrainConfig
    settings: FinetuneConfig
    out_dir: Path
    bundle_dir: Path
    scratch: bool = False


def _params_field(family: Family) -> str:
    """The :class:`TrainConfig` field holding a family's thresholds."""
    hints = typing.get_type_hints(TrainConfig)
    return next(name for name, hint in hints.items() if hint is family.params_type)


def _not_empty(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _own_bundle(bundle_dir: Path, run_name: str) -> bool:
    """Whether a bundle holds the models of this run only (so that it may be replaced)."""
    try:
        members = read_manifest(bundle_dir)["members"]
    except (DataError, ReferenceWeightsError):
        return False
    return {member.get("run") for member in members} == {run_name}


def _output_problems(out_dir: Path, bundle_dir: Path, resume: bool) -> list[str]:
    problems = output_problems(folders=[out_dir, bundle_dir])
    if problems:
        return problems
    out, bundle = out_dir.resolve(), bundle_dir.resolve()
    if out.is_relative_to(bundle):
        return [f"{bundle_dir}: the bundle would replace the run folder {out_dir}"]
    if bundle.is_relative_to(out):
        top = out / bundle.relative_to(out).parts[0]
        if run_root(top) != top:  # a fold<K> folder of the run, or a folder inside one
            return [f"{bundle_dir}: the bundle would replace a fold folder of {out_dir}"]
    if not resume and _not_empty(out_dir):
        problems.append(f"{out_dir}: not empty; pass --resume to continue it, or another --out-dir")
    if _not_empty(bundle_dir) and not (resume and _own_bundle(bundle_dir, out_dir.name)):
        problems.append(
            f"{bundle_dir}: exists and is not this fine-tune's bundle; choose another --bundle"
        )
    return problems


def plan_finetune(
    images_dir: str | Path,
    start_from: str | Path,
    settings: FinetuneConfig,
    out_dir: str | Path,
    bundle_dir: str | Path | None = None,
    family: str | None = None,
    fold: int | None = None,
    scratch: bool = False,
    resume: bool = False,
    image_ids: Sequence[str] | None = None,
) -> tuple[FinetunePlan | None, list[str]]:
    """Check a fine-tune's outputs, start model and images, and resolve its configuration.

    No model is built. The output folder must be empty unless ``resume``
    (then its folds file must be the one these images and this seed give),
    and an existing bundle is only replaced when it is this run's own.

    Args:
        images_dir: Labelled folder (see :func:`load_labelled_set`).
        start_from: Bundle, run or fold folder (see :func:`resolve_start`).
        settings: Splitting and training settings.
        out_dir: Run folder to write: folds.csv, fold<K>/, postprocess.yaml,
            postprocess_search.csv, finetune.yaml.
        bundle_dir: Where the bundle goes (default ``<out_dir>/bundle``).
        family: Family to take from a start holding several.
        fold: Fold model to start from.
        scratch: Random weights instead of the start model's (same
            architecture and settings): the baseline a fine-tune is measured against.
        resume: Continue an interrupted fine-tune in ``out_dir``.
        image_ids: Use only these images of the folder.

    Returns:
        The plan (None when there is a problem) and the problems, one line each.
    """
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    bundle_dir = Path(bundle_dir) if bundle_dir is not None else out_dir / BUNDLE_DIR
    problems = _output_problems(out_dir, bundle_dir, resume)
    start, found = resolve_start(start_from, family, fold)
    problems += found
    for source in parse_sources(settings.train.get("extra_data", [])):
        problems += labelled_problems(Path(source.path))[1]
    samples, found = load_labelled_set(images_dir, image_ids)
    problems += found
    if problems:
        return None, problems
    params_field = _params_field(get_family(start.config.model))
    # Thresholds by modality: those of the modality most of the labelled images have.
    modality = Counter(classify_modality(s.image) for s in samples).most_common(1)[0][0]
    config = load_config(
        start.fold_dir / CONFIG,
        {
            **settings.train,
            "experiment": out_dir.name,
            params_field: dataclasses.asdict(for_modality(start.params, modality)),
        },
    )
    config = dataclasses.replace(
        config, init_from=None if scratch else str(start.weights), encoder_weights=None
    )
    folds, trained = split_folds(samples, settings, config.seed)
    existing = out_dir / FOLDS_CSV
    made = folds.to_csv(index=False, lineterminator="\n")  # what write_folds writes
    if resume and existing.is_file() and existing.read_text() != made:
        return None, [f"{existing}: made for other images or another seed; cannot resume"]
    plan = FinetunePlan(
        images_dir, samples, folds, trained, start, config, settings, out_dir, bundle_dir, scratch
    )
    return plan, []


@dataclass(frozen=True)
class FoldResult:
    """One trained fold of a fine-tune.

    Attributes:
        fold: Fold number.
        train_images: Images it trained on (whole images, before tiling).
        train_tiles: Tiles cut from them.
        val_images: Images it was validated on.
        start_val_loss: The start model's loss on those images (NaN from scratch).
        start_val_map: The start model's mean AP on them, with its own thresholds.
        val_loss: The fine-tuned model's loss on them after the last epoch.
        val_map: Its mean AP on them, with the thresholds it trained with.
        train_minutes: Wall time of its epochs.
    """

    fold: int
    train_images: int
    train_tiles: int
    val_images: int
    start_val_loss: float
    start_val_map: float
    val_loss: float
    val_map: float
    train_minutes: float


@dataclass(frozen=True)
class FinetuneResult:
    """What a fine-tune made and how it scores on its validation images.

    Attributes:
        folds: One result per trained fold.
        start_val_map: The start model on every validation image (NaN from scratch).
        val_map: The fine-tuned model(s) on every validation image, with the
            thresholds they trained with (the start model's).
        val_map_tuned: The same with the re-tuned thresholds (optimistic: they
            were chosen on these images).
        params: The re-tuned thresholds.
        bundle_dir: The bundle written.
        minutes: Wall time of the whole fine-tune.
    """

    folds: list[FoldResult]
    start_val_map: float
    val_map: float
    val_map_tuned: float
    params: Params
    bundle_dir: Path
    minutes: float


def _start_scores(
    plan: FinetunePlan, samples: Sequence[Sample], device: torch.device
) -> tuple[float, list[float]]:
    """The start model's mean loss on some images, and its AP on each (NaN from scratch)."""
    if plan.scratch:
        return float("nan"), [float("nan")] * len(samples)
    family = get_family(plan.start.config.model)
    (member,) = load_fold_models(plan.start.fold_dir, device)
    losses, scores = [], []
    for sample in samples:
        loss, raw = family.evaluate(member.model, sample, member.config, device)
        losses.append(loss)
        params = for_modality(plan.start.params, classify_modality(sample.image))
        labels = family.to_labels(raw, params)
        scores.append(average_precision(sample.labels, labels).score)
    return float(np.mean(losses)), scores


def run_finetune(
    plan: FinetunePlan, device: torch.device, resume: bool = False, note: str = ""
) -> FinetuneResult:
    """Train the plan's folds, re-tune the thresholds on their validation images, export a bundle.

    Args:
        plan: From :func:`plan_finetune`.
        device: Where to train.
        resume: Continue folds from their last checkpoints (a finished fold
            is not trained again).
        note: Kept in the bundle's manifest (e.g. the command that made it).

    Returns:
        The scores and where the bundle is.

    Raises:
        nucleiseg.atomic.WriteError: If a file cannot be written, naming it.
    """
    started = time.perf_counter()
    config, out_dir = plan.config, plan.out_dir
    family = get_family(config.model)
    write_folds(plan.folds, out_dir / FOLDS_CSV)
    fold_of = dict(zip(plan.folds["image_id"], plan.folds["fold"], strict=True))
    modality_of = dict(zip(plan.folds["image_id"], plan.folds["modality"], strict=True))
    extras = [load_source(source) for source in parse_sources(config.extra_data)]
    results, start_scores = [], []
    for fold in plan.trained_folds:
        val = [s for s in plan.samples if fold_of[s.image_id] == fold]
        whole = [s for s in plan.samples if fold_of[s.image_id] != fold]
        tiles = {s.image_id: tile_sample(s, plan.settings.tile) for s in whole}
        train = [t for parts in tiles.values() for t in parts]
        modalities = {t.image_id: modality_of[i] for i, parts in tiles.items() for t in parts}
        start_loss, per_image = _start_scores(plan, val, device)
        start_map = float(np.mean(per_image))
        start_scores += per_image
        fold_dir = out_dir / f"fold{fold}"
        log.info(
            "fold %d: %d training images (%d tiles), %d validation images; start model on "
            "them: loss %.4f, mean AP %.4f",
            fold,
            len(whole),
            len(train),
            len(val),
            start_loss,
            start_map,
        )
        write_run_info(
            fold_dir,
            fold=fold,
            data_dir=plan.images_dir,
            device=device,
            amp=config.amp,
            extra_data=[e.source.path for e in extras],
        )
        write_split(fold_dir, [s.image_id for s in whole], [s.image_id for s in val])
        engine.train_fold(
            config, train, val, modalities, fold_dir, device, resume=resume, extras=extras
        )
        history = pd.read_csv(fold_dir / EPOCHS_CSV)
        last = history.iloc[-1]
        results.append(
            FoldResult(
                fold=fold,
                train_images=len(whole),
                train_tiles=len(train),
                val_images=len(val),
                start_val_loss=start_loss,
                start_val_map=start_map,
                val_loss=float(last["val_loss"]),
                val_map=float(last["val_map"]),
                train_minutes=float(history["seconds"].sum()) / 60,
            )
        )

    raws = {}
    for fold in plan.trained_folds:
        raws.update(family.load_oof(out_dir / f"fold{fold}"))
    truth = {s.image_id: s.labels for s in plan.samples if s.image_id in raws}
    start_params = family.params(config)
    if len(raws) < 3:
        log.warning(
            "thresholds re-tuned on %d validation image(s) only: label more images for "
            "thresholds that hold on new ones",
            len(raws),
        )
    best, search = coordinate_search(raws, truth, start_params)
    write_text(out_dir / SEARCH_CSV, search.to_csv(index=False, float_format="%.6g"))
    write_text(
        out_dir / POSTPROCESS_YAML, yaml.safe_dump(dataclasses.asdict(best), sort_keys=False)
    )
    export(
        [BundlePart(out_dir, tuple(plan.trained_folds), plan.settings.precision)],
        plan.bundle_dir,
        data_dir=plan.images_dir,
        folds_csv=out_dir / FOLDS_CSV,
        note=note,
    )
    result = FinetuneResult(
        folds=results,
        start_val_map=float(np.mean(start_scores)),
        val_map=mean_score(raws, truth, start_params),
        val_map_tuned=mean_score(raws, truth, best),
        params=best,
        bundle_dir=plan.bundle_dir,
        minutes=(time.perf_counter() - started) / 60,
    )
    _write_record(plan, result)
    return result


def _write_record(plan: FinetunePlan, result: FinetuneResult) -> None:
    """``finetune.yaml``: what was fine-tuned from what, with which settings, and its scores."""
    record = {
        "images": str(plan.images_dir),
        "image_count": len(plan.samples),
        "start": {
            "source": str(plan.start.source),
            "fold_dir": str(plan.start.fold_dir),
            "weights": None if plan.scratch else str(plan.start.weights),
            "family": plan.config.model,
        },
        "scratch": plan.scratch,
        "settings": dataclasses.asdict(plan.settings),
        "trained_folds": list(plan.trained_folds),
        "bundle": str(result.bundle_dir),
        "thresholds": dataclasses.asdict(result.params),
        "results": {
            "start_val_map": result.start_val_map,
            "val_map": result.val_map,
            "val_map_tuned": result.val_map_tuned,
            "minutes": round(result.minutes, 2),
            "folds": [dataclasses.asdict(f) for f in result.folds],
        },
    }
    text = yaml.safe_dump(plain_floats(record), sort_keys=False)
    write_text(plan.out_dir / FINETUNE_YAML, text)


def plain_floats(value: Any) -> Any:
    """Floats rounded for reading; numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: plain_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_floats(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value
