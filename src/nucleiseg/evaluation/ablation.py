"""Leaderboard-style ablations of inference-time choices, scored out of fold.

An ablation file (YAML) lists variants: which runs take part, the test-time
views and tiling, the merge rules and any threshold overrides. Every variant is
scored on the out-of-fold images of its runs (each image by the models of its
own fold), so no variant sees an image its models trained on.

An ablation may also name ``external`` labelled folders (e.g. MoNuSeg test,
held out): every variant is then scored on them too, whole, by the models of
its runs (only those of ``folds`` when it is given), and each gets a column.

Model outputs are the expensive part. A run's raw outputs for a set of views
(probability maps for U-Net++, soft instances for Mask R-CNN) are computed once,
with the seconds they took, and cached under ``<run>/cache/<views>/fold<K>/``
in the run's own OOF layout; variants that only change thresholds or merge
rules reuse them. The instance step and scoring then run in parallel over images.
Size-adaptive variants predict each image twice, the second time at a scale
read off the first, so they have no fixed views to cache: they segment the
images directly (:func:`nucleiseg.inference.ensemble.segment_images`).

A variant's per-image scores on an external folder are cached too, under
``<first run>/cache/external/``, keyed by everything that decides them: the
folder, the folds, the variant's options and thresholds, the device, and each
model file's size and modification time (a retrained fold is a new key). A
leaderboard that gains a row re-scores only that row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
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

from nucleiseg.atomic import atomic_path
from nucleiseg.competition.folds import DEFAULT_FOLDS_PATH, fold_assignment
from nucleiseg.competition.metric import average_precision
from nucleiseg.data import reading
from nucleiseg.data.label_files import label_files
from nucleiseg.data.modality import MODALITIES, classify_modality
from nucleiseg.data.reading import DataError
from nucleiseg.evaluation.summary import cv_summary, score_labelled
from nucleiseg.inference import oof
from nucleiseg.inference.ensemble import labels_from_raws, segment_images
from nucleiseg.inference.family import (
    Thresholds,
    as_dict,
    get_family,
    params_by_family,
    run_config,
    thresholds_for,
    with_settings,
)
from nucleiseg.inference.predictor import InferenceOptions, load_fold_models
from nucleiseg.models.runs import (
    CONFIG,
    WEIGHTS,
    WEIGHTS_INT8,
    fold_dirs,
    read_run_info,
    weights_path,
)

log = logging.getLogger(__name__)

CACHE_DIR = "cache"
TIMING = "timing.json"
_OPTION_KEYS = {f.name for f in dataclasses.fields(InferenceOptions)}
_VARIANT_KEYS = {"name", "runs", "postprocess", "instances", "command"} | _OPTION_KEYS
_FILE_KEYS = {
    "name",
    "data_dir",
    "folds_csv",
    "folds",
    "baseline",
    "defaults",
    "variants",
    "external",
}


@dataclass(frozen=True)
class Variant:
    """One row of a leaderboard.

    Attributes:
        name: Row name.
        runs: Run folders whose models take part.
        options: Views, tiling and merge rules.
        overrides: Family name -> thresholds replacing the run's tuned ones.
        command: How the row's runs were made, when it is worth saying (e.g.
            the training command of a training-time ablation).
    """

    name: str
    runs: tuple[Path, ...]
    options: InferenceOptions = InferenceOptions()
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    command: str = ""


@dataclass(frozen=True)
class Ablation:
    """An ablation file, resolved."""

    name: str
    data_dir: Path
    folds_csv: Path
    baseline: str
    variants: tuple[Variant, ...]
    folds: tuple[int, ...] | None = None
    external: Mapping[str, Path] = field(default_factory=dict)


def _variant(values: Mapping[str, Any], where: str) -> Variant:
    unknown = sorted(set(values) - _VARIANT_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
    if "name" not in values or not values.get("runs"):
        raise ValueError(f"{where}: a variant needs a name and runs")
    option_values = {k: v for k, v in values.items() if k in _OPTION_KEYS}
    if "scales" in option_values:
        option_values["scales"] = tuple(float(s) for s in option_values["scales"])
    overrides = {
        family: dict(values[key])
        for family, key in (("unetpp", "postprocess"), ("maskrcnn", "instances"))
        if values.get(key)
    }
    runs = values["runs"]
    return Variant(
        name=str(values["name"]),
        runs=tuple(Path(r) for r in ([runs] if isinstance(runs, str) else runs)),
        options=InferenceOptions(**option_values),
        overrides=overrides,
        command=str(values.get("command", "")),
    )


def load_ablation(path: str | Path) -> Ablation:
    """Read an ablation file.

    The file holds ``variants`` (a list of mappings with ``name``, ``runs`` and
    any of the :class:`nucleiseg.inference.predictor.InferenceOptions` fields, plus
    ``postprocess`` / ``instances`` threshold overrides), ``defaults`` merged
    into every variant, ``data_dir``, ``folds_csv``, ``folds`` (score only
    these folds' images; default: those every variant's runs have finished),
    ``baseline`` (the variant the deltas are taken against; the first one
    by default) and ``external`` (column name -> labelled folder scored whole).

    Raises:
        ValueError: On an unknown key, naming it and where it is.
    """
    path = Path(path)
    values = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(values) - _FILE_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}")
    defaults = values.get("defaults") or {}
    variants = tuple(
        _variant({**defaults, **v}, f"{path}: variant {i + 1}")
        for i, v in enumerate(values.get("variants") or [])
    )
    if not variants:
        raise ValueError(f"{path}: no variants")
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: variant names used twice: {', '.join(duplicates)}")
    baseline = str(values.get("baseline", names[0]))
    if baseline not in names:
        raise ValueError(f"{path}: baseline {baseline!r} is not a variant")
    return Ablation(
        name=str(values.get("name", path.stem)),
        data_dir=Path(values["data_dir"]) if "data_dir" in values else _run_data_dir(variants),
        folds_csv=Path(values.get("folds_csv", DEFAULT_FOLDS_PATH)),
        baseline=baseline,
        variants=variants,
        folds=tuple(int(k) for k in values["folds"]) if values.get("folds") is not None else None,
        external={str(k): Path(v) for k, v in (values.get("external") or {}).items()},
    )


def _run_data_dir(variants: Sequence[Variant]) -> Path:
    first = next(iter(oof.oof_fold_dirs(variants[0].runs[0]).values()))
    return Path(read_run_info(first)["data_dir"])


def views_key(options: InferenceOptions) -> str:
    """Cache folder name of the options that change a model's raw output."""
    scales = "-".join(f"{s:g}" for s in options.scales)
    tile = f"tile{options.tile}-{options.overlap}" if options.tile else "whole"
    vote = f"vote{options.vote_fraction:g}-{options.vote_iou:g}"
    return f"{options.tta}_x{scales}_{tile}_{vote}"


def _has_finished_fold(run_dir: Path) -> bool:
    try:
        return bool(oof.oof_fold_dirs(run_dir))
    except DataError:  # no fold<K>/oof/labels, or no such folder at all
        return False


def _fold_cache(run_dir: Path, options: InferenceOptions, fold: int) -> Path:
    """Where a fold's out-of-fold raw outputs under these views are cached."""
    return Path(run_dir) / CACHE_DIR / views_key(options) / f"fold{fold}"


def _cached(run_dir: Path, options: InferenceOptions, fold: int) -> bool:
    return (_fold_cache(run_dir, options, fold) / TIMING).is_file()


def missing_weights(
    variants: Sequence[Variant], folds: Sequence[int] | None, external: bool
) -> list[str]:
    """What stops the variants from being scored: finished folds whose model must run but
    whose compact weights are gone (a run kept for its OOF labels and records only).

    A fold's model runs for a size-adaptive variant, for the ``external`` columns, and for
    views whose outputs are not cached (:func:`run_raws`). Only the finished folds of
    ``folds`` (None: every one) count.

    Returns:
        One line per run, naming its folds without weights and the first variant that
        needs them; empty if nothing is missing.
    """
    missing: dict[Path, tuple[list[int], str]] = {}
    for variant in variants:
        for run in variant.runs:
            for fold, fold_dir in oof.oof_fold_dirs(run).items():
                if (folds is not None and fold not in folds) or weights_path(fold_dir):
                    continue
                needed = (
                    variant.options.size_adaptive
                    or external
                    or not _cached(run, variant.options, fold)
                )
                if needed:
                    found, name = missing.setdefault(Path(run), ([], variant.name))
                    if fold not in found:
                        found.append(fold)
    return [
        f"{run}: no {WEIGHTS} or {WEIGHTS_INT8} in fold(s) {', '.join(map(str, sorted(found)))}, "
        f"whose models variant {name!r} runs"
        for run, (found, name) in missing.items()
    ]


def run_raws(
    run_dir: Path,
    options: InferenceOptions,
    data_dir: Path,
    device: torch.device,
    folds: Sequence[int] | None = None,
) -> tuple[dict[str, Any], float]:
    """A run's out-of-fold raw outputs under some views, from the cache or computed now.

    Each fold's models predict the images that fold held out (its
    ``oof/labels``); a fold's cache is complete once its ``timing.json`` exists.
    ``folds`` limits this to some folds (default: every finished one).

    Returns:
        Image id -> raw output, and the model seconds per image.

    Raises:
        FileNotFoundError: If a fold to predict has no outputs cached and no compact
            weights, naming it.
    """
    run_dir = Path(run_dir)
    family = get_family(run_config(run_dir).model)
    images = reading.find_images(reading.labelled_root(data_dir))
    raws: dict[str, Any] = {}
    seconds = count = 0.0
    for fold, fold_dir in oof.oof_fold_dirs(run_dir).items():
        if folds is not None and fold not in folds:
            continue
        cache = _fold_cache(run_dir, options, fold)
        if not _cached(run_dir, options, fold):
            if weights_path(fold_dir) is None:
                raise FileNotFoundError(
                    f"{fold_dir}: no {WEIGHTS} or {WEIGHTS_INT8} to predict its out-of-fold "
                    f"images with, and no outputs cached in {cache}"
                )
            _predict_fold(run_dir, fold, fold_dir, cache, images, options, device)
        timing = json.loads((cache / TIMING).read_text())
        raws.update(family.load_oof(cache))
        seconds += timing["seconds"]
        count += timing["images"]
    return raws, seconds / max(count, 1)


def _predict_fold(run_dir, fold, fold_dir, cache, images, options, device) -> None:
    (member,) = load_fold_models(Path(run_dir) / f"fold{fold}", device)
    family = get_family(member.config.model)
    params = family.params(member.config)
    ids = list(label_files(fold_dir / oof.OOF_DIR / oof.LABELS_DIR))
    seconds = 0.0
    for image_id in tqdm(ids, desc=f"{Path(run_dir).name} fold {fold}", unit="image"):
        image = reading.read_image(images[image_id])
        started = time.perf_counter()
        raw = family.predict(member.model, image, member.config, device, options)
        seconds += time.perf_counter() - started
        family.save_oof(cache, image_id, raw, family.to_labels(raw, params))
    info = {"images": len(ids), "seconds": seconds, "device": str(device)}
    with atomic_path(cache / TIMING) as tmp:
        tmp.write_text(json.dumps(info))


def _models(variant: Variant, device: torch.device, folds: Sequence[int] | None) -> list:
    return [m for run in variant.runs for m in load_fold_models(run, device, folds)]


def direct_oof_labels(
    variant: Variant,
    data_dir: Path,
    device: torch.device,
    folds: Sequence[int] | None = None,
) -> tuple[dict[str, np.ndarray], float]:
    """Out-of-fold label images of a variant, segmented now (no cache), fold by fold.

    Each fold's images (those of its first run's ``oof/labels``) are segmented
    by every run's model of that fold with the variant's options and thresholds.

    Returns:
        Image id -> label image, and the seconds per image.
    """
    images = reading.find_images(reading.labelled_root(data_dir))
    params = variant_params(variant)
    labels: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    for fold, fold_dir in oof.oof_fold_dirs(variant.runs[0]).items():
        if folds is not None and fold not in folds:
            continue
        ids = list(label_files(fold_dir / oof.OOF_DIR / oof.LABELS_DIR))
        members = _models(variant, device, [fold])
        labels.update(
            segment_images(members, {i: images[i] for i in ids}, params, device, variant.options)
        )
    return labels, (time.perf_counter() - started) / max(len(labels), 1)


def external_cache_path(
    variant: Variant, folder: Path, device: torch.device, folds: Sequence[int] | None = None
) -> Path:
    """Where :func:`score_external` keeps a variant's per-image scores on ``folder``."""
    files = []
    for run in variant.runs:
        for fold, fold_dir in fold_dirs(run).items():
            weights = weights_path(fold_dir)
            if weights is None or (folds is not None and fold not in folds):
                continue
            for path in (weights, fold_dir / CONFIG):
                stat = path.stat()
                files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    key = {
        "folder": str(Path(folder).resolve()),
        "folds": None if folds is None else sorted(folds),
        "options": dataclasses.asdict(variant.options),
        "params": {k: as_dict(v) for k, v in sorted(variant_params(variant).items())},
        "device": device.type,
        "files": files,
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(variant.runs[0]) / CACHE_DIR / "external" / f"{Path(folder).name}_{digest}.csv"


def score_external(
    variant: Variant, folder: Path, device: torch.device, folds: Sequence[int] | None = None
) -> float:
    """Mean AP of a variant on a whole labelled folder, by all its runs' models (of ``folds``).

    Per-image scores are read from the cache when an earlier call made them with
    the same folder, folds, options, thresholds, device and model files
    (:func:`external_cache_path`), and written there otherwise.
    """
    cache = external_cache_path(variant, folder, device, folds)
    if cache.is_file():
        return float(pd.read_csv(cache)["score"].mean())
    images = reading.find_images(folder)
    modalities: dict[str, str] = {}

    def note(image_id: str, image: np.ndarray, labels: np.ndarray) -> None:
        modalities[image_id] = classify_modality(image)

    labels = segment_images(
        _models(variant, device, folds),
        images,
        variant_params(variant),
        device,
        variant.options,
        note,
    )
    scores = score_labelled(labels, folder, modalities)[["image_id", "modality", "score"]]
    with atomic_path(cache) as tmp:
        scores.to_csv(tmp, index=False, float_format="%.17g")
    return float(scores["score"].mean())


def variant_params(variant: Variant) -> dict[str, Thresholds]:
    """Thresholds per family: the first run's tuned ones, with the variant's overrides
    (on every modality's where they differ by modality)."""
    params = {
        name: with_settings(base, **variant.overrides.get(name, {}))
        for name, base in params_by_family(variant.runs).items()
    }
    unused = sorted(set(variant.overrides) - set(params))
    if unused:
        raise ValueError(f"{variant.name}: overrides for {', '.join(unused)}, which has no run")
    return params


# Leaderboard columns other than the external data sets' scores.
FIXED_COLUMNS = {"variant", "images", "cv", "delta", *MODALITIES, "seconds_per_image", "command"}

# Filled before the worker pool forks, so that workers read the raw outputs
# without pickling them.
_JOBS: dict[str, Any] = {}


def _score_image(image_id: str) -> tuple[str, float, float]:
    raws = {
        family: [outputs[image_id] for outputs in per_run]
        for family, per_run in _JOBS["raws"].items()
    }
    params = _JOBS["params"]
    if _JOBS["modality"] is not None:
        params = thresholds_for(params, _JOBS["modality"][image_id])
    started = time.perf_counter()
    labels = labels_from_raws(raws, params, _JOBS["options"])
    seconds = time.perf_counter() - started
    return image_id, average_precision(_JOBS["truth"][image_id], labels).score, seconds


def score_variant(
    variant: Variant,
    raws_by_run: Mapping[Path, Mapping[str, Any]],
    truth: Mapping[str, np.ndarray],
    workers: int = 2,
    modality: Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, float]:
    """Mean AP per image of a variant, on the images of ``truth`` that its runs predicted.

    ``modality`` (image id -> modality) picks each image's thresholds where a run's
    depend on it (:class:`nucleiseg.inference.family.ByModality`).

    Returns:
        Frame with image_id and score, and the instance step's seconds per
        image (one worker).
    """
    per_family: dict[str, list] = {}
    for run in variant.runs:
        per_family.setdefault(run_config(run).model, []).append(raws_by_run[run])
    ids = sorted(set(truth).intersection(*(set(raws_by_run[run]) for run in variant.runs)))
    _JOBS.update(
        raws=per_family,
        params=variant_params(variant),
        options=variant.options,
        truth=truth,
        modality=modality,
    )
    try:
        if workers > 1:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                rows = list(
                    tqdm(
                        pool.imap(_score_image, ids, chunksize=4), total=len(ids), desc=variant.name
                    )
                )
        else:
            rows = [_score_image(i) for i in tqdm(ids, desc=variant.name)]
    finally:
        _JOBS.clear()
    frame = pd.DataFrame(rows, columns=["image_id", "score", "seconds"])
    return frame[["image_id", "score"]], float(frame["seconds"].mean())


def run_ablation(ablation: Ablation, device: torch.device, workers: int = 2) -> pd.DataFrame:
    """Score every variant; one row each, in file order.

    Columns: variant, images, cv, one per modality, delta (cv minus the
    baseline's), seconds_per_image (model views + instance step, one image at
    a time on this machine), command.

    Raises:
        FileNotFoundError: Before any model runs, if a finished fold whose model must run
            keeps no compact weights (:func:`missing_weights`), one line per run.
    """
    ready = [v for v in ablation.variants if all(_has_finished_fold(r) for r in v.runs)]
    pending = [v for v in ablation.variants if v not in ready]
    if ablation.baseline in {v.name for v in pending}:
        raise ValueError(f"{ablation.name}: baseline {ablation.baseline!r} has no finished fold")
    for variant in pending:
        log.warning("%s: waiting for its runs (no finished fold yet)", variant.name)
    problems = missing_weights(ready, ablation.folds, bool(ablation.external))
    if problems:
        raise FileNotFoundError("\n".join(problems))
    raws: dict[tuple[Path, str], dict] = {}
    model_seconds: dict[tuple[Path, str], float] = {}
    direct: dict[str, tuple[dict[str, np.ndarray], float]] = {}
    for variant in ready:
        if variant.options.size_adaptive:
            direct[variant.name] = direct_oof_labels(
                variant, ablation.data_dir, device, ablation.folds
            )
            continue
        for run in variant.runs:
            key = (run, views_key(variant.options))
            if key not in raws:
                raws[key], model_seconds[key] = run_raws(
                    run, variant.options, ablation.data_dir, device, ablation.folds
                )
    # Every row is scored on the same images: those all variants' runs predicted
    # (a training-time ablation may have finished only some folds so far).
    covered = [
        set(direct[v.name][0])
        if v.name in direct
        else set.intersection(*(set(raws[(run, views_key(v.options))]) for run in v.runs))
        for v in ready
    ]
    ids = sorted(set.intersection(*covered))
    if not ids:
        raise ValueError(f"{ablation.name}: the variants' runs share no out-of-fold image")
    left_out = len(set.union(*covered)) - len(ids)
    if left_out:
        log.warning("%d images are left out: not every variant's runs predicted them", left_out)
    images = reading.find_images(reading.labelled_root(ablation.data_dir))
    truth = {i: reading.labels_of(images[i]) for i in tqdm(ids, desc="truth", unit="image")}
    modality = fold_assignment(ablation.folds_csv, ids).set_index("image_id")["modality"]

    rows = []
    for variant in ablation.variants:
        if variant in pending:
            rows.append({"variant": variant.name, "images": 0, "command": variant.command})
            continue
        if variant.name in direct:
            labels, seconds = direct[variant.name]
            per_image = [average_precision(truth[i], labels[i]).score for i in ids]
            scores = pd.DataFrame({"image_id": ids, "score": per_image})
        else:
            key = views_key(variant.options)
            per_run = {run: raws[(run, key)] for run in variant.runs}
            scores, instance_seconds = score_variant(
                variant, per_run, truth, workers, modality.to_dict()
            )
            seconds = sum(model_seconds[(run, key)] for run in variant.runs) + instance_seconds
        scores["modality"] = scores["image_id"].map(modality)
        row = {"variant": variant.name, **cv_summary(scores)}
        for name, folder in ablation.external.items():
            row[name] = score_external(variant, folder, device, ablation.folds)
        row["seconds_per_image"] = seconds
        row["command"] = variant.command
        rows.append(row)
    # Column order of a scored row: a row waiting for its runs holds only some columns.
    scored = next(row for row in rows if "cv" in row)
    results = pd.DataFrame(rows).reindex(columns=scored.keys())
    baseline = results.loc[results["variant"] == ablation.baseline, "cv"].iloc[0]
    results.insert(3, "delta", results["cv"] - baseline)
    return results


def update_leaderboard(
    ablation: Ablation, results: pd.DataFrame, device: torch.device, workers: int = 2
) -> pd.DataFrame:
    """Score only what a written leaderboard lacks: new variants and new external columns.

    A variant added to the ablation file since ``results`` was written is scored
    as :func:`run_ablation` scores it; a held-out set added to ``external`` gets
    its column, scored for every row that has none (:func:`score_external`). The
    rows already there keep their out-of-fold columns, so nothing of theirs is
    predicted out of fold again. Rows still waiting for their runs stay empty.

    Args:
        ablation: The ablation, as its file now reads.
        results: Its leaderboard as written earlier (:func:`run_ablation`).
        device: Where the models run.
        workers: Processes for the instance step of new variants.

    Returns:
        The leaderboard in the file's variant order, deltas against the baseline.

    Raises:
        ValueError: If a row of ``results`` names a variant the file no longer has.
        FileNotFoundError: If a model that must run keeps no compact weights
            (:func:`missing_weights`), one line per run.
    """
    variants = {v.name: v for v in ablation.variants}
    gone = sorted(set(results["variant"]) - set(variants))
    if gone:
        raise ValueError(f"{ablation.name}: the leaderboard's rows {gone} are not variants")
    scored = set(results.loc[results["cv"].notna(), "variant"])
    new = [
        v
        for v in ablation.variants
        if v.name not in scored and all(_has_finished_fold(r) for r in v.runs)
    ]
    if new:
        sub = dataclasses.replace(ablation, variants=tuple(new), baseline=new[0].name)
        rows = run_ablation(sub, device, workers)
        results = pd.concat([results[~results["variant"].isin(rows["variant"])], rows])
    results = results.reset_index(drop=True)
    # Rows scored out of fold but missing an external column run their models now.
    external = results.reindex(columns=list(ablation.external))
    unscored = results.loc[results["cv"].notna() & external.isna().any(axis=1), "variant"]
    problems = missing_weights([variants[name] for name in unscored], ablation.folds, True)
    if problems:
        raise FileNotFoundError("\n".join(problems))
    for column, folder in ablation.external.items():
        if column not in results.columns:
            results[column] = np.nan
        for index in results.index[results["cv"].notna() & results[column].isna()]:
            variant = variants[results.at[index, "variant"]]
            results.at[index, column] = score_external(variant, folder, device, ablation.folds)
    order = {name: i for i, name in enumerate(variants)}
    results = results.sort_values("variant", key=lambda names: names.map(order))
    baseline = results.loc[results["variant"] == ablation.baseline, "cv"].iloc[0]
    results["delta"] = results["cv"] - baseline
    external = [c for c in results.columns if c not in FIXED_COLUMNS]
    tail = ["seconds_per_image", "command"]
    head = [c for c in results.columns if c in FIXED_COLUMNS and c not in tail]
    return results[[*head, *external, *tail]].reset_index(drop=True)


def leaderboard_markdown(results: pd.DataFrame, title: str, command: str, machine: str = "") -> str:
    """The results as a Markdown table, best CV first, with the command that made them.

    ``machine`` (see :func:`nucleiseg.models.precision.describe_machine`) says where the
    seconds per image were measured. Variants still waiting for their runs (no
    CV yet) are listed after the table with the command that trains them.
    """
    waiting = results[results["cv"].isna()]
    ranked = results[results["cv"].notna()].sort_values("cv", ascending=False)
    external = [c for c in results.columns if c not in FIXED_COLUMNS]
    header = ["variant", "images", "CV", "delta", *MODALITIES, *external, "s / image"]
    lines = [
        f"# {title}",
        "",
        f"`{command}`",
        "",
        *([f"Seconds per image measured on {machine}.", ""] if machine else []),
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] * len(header)) + " |",
    ]
    for _, row in ranked.iterrows():
        cells = [
            row["variant"],
            str(row["images"]),
            f"{row['cv']:.4f}",
            f"{row['delta']:+.4f}",
            *(f"{row[m]:.4f}" if pd.notna(row[m]) else "" for m in (*MODALITIES, *external)),
            f"{row['seconds_per_image']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    commands = ranked[ranked["command"].astype(bool)]
    if len(commands):
        lines += ["", "Runs:", ""]
        lines += [f"- {row['variant']}: `{row['command']}`" for _, row in commands.iterrows()]
    if len(waiting):
        lines += ["", "Waiting for their runs (no finished fold yet):", ""]
        lines += [
            f"- {row['variant']}: `{row['command']}`"
            if row["command"]
            else f"- {row['variant']} (inference only: waits for the run of a row above)"
            for _, row in waiting.iterrows()
        ]
    return "\n".join(lines) + "\n"
