"""Checks of a command's inputs and outputs before any model loads, every problem at once.

Each function returns one line per problem, naming the file or folder at
fault (empty when all is well), so that a script can print them all and stop
before a second is spent on models: a typo in a path, an unreadable image,
altered weights or a full disk cost a second, not a run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from nucleiseg.atomic import output_problem
from nucleiseg.competition.folds import fold_assignment, parse_fold_list
from nucleiseg.data.reading import (
    DataError,
    check_image_files,
    check_labelled,
    find_images,
    labelled_root,
)
from nucleiseg.data.sources import parse_sources
from nucleiseg.inference.family import get_family, read_params
from nucleiseg.models.config import FOLD_FIELD, TrainConfig, config_changes, load_config
from nucleiseg.models.runs import (
    CONFIG,
    LAST,
    WEIGHTS,
    WEIGHTS_INT8,
    fold_dirs,
    postprocess_path,
    read_yaml,
    split_problem,
    weights_path,
    weights_problem,
)
from nucleiseg.training.distributed import batch_problem, launched_processes
from nucleiseg.training.reference import MANIFEST, ReferenceWeightsError, verify

# Settings a fold resumed from its checkpoint may change: how long it trains, how it loads.
RESUMABLE = ("epochs", "num_workers")


def output_problems(
    files: Iterable[Path | None] = (), folders: Iterable[Path | None] = ()
) -> list[str]:
    """Problems with the files and folders a command will write (None entries are skipped).

    See :func:`nucleiseg.atomic.output_problem`.
    """
    problems = [output_problem(path) for path in files if path is not None]
    problems += [output_problem(path, folder=True) for path in folders if path is not None]
    return [problem for problem in problems if problem is not None]


def image_problems(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """The images of a folder, and the problems of the folder and of every image file.

    Images are checked from their headers (see
    :func:`nucleiseg.data.reading.image_file_problem`), not decoded.

    Returns:
        Image id -> file (empty if the folder has none), and the problems.
    """
    try:
        images = find_images(folder)
    except DataError as error:
        return {}, [str(error)]
    return images, check_image_files(images.values())


def labelled_problems(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """:func:`image_problems`, plus every image without labels (a label image or masks folder)."""
    images, problems = image_problems(folder)
    try:
        check_labelled(images)
    except DataError as error:
        problems.append(str(error))
    return images, problems


def model_problems(
    run_dirs: Sequence[Path] | None, weights_dir: Path
) -> tuple[list[Path], list[str]]:
    """The run folders a command predicts with, and their problems.

    Args:
        run_dirs: Runs given with ``--runs`` (checked by :func:`run_problems`);
            None or empty uses the bundle (checked by :func:`bundle_problems`).
        weights_dir: The bundle used without runs.

    Returns:
        The run folders (empty if the bundle fails), and the problems.
    """
    if run_dirs:
        return list(run_dirs), run_problems(run_dirs)
    return bundle_problems(weights_dir)


def bundle_problems(weights_dir: Path) -> tuple[list[Path], list[str]]:
    """The run folders of a reference bundle, and what is wrong with it.

    Returns:
        The bundle's run folders (see :func:`nucleiseg.training.reference.verify`;
        empty if it fails), and the problems: an unreadable manifest, or every
        missing or altered file.
    """
    manifest = Path(weights_dir) / MANIFEST
    try:
        if manifest.is_file():
            read_yaml(manifest)
        return verify(weights_dir), []
    except (DataError, ReferenceWeightsError) as error:
        return [], [str(error)]


def run_problems(run_dirs: Sequence[Path]) -> list[str]:
    """Problems with run folders given for inference, found without building a model.

    For each run (or single fold folder): that it has a finished fold; for each
    finished fold, that its ``config.yaml`` reads and its weights are intact
    (see :func:`nucleiseg.models.runs.weights_problem`); that the run's
    ``postprocess.yaml``, if any, holds thresholds of its family. A run inside
    a reference bundle is also checked against the bundle's manifest.
    """
    problems: list[str] = []
    bundles = dict.fromkeys(
        folder
        for run_dir in map(Path, run_dirs)
        for folder in (run_dir.parent, run_dir.parent.parent)
        if (folder / MANIFEST).is_file()
    )
    for bundle in bundles:
        problems += bundle_problems(bundle)[1]
    for run_dir in map(Path, run_dirs):
        problems += _run_problems(run_dir)
    return problems


def _run_problems(run_dir: Path) -> list[str]:
    if not run_dir.is_dir():
        return [f"{run_dir}: no such run folder"]
    finished = {k: d for k, d in fold_dirs(run_dir).items() if weights_path(d) is not None}
    if not finished:
        return [
            f"{run_dir}: no fold<K> folder with {WEIGHTS} or {WEIGHTS_INT8}; "
            "pass a run folder or one of its fold folders, with a finished fold"
        ]
    problems, family = [], None
    for fold_dir in finished.values():
        config = fold_dir / CONFIG
        try:
            read_yaml(config)
            family = get_family(load_config(config).model)
        except (DataError, ValueError, TypeError) as error:
            message = str(error)
            problems.append(message if message.startswith(str(config)) else f"{config}: {message}")
        problem = weights_problem(weights_path(fold_dir))
        if problem is not None:
            problems.append(problem)
    tuned = postprocess_path(run_dir)
    if family is not None and tuned.is_file():
        try:
            read_params(tuned, family)
        except (DataError, ValueError, TypeError) as error:
            problems.append(str(error))
    return problems


def split_problems(
    run_dirs: Sequence[Path], fold_of: Mapping[str, int], folds_csv: Path
) -> list[str]:
    """Runs whose folds recorded other splits than a folds file gives, one line each.

    See :func:`nucleiseg.models.runs.split_problem`; runs that keep no record
    are taken on trust, with an INFO line.

    Args:
        run_dirs: Run folders (or fold folders).
        fold_of: Image id -> fold, from ``folds_csv``.
        folds_csv: The folds file, for the messages.
    """
    problems = [split_problem(run_dir, fold_of, folds_csv) for run_dir in run_dirs]
    return [problem for problem in problems if problem is not None]


def resume_problems(
    config: TrainConfig,
    run_dir: Path,
    folds: Sequence[int],
    fold_of: Mapping[str, int],
    folds_csv: Path,
) -> list[str]:
    """Why folds cannot be resumed with these settings and this folds file, one line each.

    A fold goes on from its checkpoint only with the settings it was started
    with (its ``config.yaml``), save those in :data:`RESUMABLE`, and with the
    folds it was started with (its ``split.csv``).

    Args:
        config: The resolved configuration to go on with.
        run_dir: The run folder.
        folds: The folds to resume (those with a checkpoint).
        fold_of: Image id -> fold, from ``folds_csv``.
        folds_csv: The folds file, for the messages.
    """
    problems = []
    for fold in folds:
        saved = Path(run_dir) / f"fold{fold}" / CONFIG
        try:
            changes = config_changes(load_config(saved), config.for_fold(fold), RESUMABLE)
        except (DataError, ValueError, TypeError) as error:
            message = str(error)
            problems.append(message if message.startswith(str(saved)) else f"{saved}: {message}")
            continue
        if changes:
            problems.append(
                f"--resume: fold {fold} was started with other settings ({saved}): "
                + ", ".join(changes)
            )
    if folds and (problem := split_problem(run_dir, fold_of, folds_csv, folds)) is not None:
        problems.append(problem)
    return problems


def training_problems(
    config: TrainConfig,
    data_dir: Path,
    folds_csv: Path,
    fold_spec: str,
    run_dir: Path,
    resume: bool,
) -> list[str]:
    """Problems with a training command's inputs and outputs, found before any image is read.

    Checks the run folder can be written and, without ``resume``, holds no
    checkpoint of a fold to train; that the dataset's images and those of every
    external source (``extra_data``) read (headers) and have labels; that the
    folds file covers them and names the folds asked for; with ``resume``,
    that every fold to resume goes on with its settings and folds (see
    :func:`resume_problems`); that the local weights to start from are
    intact; and, started by torchrun, that its processes can share every
    batch equally.
    """
    problems = output_problems(folders=[run_dir])
    if batch := batch_problem(config.batch_size, launched_processes()):
        problems.append(f"{batch} (torchrun --nproc-per-node)")
    for source in parse_sources(config.extra_data):
        problems += labelled_problems(Path(source.path))[1]
    images, found = labelled_problems(labelled_root(data_dir))
    problems += found
    folds: list[int] = []
    if images:
        try:
            assignment = fold_assignment(folds_csv, images)
            folds = parse_fold_list(fold_spec, sorted(assignment["fold"].unique()))
        except (DataError, ValueError) as error:
            problems.append(str(error))
        else:
            started = [fold for fold in folds if (Path(run_dir) / f"fold{fold}" / LAST).exists()]
            if resume:
                fold_of = dict(zip(assignment["image_id"], assignment["fold"], strict=True))
                problems += resume_problems(config, run_dir, started, fold_of, folds_csv)
            else:
                problems += [
                    f"{Path(run_dir) / f'fold{fold}' / LAST}: exists; pass --resume to continue "
                    "it, or choose another --out-dir"
                    for fold in started
                ]
    # Each fold's own start (``{fold}`` filled in); the plain path when the folds are unknown.
    starts = {config.for_fold(fold).init_from for fold in folds} or {config.init_from}
    for start in sorted(path for path in starts if path and FOLD_FIELD not in path):
        if problem := weights_problem(Path(start)):
            problems.append(problem)
    encoder = config.encoder_weights
    if encoder is not None and Path(encoder).suffix and not Path(encoder).is_file():
        problems.append(f"{encoder}: no such encoder weights file")
    return problems
