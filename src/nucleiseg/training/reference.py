"""The reference ensemble: trained weights kept in the repo, with a manifest that checks them.

``weights/`` holds, for every run of the ensemble, the files inference needs in
the run layout of :mod:`nucleiseg.models.runs` (``<run>/fold<K>/config.yaml``,
``run.yaml``, ``weights_fp16.pt`` or ``weights_int8.pt``, and
``<run>/postprocess.yaml`` when the run has tuned thresholds), so that every
function that reads a run folder reads a bundled run the same way.
``weights/manifest.yaml`` lists each file with its size and sha256, each fold
model with its configuration, out-of-fold CV, training time, data and seed, and
every inference option the ensemble was chosen with (test-time views, family
merge, size adaptation; the defaults written out too, so that a later change of
a default does not change how a bundle runs), which the main job and
``scripts/predict.py`` use unless told otherwise.

:func:`verify` checks every listed file before a model is built from it and
names every missing or altered file in one error.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from nucleiseg.atomic import atomic_path, write_bytes
from nucleiseg.cli import WEIGHTS_DIR
from nucleiseg.competition.folds import DEFAULT_FOLDS_PATH
from nucleiseg.data.reading import LABEL_IMAGES, TRAIN_STAGE
from nucleiseg.data.sources import parse_sources
from nucleiseg.evaluation.summary import evaluate_run
from nucleiseg.inference.predictor import InferenceOptions, with_options
from nucleiseg.models.compact import compact_state
from nucleiseg.models.config import load_config, plain
from nucleiseg.models.runs import (
    CONFIG,
    EPOCHS_CSV,
    POSTPROCESS_YAML,
    RUN_INFO,
    WEIGHTS,
    WEIGHTS_INT8,
    fold_dirs,
    read_yaml,
    torch_bytes,
)

MANIFEST = "manifest.yaml"
_CHUNK = 1 << 20


class ReferenceWeightsError(RuntimeError):
    """A bundled file is missing or its content is not the one the manifest lists."""


@dataclass(frozen=True)
class Member:
    """One fold model of the reference ensemble, as the manifest describes it.

    Attributes:
        run: Run name (its folder under ``weights/``).
        family: Model family.
        encoder: Encoder or backbone name.
        fold: Fold the model did not train on.
        config: Path of its full configuration, relative to the bundle.
        weights: Path of its weights, relative to the bundle.
        precision: How they are stored: ``float16`` or ``int8``.
        oof_cv: Mean AP of its out-of-fold predictions (its fold's images),
            made with its float16 weights.
        oof_images: Number of those images.
        train_minutes: Wall time of its training epochs.
        epochs: Epochs trained.
        device: What trained it.
        seed: Its training seed.
        data: The dataset it trained on.
        extra_data: External sources that joined its training images (name,
            path, weight, tile; see :mod:`nucleiseg.data.sources`), empty for none.
    """

    run: str
    family: str
    encoder: str
    fold: int
    config: str
    weights: str
    precision: str
    oof_cv: float
    oof_images: int
    train_minutes: float
    epochs: int
    device: str
    seed: int
    data: str
    extra_data: list[dict[str, Any]] = field(default_factory=list)


def sha256(path: Path) -> str:
    """Hex sha256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(weights_dir: Path = WEIGHTS_DIR) -> dict[str, Any]:
    """The bundle's manifest.

    Raises:
        ReferenceWeightsError: If there is no manifest or it lists no file.
    """
    path = Path(weights_dir) / MANIFEST
    if not path.is_file():
        raise ReferenceWeightsError(
            f"{path} not found: the reference weights are not there. Restore them with "
            "`git checkout -- weights` or pass --runs RUN_DIR to use your own runs."
        )
    manifest = read_yaml(path)
    if not manifest.get("files") or not manifest.get("members"):
        raise ReferenceWeightsError(f"{path}: lists no files or no members")
    return manifest


def inference_options(weights_dir: Path = WEIGHTS_DIR) -> InferenceOptions:
    """The inference options the bundle's manifest gives (defaults for those it leaves out)."""
    return with_options(InferenceOptions(), read_manifest(weights_dir).get("inference") or {})


def verify(weights_dir: Path = WEIGHTS_DIR) -> list[Path]:
    """Check every file the manifest lists, then return the bundled run folders.

    Args:
        weights_dir: The bundle (default ``weights/``).

    Returns:
        The run folders of the ensemble, in manifest order.

    Raises:
        ReferenceWeightsError: Naming every file that is missing, has another
            size or another sha256 than the manifest says.
    """
    weights_dir = Path(weights_dir)
    manifest = read_manifest(weights_dir)
    problems = []
    for name, expected in manifest["files"].items():
        path = weights_dir / name
        if not path.is_file():
            problems.append(f"missing: {path}")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(
                f"corrupt: {path} has {path.stat().st_size} bytes, the manifest {expected['bytes']}"
            )
        elif sha256(path) != expected["sha256"]:
            problems.append(f"corrupt: {path} sha256 differs from the manifest")
    if problems:
        raise ReferenceWeightsError(
            f"{weights_dir / MANIFEST}: {len(problems)} of {len(manifest['files'])} files "
            "failed the check:\n  " + "\n  ".join(problems)
        )
    runs = dict.fromkeys(member["run"] for member in manifest["members"])
    return [weights_dir / run for run in runs]


def _member(
    run_dir: Path,
    fold: int,
    fold_dir: Path,
    oof_score: pd.Series,
    weights_name: str,
    precision: str,
) -> Member:
    config = load_config(fold_dir / CONFIG)
    info = read_yaml(fold_dir / RUN_INFO)
    epochs = pd.read_csv(fold_dir / EPOCHS_CSV)
    return Member(
        run=run_dir.name,
        family=config.model,
        encoder=config.encoder,
        fold=fold,
        config=f"{run_dir.name}/fold{fold}/{CONFIG}",
        weights=f"{run_dir.name}/fold{fold}/{weights_name}",
        precision=precision,
        oof_cv=round(float(oof_score.mean()), 4),
        oof_images=len(oof_score),
        train_minutes=round(float(epochs["seconds"].sum()) / 60, 1),
        epochs=len(epochs),
        device=str(info.get("device", "unknown")),
        seed=config.seed,
        data=f"{_training_images(info.get('data_dir', '?'))}, every image outside fold {fold}",
        extra_data=[asdict(source) for source in parse_sources(config.extra_data)],
    )


def _training_images(data_dir: str) -> str:
    """The training images of a run's data folder: itself when it is an images/ + labels/
    pair (as a fine-tuning set is), else its competition training stage."""
    if (Path(data_dir) / LABEL_IMAGES).is_dir():
        return data_dir
    return f"{data_dir}/{TRAIN_STAGE}"


@dataclass(frozen=True)
class BundlePart:
    """The fold models of one run that go into a bundle, and how they are stored.

    Attributes:
        run: Run folder, with ``fold<K>/`` holding config.yaml, run.yaml,
            epochs.csv and weights_fp16.pt.
        folds: Folds to keep (None: every finished fold).
        precision: ``float16`` copies the weights as trained; ``int8`` stores
            them per output channel at about half the size (:mod:`nucleiseg.models.compact`).
    """

    run: Path
    folds: tuple[int, ...] | None = None
    precision: str = "float16"


def export(
    parts: Sequence[BundlePart],
    weights_dir: Path = WEIGHTS_DIR,
    data_dir: Path | None = None,
    folds_csv: Path = DEFAULT_FOLDS_PATH,
    max_megabytes: float | None = None,
    note: str = "",
    inference: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Copy the chosen fold models of finished runs into a bundle and write its manifest.

    The bundle is assembled in a temporary folder beside ``weights_dir`` and
    renamed into place at the end, so an interrupted or refused export leaves
    the old bundle as it was.

    Args:
        parts: Each run with the folds to keep and their precision.
        weights_dir: The bundle to (re)write.
        data_dir: Dataset with the true masks, to score each member's
            out-of-fold labels (default: the one in the run's ``run.yaml``).
        folds_csv: Folds file giving each image's fold and modality.
        max_megabytes: Refuse a bundle larger than this.
        note: Free text kept in the manifest (e.g. the command that made it).
        inference: Fields of :class:`nucleiseg.inference.predictor.InferenceOptions` the
            ensemble is meant to run with (e.g. ``{"tta": "flip"}``); the rest
            keep their defaults. The manifest records every field.

    Returns:
        The manifest written.

    Raises:
        FileNotFoundError: If a run has none of the folds asked for, or a
            chosen fold has no out-of-fold labels to score.
        ValueError: If the bundle would exceed ``max_megabytes``, or
            ``inference`` is not a valid set of options.
    """
    # Refuses bad fields and values before any work.
    inference = plain(asdict(with_options(InferenceOptions(), dict(inference or {}))))
    weights_dir = Path(weights_dir)
    staging = weights_dir.with_name(f".{weights_dir.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    members, files = [], {}
    for part in parts:
        run_dir, folds, precision = Path(part.run), part.folds, part.precision
        weights_name = WEIGHTS if precision == "float16" else WEIGHTS_INT8
        # An int8 bundle also takes folds that keep only their int8 weights
        # (what new runs commit); a float16 one needs the float16 file.
        sources = (WEIGHTS,) if precision == "float16" else (WEIGHTS_INT8, WEIGHTS)
        chosen = {
            k: d
            for k, d in fold_dirs(run_dir).items()
            if any((d / name).is_file() for name in sources) and (folds is None or k in folds)
        }
        if not chosen:
            raise FileNotFoundError(f"{run_dir}: no finished fold among {folds or 'all'}")
        per_image = evaluate_run(run_dir, data_dir, folds_csv)
        unscored = sorted(set(chosen) - set(per_image["fold"]))
        if unscored:
            raise FileNotFoundError(f"{run_dir}: folds {unscored} have no out-of-fold labels")
        names = []
        for k, d in chosen.items():
            fold_name = f"{run_dir.name}/fold{k}"
            (staging / fold_name).mkdir(parents=True)
            for name in (CONFIG, RUN_INFO):
                shutil.copyfile(d / name, staging / fold_name / name)
            if (d / weights_name).is_file():  # the file as the run keeps it, byte for byte
                shutil.copyfile(d / weights_name, staging / fold_name / weights_name)
            else:
                trained = torch.load(d / WEIGHTS, map_location="cpu", weights_only=True)
                stored = torch_bytes(compact_state(trained, precision))
                write_bytes(staging / fold_name / weights_name, stored)
            names += [f"{fold_name}/{name}" for name in (CONFIG, RUN_INFO, weights_name)]
            scores = per_image.loc[per_image["fold"] == k, "score"]
            members.append(asdict(_member(run_dir, k, d, scores, weights_name, precision)))
        if (run_dir / POSTPROCESS_YAML).is_file():
            shutil.copyfile(run_dir / POSTPROCESS_YAML, staging / run_dir.name / POSTPROCESS_YAML)
            names.append(f"{run_dir.name}/{POSTPROCESS_YAML}")
        for name in names:
            path = staging / name
            files[name] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    megabytes = sum(f["bytes"] for f in files.values()) / 1e6
    if max_megabytes is not None and megabytes > max_megabytes:
        shutil.rmtree(staging)
        raise ValueError(
            f"the bundle would take {megabytes:.1f} MB, over the {max_megabytes:g} MB allowed: "
            "keep fewer folds, int8 precision or lighter models"
        )
    manifest = {
        "note": note,
        "precision": ", ".join(sorted({part.precision for part in parts})),
        "total_megabytes": round(megabytes, 1),
        "inference": inference,
        "members": members,
        "files": files,
    }
    with atomic_path(staging / MANIFEST) as tmp:
        tmp.write_text(yaml.safe_dump(manifest, sort_keys=False))
    old = weights_dir.with_name(f".{weights_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if weights_dir.exists():
        weights_dir.rename(old)
    staging.rename(weights_dir)
    shutil.rmtree(old, ignore_errors=True)
    return manifest
