"""Adapting trained models to a folder of unlabelled images of another domain.

Two ways, both ending in a bundle in the layout of ``weights/`` that
``scripts/predict.py --weights`` reads:

- Self-training on pseudo-labels. The start model (a bundle, a run or one
  fold; every fold model, every test-time view) predicts the target images;
  only its confident nuclei become labels, the pixels it is unsure of stay
  unknown and out of the loss (:mod:`nucleiseg.postprocessing.pseudo_labels`).
  Each U-Net++ fold model then trains, from its own weights, a few epochs at a
  low learning rate on its own training images (the dataset and external
  sources it trained on, outside its fold) with a fixed share of every batch
  drawn from the pseudo-labelled target images
  (:class:`nucleiseg.data.dataset.BatchShare`), and is validated on its
  fold's images, so that the bundle's scores say what the adaptation cost on
  the source domain. A second round pseudo-labels the images again with the
  adapted ensemble and trains on from the adapted weights. Mask R-CNN members
  do not train on pseudo-labels (its box and mask targets have no "unknown"
  pixels): a bundle's Mask R-CNN members are kept as they are, and the
  manifest says so.
- Test-time normalization statistics (``batchnorm_only``): every fold model
  of both families keeps its weights and re-estimates its BatchNorm
  statistics over the target images (:func:`nucleiseg.inference.batchnorm.adapt_batchnorm`).

The flow::

    target images + start model -> plan_adaptation (every input checked, no model)
      -> pseudo-labels (round 1: start ensemble; round 2: adapted ensemble)
      -> engine.train_fold per U-Net++ fold, pseudo-labels in every batch
      -> export: the adapted folds (+ kept Mask R-CNN members), manifest with
         the source folder, image count, settings and pseudo-label counts
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm import tqdm

from nucleiseg.atomic import write_png, write_text
from nucleiseg.competition.folds import DEFAULT_FOLDS_PATH, fold_assignment
from nucleiseg.data.dataset import load_samples
from nucleiseg.data.label_files import write_label_image
from nucleiseg.data.reading import DataError, Sample, labelled_root, read_image
from nucleiseg.data.sizing import resize_image
from nucleiseg.data.sources import load_source, parse_sources
from nucleiseg.data.targets import UNKNOWN
from nucleiseg.inference import tta
from nucleiseg.inference.batchnorm import adapt_batchnorm
from nucleiseg.inference.ensemble import detection_body, labels_from_raws
from nucleiseg.inference.family import (
    Thresholds,
    as_dict,
    get_family,
    image_thresholds,
    params_by_family,
    run_config,
)
from nucleiseg.inference.predictor import (
    FoldModel,
    InferenceOptions,
    load_fold_models,
    with_options,
)
from nucleiseg.locks import folder_lock
from nucleiseg.models.build import build_model, load_weights
from nucleiseg.models.compact import PRECISIONS
from nucleiseg.models.config import TrainConfig, load_config, save_config
from nucleiseg.models.runs import (
    CONFIG,
    EPOCHS_CSV,
    POSTPROCESS_YAML,
    fold_dirs,
    read_run_info,
    run_root,
    split_problem,
    weights_path,
    write_run_info,
    write_split,
)
from nucleiseg.postprocessing.pseudo_labels import PseudoLabelParams, PseudoLabels, pseudo_labels
from nucleiseg.postprocessing.watershed import BODY
from nucleiseg.training import engine
from nucleiseg.training.checks import (
    bundle_problems,
    image_problems,
    labelled_problems,
    output_problems,
    run_problems,
)
from nucleiseg.training.finetune import (
    check_train_settings,
    load_settings,
    plain_floats,
)
from nucleiseg.training.reference import (
    MANIFEST,
    BundlePart,
    export,
    inference_options,
    read_manifest,
)

log = logging.getLogger(__name__)

ADAPT_YAML = "adapt.yaml"
PSEUDO_DIR = "pseudo_labels"
PSEUDO_CSV = "pseudo_labels.csv"
PSEUDO_LABELS = "labels"
PSEUDO_UNKNOWN = "unknown"
BUNDLE_DIR = "bundle"
BATCHNORM_DIR = "batchnorm"
# The families that train on pseudo-labels: those whose targets carry unknown pixels.
SELF_TRAINED = ("unetpp",)


def _training_defaults() -> dict[str, Any]:
    # Adaptation values: a tenth of the from-scratch learning rate (2e-3), so the
    # start weights move little and noisy pseudo-labels cannot pull them far;
    # 3 epochs of 24 steps of 8 crops, validated once at the end on the fold's
    # source images; a warm-up of one epoch while AdamW's moments settle.
    return {"epochs": 3, "samples_per_epoch": 192, "lr": 2e-4, "warmup_epochs": 1, "val_every": 3}


@dataclass
class AdaptConfig:
    """How an adaptation pseudo-labels the target images and trains on them.

    Attributes:
        pseudo: Which nuclei and background the pseudo-labels keep
            (:class:`nucleiseg.postprocessing.pseudo_labels.PseudoLabelParams`).
        share: Share of every batch drawn from the pseudo-labelled images,
            rounded to whole crops (at least one, at most all but one).
        rounds: 1, or 2 to pseudo-label again with the adapted models and train on.
        batchnorm_only: No pseudo-labels and no training: every fold model
            re-estimates its BatchNorm statistics over the target images.
        precision: How the bundle stores the weights: ``int8`` or ``float16``.
        train: Training settings (fields of :class:`nucleiseg.models.config.TrainConfig`)
            laid over each fold model's own configuration; its architecture
            cannot be changed.
    """

    pseudo: PseudoLabelParams = field(default_factory=PseudoLabelParams)
    share: float = 0.25
    rounds: int = 1
    batchnorm_only: bool = False
    precision: str = "int8"
    train: dict[str, Any] = field(default_factory=_training_defaults)

    def __post_init__(self) -> None:
        if isinstance(self.pseudo, Mapping):
            try:
                self.pseudo = PseudoLabelParams(**self.pseudo)
            except TypeError as error:
                raise ValueError(f"pseudo: {error}") from error
        if not 0.0 < self.share < 1.0:
            raise ValueError(f"share must be between 0 and 1, got {self.share}")
        if self.rounds not in (1, 2):
            raise ValueError(f"rounds must be 1 or 2, got {self.rounds}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
        check_train_settings(self.train)

    def per_batch(self, batch_size: int) -> int:
        """Pseudo-labelled crops in each batch of ``batch_size``."""
        return min(max(round(self.share * batch_size), 1), batch_size - 1)


def load_adapt_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> AdaptConfig:
    """The defaults, then a YAML file, then overrides (nested settings are merged).

    Args:
        path: YAML file with any of the :class:`AdaptConfig` settings, or None.
        overrides: Settings given on the command line, in the same shape
            (``{"pseudo": {"agreement": 0.6}}``); None values are ignored.

    Raises:
        ValueError: On an unknown, fixed or out-of-range setting, naming it.
    """
    return load_settings(AdaptConfig, "adaptation settings", path, overrides)


@dataclass(frozen=True)
class FoldPlan:
    """One start fold model to adapt, with the images it trained and was validated on.

    Attributes:
        run: Its run folder (inside a bundle for a bundled model).
        fold: Its fold.
        fold_dir: Its fold folder.
        config: The configuration it was trained with.
        data_dir: The dataset it trained on.
        train_ids: Images of ``data_dir`` it trained on (outside its fold).
        val_ids: Images of its fold, held out.
        modalities: Image id -> modality, for its sampling weights.
    """

    run: Path
    fold: int
    fold_dir: Path
    config: TrainConfig
    data_dir: Path
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    modalities: Mapping[str, str]

    @property
    def name(self) -> str:
        """The adapted run's name (its folder, and the bundle member's ``run``)."""
        return f"{self.run.name}_adapted"


@dataclass
class AdaptPlan:
    """An adaptation, every input checked, ready to run (see :func:`plan_adaptation`).

    Attributes:
        images_dir: The target images' folder.
        images: Target image id -> file.
        source: The start model as given.
        runs: Its run folders (every model pseudo-labels with them).
        folds: The fold models to adapt.
        kept: Bundled runs kept as they are (Mask R-CNN, when self-training),
            with their stored precision.
        params: Family -> thresholds, as the start model predicts.
        options: Test-time views and merge rules of the pseudo-labelling.
        bundle_options: The inference options the bundle records.
        settings: The adaptation settings.
        folds_csv: The folds file the start models trained with.
        out_dir: The adaptation's folder.
        bundle_dir: Where the bundle goes.
    """

    images_dir: Path
    images: dict[str, Path]
    source: Path
    runs: list[Path]
    folds: list[FoldPlan]
    kept: list[BundlePart]
    params: dict[str, Thresholds]
    options: InferenceOptions
    bundle_options: dict[str, Any]
    settings: AdaptConfig
    folds_csv: Path
    out_dir: Path
    bundle_dir: Path


def _output_problems(out_dir: Path, bundle_dir: Path) -> list[str]:
    problems = output_problems(folders=[out_dir, bundle_dir])
    if problems:
        return problems
    if out_dir.is_dir() and any(out_dir.iterdir()):
        problems.append(f"{out_dir}: not empty (another run's folder?); choose another --out-dir")
    if out_dir.resolve().is_relative_to(bundle_dir.resolve()):
        problems.append(f"{bundle_dir}: the bundle would replace the output folder {out_dir}")
    elif bundle_dir.is_dir() and any(bundle_dir.iterdir()):
        problems.append(f"{bundle_dir}: not empty; choose another --bundle")
    return problems


def _start_runs(source: Path) -> tuple[list[Path], list[str]]:
    if (source / MANIFEST).is_file():
        return bundle_problems(source)
    return [source], run_problems([source])


def _default_folds_csv(runs: Sequence[Path]) -> Path:
    """A run's own folds file (a fine-tune writes one), else the committed one."""
    for run in runs:
        own = run_root(run) / "folds.csv"
        if own.is_file():
            return own
    return DEFAULT_FOLDS_PATH


def _fold_plans(
    runs: Sequence[Path], families: Sequence[str], data_dir: Path | None, folds_csv: Path
) -> tuple[list[FoldPlan], list[str]]:
    """Each finished fold of the chosen families with the images it trained on, and problems."""
    plans, problems = [], []
    checked: dict[Path, tuple[dict, list[str]]] = {}
    extra_checked: set[Path] = set()
    for run in runs:
        for fold, fold_dir in fold_dirs(run).items():
            if weights_path(fold_dir) is None:
                continue
            config = load_config(fold_dir / CONFIG)
            if config.model not in families:
                continue
            try:
                data = Path(data_dir or read_run_info(fold_dir)["data_dir"])
            except (FileNotFoundError, KeyError, DataError) as error:
                problems.append(f"{fold_dir}: {error}; pass --data-dir")
                continue
            root = labelled_root(data)
            if root not in checked:
                checked[root] = labelled_problems(root)
                problems += checked[root][1]
            images = checked[root][0]
            for source in parse_sources(config.extra_data):
                if Path(source.path) not in extra_checked:
                    extra_checked.add(Path(source.path))
                    problems += labelled_problems(Path(source.path))[1]
            if not images:
                continue
            try:
                assignment = fold_assignment(folds_csv, images)
            except (DataError, ValueError) as error:
                problems.append(str(error))
                continue
            fold_of = dict(zip(assignment["image_id"], assignment["fold"], strict=True))
            if fold not in set(fold_of.values()):
                problems.append(f"{folds_csv}: no image of fold {fold} ({fold_dir})")
                continue
            if (problem := split_problem(fold_dir, fold_of, folds_csv, [fold])) is not None:
                problems.append(problem)
                continue
            plans.append(
                FoldPlan(
                    run=run_root(run),
                    fold=fold,
                    fold_dir=fold_dir,
                    config=config,
                    data_dir=data,
                    train_ids=tuple(sorted(i for i, k in fold_of.items() if k != fold)),
                    val_ids=tuple(sorted(i for i, k in fold_of.items() if k == fold)),
                    modalities=dict(
                        zip(assignment["image_id"], assignment["modality"], strict=True)
                    ),
                )
            )
    return plans, problems


def plan_adaptation(
    images_dir: str | Path,
    start_from: str | Path,
    settings: AdaptConfig,
    out_dir: str | Path,
    bundle_dir: str | Path | None = None,
    family: str | None = None,
    data_dir: str | Path | None = None,
    folds_csv: str | Path | None = None,
    options: Mapping[str, Any] | None = None,
) -> tuple[AdaptPlan | None, list[str]]:
    """Check an adaptation's outputs, target images, start model and training data.

    No model is built and no image decoded (image files are checked from
    their headers). The output folder must be new or empty: an adaptation
    does not mix its files with another run's.

    Args:
        images_dir: Folder of target images (any layout
            :func:`nucleiseg.data.reading.find_images` reads; no labels needed).
        start_from: A bundle (e.g. ``weights/``), a run folder or a fold folder.
        settings: The adaptation settings.
        out_dir: The adaptation's folder.
        bundle_dir: Where the bundle goes (default ``<out_dir>/bundle``).
        family: Adapt only this family's fold models (the others of a bundle
            still pseudo-label, and are kept as they are).
        data_dir: The dataset the start models trained on (default: each
            fold's ``run.yaml``).
        folds_csv: Their folds file (default: the run's own ``folds.csv``,
            else the committed ``folds/folds.csv``).
        options: Inference option fields for the pseudo-labelling views
            (default: the bundle's, else ``tta: flip``).

    Returns:
        The plan (None when there is a problem) and the problems, one line each.
    """
    images_dir, out_dir, source = Path(images_dir), Path(out_dir), Path(start_from)
    bundle_dir = Path(bundle_dir) if bundle_dir is not None else out_dir / BUNDLE_DIR
    problems = _output_problems(out_dir, bundle_dir)
    images, found = image_problems(images_dir)
    problems += found
    runs, found = _start_runs(source)
    problems += found
    if problems:
        return None, problems
    present = list(dict.fromkeys(run_config(run).model for run in runs))
    adapted = present if settings.batchnorm_only else [f for f in present if f in SELF_TRAINED]
    if family is not None:
        adapted = [f for f in adapted if f == family]
    if not adapted:
        wanted = family or " or ".join(SELF_TRAINED)
        hint = "" if settings.batchnorm_only else " (only U-Net++ trains on pseudo-labels)"
        return None, [f"{source}: no {wanted} model to adapt{hint}; it holds {', '.join(present)}"]
    folds_csv = Path(folds_csv) if folds_csv is not None else _default_folds_csv(runs)
    plans, problems = _fold_plans(
        runs, adapted, None if data_dir is None else Path(data_dir), folds_csv
    )
    bundled = (source / MANIFEST).is_file()
    kept = []
    if bundled:
        members = read_manifest(source)["members"]
        for run in runs:
            if run_config(run).model in adapted:
                continue
            mine = [m for m in members if m["run"] == run.name]
            kept.append(BundlePart(run, tuple(m["fold"] for m in mine), mine[0]["precision"]))
    base = inference_options(source) if bundled else InferenceOptions(tta="flip")
    try:
        chosen = with_options(base, dict(options or {}))
    except (TypeError, ValueError) as error:
        problems.append(f"inference options: {error}")
    if problems:
        return None, problems
    bundle_options = dataclasses.asdict(inference_options(source)) if bundled else {}
    plan = AdaptPlan(
        images_dir=images_dir,
        images=images,
        source=source,
        runs=runs,
        folds=plans,
        kept=kept,
        params=params_by_family(runs),
        options=chosen,
        bundle_options=bundle_options,
        settings=settings,
        folds_csv=folds_csv,
        out_dir=out_dir,
        bundle_dir=bundle_dir,
    )
    return plan, []


def _voter_outputs(
    models: Sequence[FoldModel],
    image: np.ndarray,
    params: Mapping[str, Thresholds],
    device: torch.device,
    options: InferenceOptions,
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """The ensemble's label image, each voter's, and the mean body probability.

    A U-Net++ voter is one fold model in one test-time view (its maps mapped
    back to the image); their mean is the ensemble's maps, as
    :func:`nucleiseg.inference.ensemble.segment_image` averages them. A Mask
    R-CNN voter is one fold model over every view (its views vote inside
    it, as it always predicts).
    """
    params = image_thresholds(params, image)
    raws: dict[str, list] = {}
    voters, bodies = [], []
    one_view = dataclasses.replace(options, tta="none", scales=(1.0,), size_adaptive=False)
    for member in models:
        family = get_family(member.config.model)
        if family.name == "unetpp":
            outputs = []
            for scale, transform in options.views():
                view = tta.apply(resize_image(image, scale), transform)
                maps = family.predict(member.model, view, member.config, device, one_view)
                outputs.append(tta.resize_maps(tta.invert_maps(maps, transform), image.shape[:2]))
            bodies += [maps[BODY] for maps in outputs]
        else:
            outputs = [family.predict(member.model, image, member.config, device, options)]
            bodies += [detection_body(raw) for raw in outputs]
        voters += [family.to_labels(raw, params[family.name]) for raw in outputs]
        raws.setdefault(family.name, []).extend(outputs)
    labels = labels_from_raws(raws, params, options)
    return labels, voters, np.mean(bodies, axis=0)


def make_pseudo_labels(
    models: Sequence[FoldModel],
    images: Mapping[str, np.ndarray],
    params: Mapping[str, Thresholds],
    device: torch.device,
    options: InferenceOptions,
    rule: PseudoLabelParams,
) -> dict[str, PseudoLabels]:
    """Pseudo-labels of target images from an ensemble (see :func:`_voter_outputs`).

    Args:
        models: The ensemble's fold models.
        images: Image id -> RGB uint8 image.
        params: Family -> thresholds.
        device: Where the models run.
        options: Test-time views and merge rules.
        rule: Which nuclei and background the pseudo-labels keep.

    Returns:
        Image id -> pseudo-label, in the order of ``images``.
    """
    found = {}
    for image_id, image in tqdm(images.items(), desc="pseudo-labels", unit="image"):
        labels, voters, body = _voter_outputs(models, image, params, device, options)
        found[image_id] = pseudo_labels(labels, voters, body, rule)
    return found


def write_pseudo_labels(found: Mapping[str, PseudoLabels], folder: Path) -> pd.DataFrame:
    """Write each pseudo-label and a table of what the rule kept.

    ``folder/labels/<id>.png`` holds the kept nuclei (0 elsewhere; 16-bit PNG
    or 32-bit TIFF), ``folder/unknown/<id>.png`` the unknown pixels (255),
    ``folder/pseudo_labels.csv`` one row per image.

    Returns:
        The table: image_id, nuclei, kept, dropped, unknown_share, trained.
    """
    rows = []
    for image_id, found_here in found.items():
        labels = found_here.labels
        write_label_image(folder / PSEUDO_LABELS, image_id, np.maximum(labels, 0))
        write_png(folder / PSEUDO_UNKNOWN / f"{image_id}.png", (labels == UNKNOWN) * np.uint8(255))
        rows.append(
            {
                "image_id": image_id,
                "nuclei": found_here.nuclei,
                "kept": found_here.kept,
                "dropped": found_here.dropped,
                "unknown_share": round(found_here.unknown_share, 6),
                "trained": found_here.kept > 0,
            }
        )
    table = pd.DataFrame(rows)
    write_text(folder / PSEUDO_CSV, table.to_csv(index=False))
    return table


def _pseudo_summary(table: pd.DataFrame) -> dict[str, Any]:
    return {
        "images": len(table),
        "images_trained": int(table["trained"].sum()),
        "nuclei": int(table["nuclei"].sum()),
        "kept": int(table["kept"].sum()),
        "dropped": int(table["dropped"].sum()),
        "unknown_share": float(table["unknown_share"].mean()),
    }


@dataclass(frozen=True)
class AdaptResult:
    """What an adaptation made.

    Attributes:
        folds: Per adapted fold: fold, run, val_loss and val_map on its source
            images after adaptation, minutes.
        pseudo: Per round, the pseudo-label counts (empty for ``batchnorm_only``).
        bundle_dir: The bundle written.
        minutes: Wall time of the whole adaptation.
    """

    folds: list[dict[str, Any]]
    pseudo: list[dict[str, Any]]
    bundle_dir: Path
    minutes: float


def _source_samples(plan: AdaptPlan) -> dict[str, Sample]:
    """Every source image any fold trains or validates on, read once."""
    samples: dict[str, Sample] = {}
    by_root: dict[Path, set[str]] = {}
    for fold in plan.folds:
        by_root.setdefault(labelled_root(fold.data_dir), set()).update(
            fold.train_ids + fold.val_ids
        )
    for root, ids in by_root.items():
        samples.update({s.image_id: s for s in load_samples(root, sorted(ids))})
    return samples


def _fold_config(fold: FoldPlan, plan: AdaptPlan, init_from: Path) -> TrainConfig:
    config = load_config(fold.fold_dir / CONFIG, {**plan.settings.train, "experiment": fold.name})
    return dataclasses.replace(config, init_from=str(init_from), encoder_weights=None)


def _adapted_models(plan: AdaptPlan, run_dirs: Sequence[Path], device) -> list[FoldModel]:
    """The adapted fold models with the kept ones: the ensemble the bundle ships."""
    runs = [*run_dirs, *(part.run for part in plan.kept)]
    return [member for run in runs for member in load_fold_models(run, device)]


def run_adaptation(plan: AdaptPlan, device: torch.device, note: str = "") -> AdaptResult:
    """Pseudo-label and train (or re-estimate BatchNorm), then export the bundle.

    Args:
        plan: From :func:`plan_adaptation`.
        device: Where the models run.
        note: Kept in the bundle's manifest (e.g. the command that made it).

    Returns:
        What was made.

    Raises:
        ValueError: If no target image has a confident nucleus (nothing to train on).
        nucleiseg.atomic.WriteError: If a file cannot be written, naming it.
        nucleiseg.locks.FolderInUse: If another process writes the output folder.
    """
    started = time.perf_counter()
    with folder_lock(plan.out_dir):
        targets = {
            image_id: read_image(path)
            for image_id, path in tqdm(plan.images.items(), desc="target images", unit="image")
        }
        sources = _source_samples(plan)
        if plan.settings.batchnorm_only:
            run_dirs, folds = _batchnorm_round(plan, targets, sources, device)
            pseudo = []
        else:
            run_dirs, folds, pseudo = _self_training(plan, targets, sources, device)
        for run_dir in run_dirs:
            # The start model's tuned thresholds: the target has no labels to tune on.
            thresholds = as_dict(plan.params[run_config(run_dir).model])
            write_text(run_dir / POSTPROCESS_YAML, yaml.safe_dump(thresholds, sort_keys=False))
        parts = [BundlePart(d, None, plan.settings.precision) for d in run_dirs] + plan.kept
        record = _record(plan, folds, pseudo, (time.perf_counter() - started) / 60)
        export(
            parts,
            plan.bundle_dir,
            folds_csv=plan.folds_csv,
            note=note,
            inference=plan.bundle_options,
            sections={"adaptation": record},
        )
        write_text(plan.out_dir / ADAPT_YAML, yaml.safe_dump(record, sort_keys=False))
    return AdaptResult(folds, pseudo, plan.bundle_dir, (time.perf_counter() - started) / 60)


def _self_training(
    plan: AdaptPlan,
    targets: Mapping[str, np.ndarray],
    sources: Mapping[str, Sample],
    device: torch.device,
) -> tuple[list[Path], list[dict[str, Any]], list[dict[str, Any]]]:
    models = [member for run in plan.runs for member in load_fold_models(run, device)]
    init = {(f.run, f.fold): weights_path(f.fold_dir) for f in plan.folds}
    extras = {}
    pseudo, folds, run_dirs = [], [], []
    for round_number in range(1, plan.settings.rounds + 1):
        round_dir = plan.out_dir / f"round{round_number}"
        found = make_pseudo_labels(
            models, targets, plan.params, device, plan.options, plan.settings.pseudo
        )
        table = write_pseudo_labels(found, round_dir / PSEUDO_DIR)
        pseudo.append({"round": round_number, **_pseudo_summary(table)})
        log.info("round %d pseudo-labels: %s", round_number, pseudo[-1])
        models = []  # their memory is the training's now
        trained = [
            Sample(image_id, targets[image_id], found[image_id].labels)
            for image_id in found
            if found[image_id].kept > 0
        ]
        if not trained:
            raise ValueError(
                f"{plan.images_dir}: no target image has a confident nucleus "
                f"({round_dir / PSEUDO_DIR / PSEUDO_CSV}); lower the agreement or min_body"
            )
        folds, run_dirs = [], []
        for fold in plan.folds:
            config = _fold_config(fold, plan, init[(fold.run, fold.fold)])
            for source in parse_sources(config.extra_data):
                if source not in extras:
                    extras[source] = load_source(source)
            fold_dir = round_dir / fold.name / f"fold{fold.fold}"
            train = [sources[i] for i in fold.train_ids]
            val = [sources[i] for i in fold.val_ids]
            used = [extras[s] for s in parse_sources(config.extra_data)]
            per_batch = plan.settings.per_batch(config.batch_size)
            log.info(
                "round %d, %s fold %d: %d source images + %d pseudo-labelled (%d of every %d "
                "crops), %d validation images",
                round_number,
                fold.run.name,
                fold.fold,
                len(train),
                len(trained),
                per_batch,
                config.batch_size,
                len(val),
            )
            write_run_info(
                fold_dir,
                fold=fold.fold,
                data_dir=fold.data_dir,
                device=device,
                amp=config.amp,
                extra_data=[e.source.path for e in used],
            )
            write_split(fold_dir, fold.train_ids, fold.val_ids)
            engine.train_fold(
                config,
                train,
                val,
                fold.modalities,
                fold_dir,
                device,
                extras=used,
                pseudo_labelled=trained,
                pseudo_per_batch=per_batch,
            )
            init[(fold.run, fold.fold)] = weights_path(fold_dir)
            folds.append(_fold_record(round_number, fold, fold_dir))
            run_dirs.append(fold_dir.parent)
        run_dirs = list(dict.fromkeys(run_dirs))
        if round_number < plan.settings.rounds:
            models = _adapted_models(plan, run_dirs, device)
    return run_dirs, folds, pseudo


def _fold_record(round_number: int, fold: FoldPlan, fold_dir: Path) -> dict[str, Any]:
    history = pd.read_csv(fold_dir / EPOCHS_CSV)
    last = history.iloc[-1]
    return {
        "round": round_number,
        "run": fold.name,
        "start": str(fold.fold_dir),
        "fold": fold.fold,
        "val_loss": float(last["val_loss"]),
        "val_map": float(last["val_map"]),
        "minutes": float(history["seconds"].sum()) / 60,
    }


def _batchnorm_round(
    plan: AdaptPlan,
    targets: Mapping[str, np.ndarray],
    sources: Mapping[str, Sample],
    device: torch.device,
) -> tuple[list[Path], list[dict[str, Any]]]:
    folds, run_dirs = [], []
    for fold in plan.folds:
        config = _fold_config(fold, plan, weights_path(fold.fold_dir))
        fold_dir = plan.out_dir / BATCHNORM_DIR / fold.name / f"fold{fold.fold}"
        started = time.perf_counter()
        model = build_model(dataclasses.replace(config, init_from=None)).to(device)
        load_weights(model, weights_path(fold.fold_dir))
        passes = adapt_batchnorm(model, targets.values(), config, device, total=len(targets))
        log.info("%s fold %d: BatchNorm statistics of %d passes", fold.run.name, fold.fold, passes)
        write_run_info(
            fold_dir, fold=fold.fold, data_dir=fold.data_dir, device=device, amp=config.amp
        )
        write_split(fold_dir, fold.train_ids, fold.val_ids)
        config = dataclasses.replace(config, epochs=0)
        save_config(config, fold_dir / CONFIG)
        # No epoch trained: an epochs file with its header alone.
        header = pd.DataFrame(columns=["epoch", "train_loss", "val_loss", "val_map", "seconds"])
        write_text(fold_dir / EPOCHS_CSV, header.to_csv(index=False))
        val_loss, val_map = engine.finish_fold(
            model, config, [sources[i] for i in fold.val_ids], fold_dir, device
        )
        folds.append(
            {
                "round": 0,
                "run": fold.name,
                "start": str(fold.fold_dir),
                "fold": fold.fold,
                "batchnorm_passes": passes,
                "val_loss": val_loss,
                "val_map": val_map,
                "minutes": (time.perf_counter() - started) / 60,
            }
        )
        run_dirs.append(fold_dir.parent)
    return list(dict.fromkeys(run_dirs)), folds


def _source_name(images_dir: Path) -> str:
    """The target folder's name: the folder above when it is an ``images/`` folder."""
    resolved = images_dir.resolve()
    if resolved.name == "images":
        return f"{resolved.parent.parent.name}/{resolved.parent.name}"
    return resolved.name


def _record(
    plan: AdaptPlan, folds: list[dict], pseudo: list[dict], minutes: float
) -> dict[str, Any]:
    """What the adaptation did, with every setting: ``adapt.yaml`` and the manifest's section."""
    method = (
        "batchnorm statistics" if plan.settings.batchnorm_only else "pseudo-label self-training"
    )
    per_batch = sorted({plan.settings.per_batch(f.config.batch_size) for f in plan.folds})
    record = {
        "method": method,
        "images": str(plan.images_dir),
        "source_name": _source_name(plan.images_dir),
        "image_count": len(plan.images),
        "start": str(plan.source),
        "adapted": [f"{f.run.name} fold {f.fold}" for f in plan.folds],
        "kept_as_they_are": [
            f"{part.run.name} fold {', '.join(map(str, part.folds))}" for part in plan.kept
        ],
        "folds_csv": str(plan.folds_csv),
        "pseudo_label_views": {"tta": plan.options.tta, "scales": list(plan.options.scales)},
        "pseudo_per_batch": per_batch if not plan.settings.batchnorm_only else [],
        "settings": dataclasses.asdict(plan.settings),
        "pseudo_labels": pseudo,
        "folds": folds,
        "minutes": round(minutes, 2),
    }
    if plan.kept:
        record["note"] = "Mask R-CNN members do not train on pseudo-labels; they are the start's"
    return plain_floats(record)
