"""Summaries of per-image scores: overall and per imaging modality."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from nucleiseg.competition.folds import DEFAULT_FOLDS_PATH, fold_assignment, read_folds
from nucleiseg.competition.submission import PRECISION_COLUMNS, score_submission
from nucleiseg.data import reading
from nucleiseg.data.modality import MODALITIES
from nucleiseg.inference import oof
from nucleiseg.inference.family import for_modality, get_family, read_params
from nucleiseg.models.config import load_config
from nucleiseg.models.runs import CONFIG, read_run_info, split_problem

OVERALL = "all"


def modality_table(per_image: pd.DataFrame) -> pd.DataFrame:
    """Mean AP and image count per modality, plus an overall row.

    Args:
        per_image: One row per image with at least the columns ``modality``
            and ``score``.

    Returns:
        Frame indexed by modality (then ``all``) with columns ``images`` and
        ``mean_ap``.
    """
    missing = {"modality", "score"} - set(per_image.columns)
    if missing:
        raise ValueError(f"per-image scores lack column(s) {', '.join(sorted(missing))}")
    if per_image.empty:
        raise ValueError("no per-image scores to summarize")
    grouped = per_image.groupby("modality")["score"].agg(images="size", mean_ap="mean")
    overall = pd.DataFrame(
        {"images": [len(per_image)], "mean_ap": [per_image["score"].mean()]}, index=[OVERALL]
    )
    return pd.concat([grouped, overall]).rename_axis("modality")


def fold_table(per_image: pd.DataFrame) -> pd.DataFrame:
    """Mean AP and image count per fold, plus an overall row (the CV score).

    Args:
        per_image: One row per image with at least the columns ``fold`` and ``score``.

    Returns:
        Frame indexed by fold (then ``all``) with columns ``images`` and ``mean_ap``.
    """
    grouped = per_image.groupby("fold")["score"].agg(images="size", mean_ap="mean")
    grouped.index = grouped.index.astype(str)
    overall = pd.DataFrame(
        {"images": [len(per_image)], "mean_ap": [per_image["score"].mean()]}, index=[OVERALL]
    )
    return pd.concat([grouped, overall]).rename_axis("fold")


def score_oof(
    predictions: Mapping[str, tuple[int, np.ndarray]],
    truth: Mapping[str, np.ndarray],
    modalities: Mapping[str, str],
) -> pd.DataFrame:
    """Score out-of-fold label images against the truth.

    Args:
        predictions: Image id -> (fold, predicted label image).
        truth: Image id -> true label image, for every predicted image.
        modalities: Image id -> modality, for every predicted image.

    Returns:
        One row per image: image_id, fold, modality, then the columns of
        :func:`nucleiseg.competition.submission.score_submission` (score, n_true, n_pred,
        tp/fp/fn at IoU 0.5).
    """
    missing = sorted(set(predictions) - set(truth))
    if missing:
        raise KeyError(f"no truth for {len(missing)} predicted image(s), e.g. {missing[0]}")
    labels = {image_id: predicted for image_id, (_, predicted) in predictions.items()}
    per_image = score_submission(
        labels, {image_id: truth[image_id] for image_id in labels}
    ).per_image
    per_image.insert(1, "fold", [predictions[i][0] for i in per_image["image_id"]])
    per_image.insert(2, "modality", [modalities[i] for i in per_image["image_id"]])
    return per_image


def evaluate_run(
    run_dir: Path,
    data_dir: Path | None = None,
    folds_csv: Path = DEFAULT_FOLDS_PATH,
    params_file: Path | None = None,
) -> pd.DataFrame:
    """Per-image scores of a run's saved out-of-fold label images: no model needed.

    Args:
        run_dir: Run folder holding ``fold<K>/oof/labels/``, or one fold folder.
        data_dir: Dataset root with the true masks (default: the one the run
            was trained on, from its ``run.yaml``).
        folds_csv: Folds file giving each image's modality.
        params_file: Thresholds YAML (e.g. a run's ``postprocess.yaml``): the
            label images are made again from the saved raw outputs
            (``oof/probabilities`` or ``oof/instances``) with these thresholds
            instead of being read.

    Returns:
        One row per image: image_id, fold, modality, score, n_true, n_pred,
        tp, fp, fn at IoU 0.5 and the precision at each IoU threshold.

    Raises:
        DataError: If ``folds_csv`` disagrees with the images a fold recorded
            it trained on (see :func:`nucleiseg.models.runs.split_problem`), or
            ``params_file`` is given and a fold has no raw outputs.
    """
    folds = read_folds(folds_csv)
    fold_of = dict(zip(folds["image_id"], folds["fold"], strict=True))
    problem = split_problem(run_dir, fold_of, folds_csv)
    if problem is not None:
        raise reading.DataError(problem)
    if params_file is None:
        predictions = oof.load_oof_labels(run_dir)
    else:
        modality_of = dict(zip(folds["image_id"], folds["modality"], strict=True))
        predictions = _relabel(run_dir, params_file, modality_of)
    if data_dir is None:
        data_dir = Path(read_run_info(next(iter(oof.oof_fold_dirs(run_dir).values())))["data_dir"])
    images = reading.find_images(reading.labelled_root(data_dir))
    missing = sorted(set(predictions) - set(images))
    if missing:
        raise reading.DataError(
            f"{data_dir}: no truth for {len(missing)} images, e.g. {missing[0]}"
        )
    truth = {image_id: reading.labels_of(images[image_id]) for image_id in predictions}
    modalities = fold_assignment(folds_csv, predictions).set_index("image_id")["modality"]
    return score_oof(predictions, truth, modalities.to_dict())


def score_labelled(
    predictions: Mapping[str, np.ndarray], folder: str | Path, modalities: Mapping[str, str]
) -> pd.DataFrame:
    """Score label images against a labelled folder (external data: no folds).

    Args:
        predictions: Image id -> predicted label image; every image of
            ``folder`` must be there.
        folder: Labelled folder (``images/`` + ``labels/``, or the competition
            layout with masks).
        modalities: Image id -> modality (e.g. from
            :func:`nucleiseg.data.modality.classify_modality`).

    Returns:
        One row per image: image_id, modality, score, n_true, n_pred, tp, fp,
        fn at IoU 0.5 and the precision at each IoU threshold.

    Raises:
        DataError: If an image of the folder has no prediction, or the other way round.
    """
    images = reading.find_images(folder)
    unpredicted = sorted(set(images) - set(predictions))
    unknown = sorted(set(predictions) - set(images))
    if unpredicted or unknown:
        raise reading.DataError(
            f"{folder}: {len(unpredicted)} images without prediction "
            f"(e.g. {unpredicted[:1]}), {len(unknown)} predictions of unknown images "
            f"(e.g. {unknown[:1]})"
        )
    truth = {image_id: reading.labels_of(path) for image_id, path in images.items()}
    per_image = score_submission(dict(predictions), truth).per_image
    per_image.insert(1, "modality", [modalities[i] for i in per_image["image_id"]])
    return per_image


def print_external_report(per_image: pd.DataFrame, name: str) -> float:
    """Print per-image, per-modality and per-threshold tables (with the matched nuclei's
    area ratio), then ``<name> mean AP: <value>``; return it."""
    columns = ["image_id", "modality", "n_true", "n_pred", "tp", "fp", "fn", "area_ratio", "score"]
    print(per_image[columns].to_string(index=False, float_format="%.4f"))
    print()
    print(modality_table(per_image).to_string(float_format="%.4f"))
    print()
    print(threshold_table(per_image).to_string(float_format="%.4f"))
    score = float(per_image["score"].mean())
    print(f"{name} mean AP: {score:.4f}")
    return score


def threshold_table(per_image: pd.DataFrame) -> pd.DataFrame:
    """Where the score is lost: mean precision at each IoU threshold, per modality and overall.

    Detection errors (missed or spurious nuclei) lower every threshold alike;
    imprecise outlines lower mostly the high ones.

    Args:
        per_image: One row per image with the columns ``modality``, ``tp``,
            ``fp``, ``fn`` (at IoU 0.5) and ``PRECISION_COLUMNS``.

    Returns:
        Frame indexed by modality (then ``all``): images, the summed tp, fp
        and fn at IoU 0.5, the matched nuclei's area ratio (:func:`pooled_area_ratio`,
        where ``per_image`` has ``area_ratio``), and one column per threshold
        (``0.50`` ... ``0.95``) with the mean over images of tp / (tp + fp + fn).
    """
    missing = {"modality", "tp", "fp", "fn", *PRECISION_COLUMNS} - set(per_image.columns)
    if missing:
        raise ValueError(f"per-image scores lack column(s) {', '.join(sorted(missing))}")
    if per_image.empty:
        raise ValueError("no per-image scores to summarize")
    groups = [*per_image.groupby("modality"), (OVERALL, per_image)]
    rows = {
        name: {
            "images": len(rows),
            **rows[["tp", "fp", "fn"]].sum().to_dict(),
            **({"area_ratio": pooled_area_ratio(rows)} if "area_ratio" in rows else {}),
            **{column.split("@")[1]: rows[column].mean() for column in PRECISION_COLUMNS},
        }
        for name, rows in groups
    }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("modality")


def pooled_area_ratio(per_image: pd.DataFrame) -> float:
    """The predicted / true area of the nuclei matched at IoU 0.5, over all these images:
    the geometric mean of every matched pair, from each image's own geometric mean
    (``area_ratio``) weighted by its matches (``tp``); NaN if nothing matched."""
    matched = per_image[(per_image["tp"] > 0) & per_image["area_ratio"].notna()]
    if matched.empty:
        return float("nan")
    weights = matched["tp"].to_numpy(float)
    return float(np.exp(np.average(np.log(matched["area_ratio"].to_numpy(float)), weights=weights)))


def _relabel(
    run_dir: Path, params_file: Path, modality_of: Mapping[str, str]
) -> dict[str, tuple[int, np.ndarray]]:
    predictions = {}
    for fold, fold_dir in oof.oof_fold_dirs(run_dir).items():
        family = get_family(load_config(fold_dir / CONFIG).model)
        params = read_params(params_file, family)
        for image_id, raw in family.load_oof(fold_dir).items():
            own = for_modality(params, modality_of[image_id])
            predictions[image_id] = (fold, family.to_labels(raw, own))
    return predictions


def cv_summary(per_image: pd.DataFrame) -> dict[str, float]:
    """One leaderboard row's numbers: images, CV and mean AP of each modality (NaN if absent).

    Args:
        per_image: One row per image with the columns ``modality`` and ``score``.
    """
    row = {"images": len(per_image), "cv": float(per_image["score"].mean())}
    for name in MODALITIES:
        row[name] = float(per_image.loc[per_image["modality"] == name, "score"].mean())
    return row


def markdown_table(per_image: pd.DataFrame) -> str:
    """Per-fold and overall mean AP with each modality's mean and image count, as Markdown.

    Args:
        per_image: One row per image with the columns ``fold``, ``modality`` and ``score``.
    """
    lines = [
        "| folds | images | mean AP | " + " | ".join(MODALITIES) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in MODALITIES) + " |",
    ]
    groups = [(f"fold {k}", rows) for k, rows in per_image.groupby("fold")]
    for name, rows in [*groups, ("all (CV)", per_image)]:
        cells = [name, str(len(rows)), f"{rows['score'].mean():.4f}"]
        for modality in MODALITIES:
            scores = rows.loc[rows["modality"] == modality, "score"]
            cells.append(f"{scores.mean():.4f} ({len(scores)})" if len(scores) else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_cv_report(per_image: pd.DataFrame) -> float:
    """Print the per-fold and per-modality tables, then ``cv: <value>``; return the CV."""
    print(fold_table(per_image).to_string(float_format="%.4f"))
    print()
    print(modality_table(per_image).to_string(float_format="%.4f"))
    cv = float(per_image["score"].mean())
    print(f"cv: {cv:.4f}")
    return cv
