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

from nucleiseg.atomic import atomic_path, output_problem, write_bytes
from nucleiseg.cli import WEIGHTS_DIR
from nucleiseg.competition.folds import DEFAULT_FOLDS_PATH
from nucleiseg.data.reading import LABEL_IMAGES, TRAIN_STAGE, DataError
from nucleiseg.data.sources import parse_sources
from nucleiseg.evaluation.summary import evaluate_run
from nucleiseg.inference.predictor import InferenceOptions, with_options
from nucleiseg.locks import folder_lock
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
    run_root,
    torch_bytes,
    weights_problem,
)

MANIFEST = "manifest.yaml"
# What every manifest holds; other sections may be added (see :func:`export`).
MANIFEST_KEYS = ("note", "precision", "total_megabytes", "inference", "members", "files")
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


def _bundled_members(run_dir: Path) -> dict[int, dict[str, Any]] | None:
    """The manifest entries of a run inside a bundle, by fold; None for a run folder.

    A bundle keeps no out-of-fold outputs, so a bundled run's members keep the
    scores their manifest records when they go into another bundle.
    """
    if not (run_dir.parent / MANIFEST).is_file():
        return None
    members = read_manifest(run_dir.parent)["members"]
    return {m["fold"]: m for m in members if m["run"] == run_dir.name}


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


def _bundle_sources(part: BundlePart) -> dict[int, tuple[Path, Path]]:
    """The chosen finished folds of a part: fold -> (fold folder, weights file to read).

    The file read is the one the bundle stores when the fold has it (an int8
    bundle also takes folds that keep only their int8 weights, what new runs
    commit), else the float16 one it is made from.
    """
    stored = WEIGHTS if part.precision == "float16" else WEIGHTS_INT8
    chosen = {}
    for k, d in fold_dirs(part.run).items():
        found = [d / name for name in (stored, WEIGHTS) if (d / name).is_file()]
        if found and (part.folds is None or k in part.folds):
            chosen[k] = (d, found[0])
    return chosen


def _is_bundle(folder: Path) -> bool:
    try:
        read_manifest(folder)
    except (DataError, ReferenceWeightsError):
        return False
    return True


def export_problems(parts: Sequence[BundlePart], weights_dir: Path = WEIGHTS_DIR) -> list[str]:
    """What stops an export, found before any work: where it goes and the weights it copies.

    The bundle folder must be writable and either new, empty or a bundle (its
    manifest lists members and files): an export replaces it whole, so any
    other folder is refused, and so is one that is, holds or lies inside a
    fold folder of a run it reads (a new folder inside a run, as a
    fine-tune's ``<run>/bundle``, is allowed). Every weights file to copy must
    match the checksum recorded when it was written (or, without one, its
    archive's CRCs; see :func:`nucleiseg.models.runs.weights_problem`).

    Args:
        parts: Each run with the folds to keep and their precision.
        weights_dir: The bundle to (re)write.

    Returns:
        One line per problem, naming its folder or file; empty when all is well.
    """
    weights_dir = Path(weights_dir)
    problems = [problem] if (problem := output_problem(weights_dir, folder=True)) else []
    if weights_dir.is_dir() and any(weights_dir.iterdir()) and not _is_bundle(weights_dir):
        problems.append(
            f"{weights_dir}: holds files and is not a bundle (no {MANIFEST} listing members "
            "and files); an export replaces its folder whole: give a new or empty one"
        )
    out = weights_dir.resolve()
    for part in parts:
        root = run_root(part.run)
        if out == root.resolve() or root.resolve().is_relative_to(out):
            problems.append(f"{weights_dir}: the bundle would replace the run {root}")
        problems += [
            f"{weights_dir}: the bundle would go inside the fold folder {fold_dir}"
            for fold_dir in fold_dirs(root).values()
            if out.is_relative_to(fold_dir.resolve())
        ]
        problems += [
            f"not exported: {problem}"
            for _, weights in _bundle_sources(part).values()
            if (problem := weights_problem(weights)) is not None
        ]
    return problems


def export(
    parts: Sequence[BundlePart],
    weights_dir: Path = WEIGHTS_DIR,
    data_dir: Path | None = None,
    folds_csv: Path = DEFAULT_FOLDS_PATH,
    max_megabytes: float | None = None,
    note: str = "",
    inference: Mapping[str, Any] | None = None,
    sections: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Copy the chosen fold models of finished runs into a bundle and write its manifest.

    Refuses what :func:`export_problems` finds before any work. The bundle is
    assembled in a hidden ``.<name>.staging`` folder beside ``weights_dir``,
    under the folder's lock (:func:`nucleiseg.locks.folder_lock`), and renamed
    into place at the end, so an interrupted or refused export leaves the old
    bundle as it was and removes its staging folder (the next export removes
    one a killed export left).

    Args:
        parts: Each run with the folds to keep and their precision.
        weights_dir: The bundle to (re)write: a new or empty folder, or a bundle.
        data_dir: Dataset with the true masks, to score each member's
            out-of-fold labels (default: the one in the run's ``run.yaml``).
        folds_csv: Folds file giving each image's fold and modality.
        max_megabytes: Refuse a bundle larger than this.
        note: Free text kept in the manifest (e.g. the command that made it).
        inference: Fields of :class:`nucleiseg.inference.predictor.InferenceOptions` the
            ensemble is meant to run with (e.g. ``{"tta": "flip"}``); the rest
            keep their defaults. The manifest records every field.
        sections: Further sections of the manifest, by name (e.g. ``adaptation``:
            how an adaptation made the bundle, with every setting).

    Returns:
        The manifest written.

    Raises:
        FileNotFoundError: If a run has none of the folds asked for, or a
            chosen fold has no out-of-fold labels to score.
        ValueError: If :func:`export_problems` finds any (one line each), the
            bundle would exceed ``max_megabytes``, or ``inference`` is not a
            valid set of options.
        nucleiseg.locks.FolderInUse: If another process is writing the bundle.
    """
    # Refuses bad fields and values before any work.
    inference = plain(asdict(with_options(InferenceOptions(), dict(inference or {}))))
    sections = dict(sections or {})
    reserved = sorted(set(sections) & set(MANIFEST_KEYS))
    if reserved:
        raise ValueError(f"manifest sections {', '.join(reserved)} are the export's own")
    weights_dir = Path(weights_dir)
    problems = export_problems(parts, weights_dir)
    if problems:
        raise ValueError("\n".join(problems))
    staging = weights_dir.with_name(f".{weights_dir.name}.staging")
    old = weights_dir.with_name(f".{weights_dir.name}.old")
    with folder_lock(weights_dir):
        # Left by a killed export, if there: no other export runs while the lock is held.
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        try:
            members, files = _stage(parts, staging, data_dir, folds_csv)
            megabytes = sum(f["bytes"] for f in files.values()) / 1e6
            if max_megabytes is not None and megabytes > max_megabytes:
                raise ValueError(
                    f"the bundle would take {megabytes:.1f} MB, over the {max_megabytes:g} MB "
                    "allowed: keep fewer folds, int8 precision or lighter models"
                )
            manifest = {
                "note": note,
                "precision": ", ".join(sorted({part.precision for part in parts})),
                "total_megabytes": round(megabytes, 1),
                "inference": inference,
                **sections,
                "members": members,
                "files": files,
            }
            with atomic_path(staging / MANIFEST) as tmp:
                tmp.write_text(yaml.safe_dump(manifest, sort_keys=False))
            if weights_dir.exists():
                weights_dir.rename(old)
            staging.rename(weights_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if old.exists() and not weights_dir.exists():
                old.rename(weights_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    return manifest


def _stage(
    parts: Sequence[BundlePart], staging: Path, data_dir: Path | None, folds_csv: Path
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Copy the parts' files into ``staging``; return the members and the files with their sums."""
    members, files = [], {}
    for part in parts:
        run_dir = Path(part.run)
        weights_name = WEIGHTS if part.precision == "float16" else WEIGHTS_INT8
        chosen = _bundle_sources(part)
        if not chosen:
            raise FileNotFoundError(f"{run_dir}: no finished fold among {part.folds or 'all'}")
        recorded = _bundled_members(run_dir)
        if recorded is None:
            per_image = evaluate_run(run_dir, data_dir, folds_csv)
            unscored = sorted(set(chosen) - set(per_image["fold"]))
        else:
            unscored = sorted(set(chosen) - set(recorded))
        if unscored:
            raise FileNotFoundError(f"{run_dir}: folds {unscored} have no out-of-fold labels")
        names = []
        for k, (d, source) in chosen.items():
            fold_name = f"{run_dir.name}/fold{k}"
            (staging / fold_name).mkdir(parents=True)
            for name in (CONFIG, RUN_INFO):
                shutil.copyfile(d / name, staging / fold_name / name)
            if source.name == weights_name:  # the file as the run keeps it, byte for byte
                shutil.copyfile(source, staging / fold_name / weights_name)
            else:
                trained = torch.load(source, map_location="cpu", weights_only=True)
                stored = torch_bytes(compact_state(trained, part.precision))
                write_bytes(staging / fold_name / weights_name, stored)
            names += [f"{fold_name}/{name}" for name in (CONFIG, RUN_INFO, weights_name)]
            if recorded is None:
                scores = per_image.loc[per_image["fold"] == k, "score"]
                members.append(asdict(_member(run_dir, k, d, scores, weights_name, part.precision)))
            else:
                stored = {"weights": f"{fold_name}/{weights_name}", "precision": part.precision}
                members.append({**recorded[k], **stored})
        if (run_dir / POSTPROCESS_YAML).is_file():
            shutil.copyfile(run_dir / POSTPROCESS_YAML, staging / run_dir.name / POSTPROCESS_YAML)
            names.append(f"{run_dir.name}/{POSTPROCESS_YAML}")
        for name in names:
            path = staging / name
            files[name] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    return members, files
