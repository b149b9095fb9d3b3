"""Learning curves: what starting from a trained model buys over random weights, by set size.

For each number of images n and seed s, n images of a labelled training folder
are drawn (the first n of one seeded permutation, so a smaller set is part of
every larger one) and fine-tuned twice with the same settings and the same
budget (:mod:`nucleiseg.training.finetune`): from the start model's weights, and from
random weights of the same architecture (with the ``scratch`` settings, e.g.
the from-scratch learning rate). Each model's bundle is then scored on a
held-out labelled folder that never trains or tunes anything, and so is the
start model itself (n = 0: no fine-tuning).

A point (arm, n, seed) is finished once its ``point.json`` is written, last;
a later run skips finished points, and an interrupted point resumes from its
folds' last checkpoints. After every point the leaderboard (CSV and
Markdown) and the plot (mean AP against n, one curve per arm) are written
again from every finished point, so they show the curve so far.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from nucleiseg.atomic import atomic_path, write_text
from nucleiseg.data.reading import find_images
from nucleiseg.evaluation.ablation import Variant, score_external
from nucleiseg.inference.predictor import InferenceOptions
from nucleiseg.models.config import merge
from nucleiseg.models.runs import read_yaml
from nucleiseg.training.checks import labelled_problems, output_problems
from nucleiseg.training.finetune import (
    BUNDLE_DIR,
    FinetuneConfig,
    load_finetune_config,
    plan_finetune,
    resolve_start,
    run_finetune,
)
from nucleiseg.training.reference import inference_options, verify

log = logging.getLogger(__name__)

FINETUNED = "fine-tuned"
SCRATCH = "from scratch"
START = "start model, not fine-tuned"
ARMS = (FINETUNED, SCRATCH)
POINT_JSON = "point.json"
START_JSON = "start.json"
_ARM_DIRS = {FINETUNED: "finetuned", SCRATCH: "scratch"}
_FILE_KEYS = {
    "name",
    "train",
    "test",
    "start",
    "family",
    "fold",
    "sizes",
    "seeds",
    "work_dir",
    "finetune",
    "scratch",
}
COLUMNS = [
    "arm",
    "images",
    "seed",
    "train_images",
    "val_images",
    "folds",
    "start_val_map",
    "val_map",
    "val_map_tuned",
    "test_map",
    "train_minutes",
    "minutes",
    "test_seconds_per_image",
    "subset",
]


@dataclass(frozen=True)
class Curve:
    """A learning-curve file, resolved.

    Attributes:
        name: Name of the leaderboard files (``<name>.csv``, ``.md``, ``.png``).
        train: Labelled folder the subsets are drawn from.
        test: Labelled folder every model is scored on; it never trains anything.
        start: Bundle, run or fold folder the fine-tuned arm starts from (and
            whose architecture and settings the from-scratch arm takes).
        sizes: Numbers of training images, each one point per arm and seed.
        seeds: Seeds: each draws its own subsets and seeds the training.
        work_dir: Where each point's run folder (and bundle) goes.
        family: Family of the start model, for a start holding several.
        fold: Fold model of the start (default: the lowest).
        finetune: Fine-tune settings shared by both arms (see
            :class:`nucleiseg.training.finetune.FinetuneConfig`).
        scratch: Training settings the from-scratch arm changes (e.g. ``lr``).
    """

    name: str
    train: Path
    test: Path
    start: Path
    sizes: tuple[int, ...]
    work_dir: Path
    seeds: tuple[int, ...] = (0,)
    family: str | None = None
    fold: int | None = None
    finetune: Mapping[str, Any] = field(default_factory=dict)
    scratch: Mapping[str, Any] = field(default_factory=dict)

    def settings(self, arm: str, seed: int) -> FinetuneConfig:
        """The fine-tune settings of one arm and seed."""
        train = {"seed": seed, **(self.scratch if arm == SCRATCH else {})}
        return load_finetune_config(overrides=merge(dict(self.finetune), {"train": train}))

    def point_dir(self, arm: str, images: int, seed: int) -> Path:
        """The run folder of one point, e.g. ``<work_dir>/finetuned_n05_seed0``."""
        return self.work_dir / f"{_ARM_DIRS[arm]}_n{images:02d}_seed{seed}"


def load_curve(path: str | Path) -> Curve:
    """Read a learning-curve file (YAML; keys as the fields of :class:`Curve`).

    Raises:
        ValueError: On an unknown or missing key, or settings that do not
            resolve, naming the file.
    """
    path = Path(path)
    values = read_yaml(path)
    unknown = sorted(set(values) - _FILE_KEYS)
    missing = sorted({"train", "test", "start", "sizes", "work_dir"} - set(values))
    if unknown or missing:
        raise ValueError(
            f"{path}: unknown key(s) {', '.join(unknown) or 'none'}, "
            f"missing key(s) {', '.join(missing) or 'none'}"
        )
    sizes = tuple(int(n) for n in values["sizes"])
    if not sizes or min(sizes) < 2:
        raise ValueError(f"{path}: sizes must be numbers of images of at least 2, got {sizes}")
    curve = Curve(
        name=str(values.get("name", path.stem)),
        train=Path(values["train"]),
        test=Path(values["test"]),
        start=Path(values["start"]),
        sizes=tuple(sorted(set(sizes))),
        work_dir=Path(values["work_dir"]),
        seeds=tuple(int(s) for s in values.get("seeds", [0])),
        family=values.get("family"),
        fold=values.get("fold"),
        finetune=dict(values.get("finetune") or {}),
        scratch=dict(values.get("scratch") or {}),
    )
    try:
        for arm in ARMS:
            curve.settings(arm, curve.seeds[0])
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    return curve


def draw_subset(image_ids: Sequence[str], size: int, seed: int) -> list[str]:
    """``size`` image ids drawn with a seed: the first ``size`` of one seeded permutation.

    The permutation depends only on the sorted ids and the seed, so the
    subsets of one seed are nested: each is part of every larger one.

    Returns:
        The ids, sorted.

    Raises:
        ValueError: If there are fewer ids than ``size``.
    """
    ids = sorted(image_ids)
    if size > len(ids):
        raise ValueError(f"cannot draw {size} images from {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in order[:size])


def curve_problems(curve: Curve, out_dir: Path, tables_only: bool = False) -> list[str]:
    """What stops a curve, found before any model loads: folders, sizes, the start model.

    The test images must not share an id with the training images. With ``tables_only``
    (the tables rewritten from the finished points, no model run) the start model is not
    checked, so a curve whose start weights are gone can still be tabulated.
    """
    problems = output_problems(folders=[curve.work_dir, out_dir])
    train, found = labelled_problems(curve.train)
    problems += found
    test, found = labelled_problems(curve.test)
    problems += found
    shared = sorted(set(train) & set(test))
    if shared:
        problems.append(
            f"{curve.test}: {len(shared)} image(s) also in {curve.train} (e.g. {shared[0]}); "
            "the test images must never train anything"
        )
    if train and max(curve.sizes) > len(train):
        problems.append(f"{curve.train}: {len(train)} images, fewer than {max(curve.sizes)}")
    if not tables_only:
        problems += resolve_start(curve.start, curve.family, curve.fold)[1]
    return problems


def score_bundle(
    runs: Sequence[Path], options: InferenceOptions, folder: Path, device: torch.device
) -> tuple[float, float]:
    """Mean AP of some runs' models on a labelled folder, and the seconds per image."""
    started = time.perf_counter()
    variant = Variant(name="point", runs=tuple(runs), options=options)
    score = score_external(variant, folder, device)
    return score, (time.perf_counter() - started) / len(find_images(folder))


def _write_json(path: Path, record: dict) -> None:
    write_text(path, json.dumps(record, indent=1) + "\n")


def _start_point(curve: Curve, device: torch.device) -> dict:
    """The start model on the test images, with the points' inference options (whole images,
    no views), cached in ``<work_dir>/start.json``."""
    path = curve.work_dir / START_JSON
    if path.is_file():
        return json.loads(path.read_text())
    start, _ = resolve_start(curve.start, curve.family, curve.fold)
    score, seconds = score_bundle([start.fold_dir], InferenceOptions(), curve.test, device)
    record = {"arm": START, "images": 0, "test_map": score, "test_seconds_per_image": seconds}
    _write_json(path, record)
    return record


def run_point(
    curve: Curve, arm: str, images: int, seed: int, device: torch.device, note: str = ""
) -> dict:
    """Fine-tune one point (or resume it), score its bundle on the test folder, record it.

    Returns:
        The point's record (also written to its ``point.json``).

    Raises:
        ValueError: If the fine-tune is refused, with its problems.
    """
    point_dir = curve.point_dir(arm, images, seed)
    subset = draw_subset(find_images(curve.train), images, seed)
    plan, problems = plan_finetune(
        curve.train,
        curve.start,
        curve.settings(arm, seed),
        point_dir,
        point_dir / BUNDLE_DIR,
        family=curve.family,
        fold=curve.fold,
        scratch=arm == SCRATCH,
        resume=True,
        image_ids=subset,
    )
    if problems:
        raise ValueError(f"{point_dir}: " + "; ".join(problems))
    result = run_finetune(plan, device, resume=True, note=note)
    test_map, seconds = score_bundle(
        verify(result.bundle_dir), inference_options(result.bundle_dir), curve.test, device
    )
    record = {
        "arm": arm,
        "images": images,
        "seed": seed,
        "train_images": max(f.train_images for f in result.folds),
        "val_images": sum(f.val_images for f in result.folds),
        "folds": len(result.folds),
        "start_val_map": result.start_val_map,
        "val_map": result.val_map,
        "val_map_tuned": result.val_map_tuned,
        "test_map": test_map,
        "train_minutes": sum(f.train_minutes for f in result.folds),
        "minutes": result.minutes + seconds * len(find_images(curve.test)) / 60,
        "test_seconds_per_image": seconds,
        "subset": ";".join(subset),
    }
    _write_json(point_dir / POINT_JSON, record)
    return record


def finished_points(curve: Curve) -> pd.DataFrame:
    """Every finished point of the curve's arms, sizes and seeds, with the start model's row."""
    rows = []
    start = curve.work_dir / START_JSON
    if start.is_file():
        rows.append(json.loads(start.read_text()))
    for seed in curve.seeds:
        for images in curve.sizes:
            for arm in ARMS:
                path = curve.point_dir(arm, images, seed) / POINT_JSON
                if path.is_file():
                    rows.append(json.loads(path.read_text()))
    return pd.DataFrame(rows).reindex(columns=COLUMNS)


def run_curve(
    curve: Curve, device: torch.device, out_dir: Path, command: str = "", machine: str = ""
) -> pd.DataFrame:
    """Run every unfinished point, rewriting the leaderboard and the plot after each.

    Args:
        curve: The curve.
        device: Where to train and predict.
        out_dir: Where ``<name>.csv``, ``<name>.md`` and ``<name>.png`` go.
        command: The command that made the curve, kept in the Markdown.
        machine: Where it ran (:func:`nucleiseg.models.precision.describe_machine`).

    Returns:
        Every finished point (see :func:`finished_points`).
    """
    _start_point(curve, device)
    write_results(curve, out_dir, command, machine)
    for seed in curve.seeds:
        for images in curve.sizes:
            for arm in ARMS:
                point_dir = curve.point_dir(arm, images, seed)
                if (point_dir / POINT_JSON).is_file():
                    log.info("%s: finished, skipped", point_dir)
                    continue
                log.info("%s: %s, %d images, seed %d", point_dir, arm, images, seed)
                run_point(curve, arm, images, seed, device, note=command)
                write_results(curve, out_dir, command, machine)
    return finished_points(curve)


def summary_table(points: pd.DataFrame) -> pd.DataFrame:
    """Mean, spread and count of the test score per arm and number of images.

    Returns:
        Frame indexed by images with, per arm, ``<arm>`` (mean over seeds),
        ``<arm> sd`` (NaN for one seed) and ``<arm> seeds``; and ``gain`` (fine-tuned
        minus from scratch).
    """
    trained = points[points["arm"].isin(ARMS)]
    table = pd.DataFrame(index=pd.Index(sorted(trained["images"].unique()), name="images"))
    for arm in ARMS:
        scores = trained[trained["arm"] == arm].groupby("images")["test_map"]
        table[arm] = scores.mean()
        table[f"{arm} sd"] = scores.std()
        table[f"{arm} seeds"] = scores.size()
    table["gain"] = table[FINETUNED] - table[SCRATCH]
    return table


def _cell(mean: float, sd: float, seeds: float) -> str:
    if not np.isfinite(mean):
        return "not run yet"
    if seeds > 1:
        return f"{mean:.4f} ± {sd:.4f} ({int(seeds)} seeds)"
    return f"{mean:.4f}"


def leaderboard_markdown(curve: Curve, points: pd.DataFrame, command: str, machine: str) -> str:
    """The curve as Markdown: the summary per number of images, then every point."""
    settings = curve.settings(FINETUNED, curve.seeds[0])
    scratch = curve.settings(SCRATCH, curve.seeds[0]).train
    start = points.loc[points["arm"] == START, "test_map"]
    lines = [
        f"# Learning curve: {curve.name}",
        "",
        *([f"`{command}`", ""] if command else []),
        f"Test: mean AP on the {len(find_images(curve.test))} images of `{curve.test}` "
        "(held out: they never train or tune anything), by each point's bundle (its "
        "thresholds re-tuned on its own validation images, no test-time views). Each point "
        f"fine-tunes n images of `{curve.train}` (the first n of a seeded draw; 1 in "
        f"{settings.folds} held out to validate and tune on, every image in turn below "
        f"{settings.every_fold_below} images), {settings.train.get('epochs')} epoch(s) of "
        f"{settings.train.get('samples_per_epoch')} crops, the same for both arms: "
        f"fine-tuned from `{curve.start}` (lr {settings.train.get('lr')}), and from random "
        f"weights of the same architecture (lr {scratch.get('lr')}).",
        "",
    ]
    if machine:
        lines += [f"Minutes measured on {machine}.", ""]
    if len(curve.seeds) == 1:
        lines += ["One seed per point: the spread between seeds is not measured.", ""]
    if len(start):
        lines += [f"Start model without fine-tuning (n = 0): {start.iloc[0]:.4f}.", ""]
    table = summary_table(points)
    header = ["images", FINETUNED, SCRATCH, "fine-tuned - scratch"]
    lines += ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * 4) + " |"]
    for images in curve.sizes:
        row = table.loc[images] if images in table.index else None
        cells = [str(images)]
        for arm in ARMS:
            if row is None:
                cells.append("not run yet")
            else:
                cells.append(_cell(row[arm], row[f"{arm} sd"], row[f"{arm} seeds"]))
        gain = np.nan if row is None else row["gain"]
        cells.append(f"{gain:+.4f}" if np.isfinite(gain) else "")
        lines.append("| " + " | ".join(cells) + " |")
    trained = points[points["arm"].isin(ARMS)].sort_values(["images", "arm", "seed"])
    if len(trained):
        lines += [
            "",
            "Every point (validation scores on its own held-out training images; "
            "tuned = with the thresholds chosen on them):",
            "",
            "| arm | images | seed | train / val images | folds | val, start model | val | "
            "val, tuned | test | minutes |",
            "| " + " | ".join(["---"] * 10) + " |",
        ]
        for _, p in trained.iterrows():
            cells = [
                p["arm"],
                str(int(p["images"])),
                str(int(p["seed"])),
                f"{int(p['train_images'])} / {int(p['val_images'])}",
                str(int(p["folds"])),
                "" if pd.isna(p["start_val_map"]) else f"{p['start_val_map']:.4f}",
                f"{p['val_map']:.4f}",
                f"{p['val_map_tuned']:.4f}",
                f"{p['test_map']:.4f}",
                f"{p['minutes']:.1f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _short(folder: Path) -> str:
    """``monuseg/test`` for ``../shared/data/monuseg/test``."""
    return "/".join(folder.resolve().parts[-2:])


def plot_curve(curve: Curve, points: pd.DataFrame, path: Path) -> None:
    """Mean AP on the test images against the number of training images, one curve per arm."""
    figure = Figure(figsize=(6.5, 4.2), layout="tight")
    axis = figure.subplots()
    table = summary_table(points)
    for arm, colour in zip(ARMS, ("tab:blue", "tab:orange"), strict=True):
        each = points[points["arm"] == arm]
        axis.scatter(each["images"], each["test_map"], color=colour, alpha=0.35, s=14)
        means = table[arm].dropna() if arm in table else pd.Series(dtype=float)
        axis.plot(means.index, means.to_numpy(), "o-", color=colour, label=arm)
        for images, value in means.items():
            axis.annotate(
                f"{value:.3f}",
                (images, value),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=7,
                color=colour,
            )
    start = points.loc[points["arm"] == START, "test_map"]
    if len(start):
        axis.axhline(start.iloc[0], color="0.5", linestyle="--", label=f"{START} (n = 0)")
    axis.set_xscale("log")
    axis.set_xticks(list(curve.sizes), [str(n) for n in curve.sizes])
    axis.minorticks_off()
    axis.set_xlabel(f"training images ({_short(curve.train)})")
    axis.set_ylabel(f"mean AP, {_short(curve.test)} (held out)")
    top = np.nanmax(points["test_map"].to_numpy(dtype=float)) if len(points) else 1.0
    axis.set_ylim(0, min(1.0, 1.2 * top) if np.isfinite(top) and top > 0 else 1.0)
    seeds = "one seed" if len(curve.seeds) == 1 else f"{len(curve.seeds)} seeds"
    axis.set_title(f"{curve.name}: transfer vs random weights ({seeds})", fontsize=10, loc="left")
    axis.legend(fontsize=8, loc="lower right")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110)


def write_results(
    curve: Curve, out_dir: Path, command: str = "", machine: str = ""
) -> pd.DataFrame:
    """``<name>.csv``, ``<name>.md`` and ``<name>.png`` from every finished point.

    Returns:
        The finished points written (see :func:`finished_points`).
    """
    points = finished_points(curve)
    write_text(out_dir / f"{curve.name}.csv", points.to_csv(index=False, float_format="%.6g"))
    write_text(out_dir / f"{curve.name}.md", leaderboard_markdown(curve, points, command, machine))
    plot_curve(curve, points, out_dir / f"{curve.name}.png")
    return points
