"""Competition submissions: writing, validating, reading and scoring them.

A submission is a CSV with the header ``ImageId,EncodedPixels`` and one row per
nucleus, its mask run-length encoded (see :mod:`nucleiseg.competition.rle`). An image
without nuclei has a single row with empty EncodedPixels.

Row numbers in problems are 1-based CSV line numbers counting the header, so
the first data row is row 2; for a DataFrame they are the lines the frame would
have as a CSV.
"""

from __future__ import annotations

import csv
import io
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from nucleiseg.atomic import write_text
from nucleiseg.competition import metric, rle

COLUMNS = ("ImageId", "EncodedPixels")
_MAX_LISTED = 20
_IOU_HALF = int(np.argmin(np.abs(metric.THRESHOLDS - 0.5)))
# Per-image columns holding the precision tp / (tp + fp + fn) at each IoU threshold.
PRECISION_COLUMNS = tuple(f"precision@{t:.2f}" for t in metric.THRESHOLDS)


class Problem(NamedTuple):
    """One thing wrong with a submission.

    Attributes:
        image_id: The image concerned, or None for the file as a whole.
        row: 1-based CSV line number (the header is line 1), or None when the
            problem is about no single row (an image missing altogether).
        message: What is wrong.
    """

    image_id: str | None
    row: int | None
    message: str

    def __str__(self) -> str:
        where = " ".join(
            part
            for part in (self.image_id, None if self.row is None else f"row {self.row}")
            if part is not None
        )
        return f"{where}: {self.message}" if where else self.message


class SubmissionError(ValueError):
    """A submission with problems; they are in ``problems``."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        listed = "\n".join(f"  {problem}" for problem in self.problems[:_MAX_LISTED])
        more = len(self.problems) - _MAX_LISTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{len(self.problems)} problem(s) in the submission:\n{listed}{tail}")


class SubmissionScore(NamedTuple):
    """Score of a submission.

    Attributes:
        per_image: One row per image: image_id, score (mean precision over the
            IoU thresholds), n_true, n_pred, tp, fp, fn at IoU 0.5, the matched
            nuclei's area ratio (see :class:`nucleiseg.competition.metric.ImageScore`)
            and the precision at each threshold (``PRECISION_COLUMNS``).
        score: Mean of the per-image scores, the competition's number.
    """

    per_image: pd.DataFrame
    score: float


class _Row(NamedTuple):
    row: int
    image_id: str
    encoded: str


def write_submission(labels_by_image: Mapping[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Write label images as a submission CSV, atomically, after validating it.

    Rows are sorted by image id, so the file does not depend on the mapping's
    order; within an image, objects come in ascending label order.

    Args:
        labels_by_image: Image id -> label image (non-negative integers, 0 is
            background). An image without objects gets one row with empty
            EncodedPixels.
        path: Destination CSV; parent folders are created.

    Returns:
        The path written.

    Raises:
        SubmissionError: If the rows do not validate against the label images'
            own ids and shapes; nothing is written then.
        nucleiseg.atomic.WriteError: If the file cannot be written, naming it.
    """
    rows: list[_Row] = []
    for image_id in sorted(labels_by_image):
        encoded = [text for _, text in rle.encode_labels(labels_by_image[image_id])]
        rows.extend(_Row(len(rows) + 2, image_id, text) for text in encoded or [""])
    sizes = {image_id: np.shape(labels) for image_id, labels in labels_by_image.items()}
    problems, _ = _check(rows, sizes)
    if problems:
        raise SubmissionError(problems)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows((row.image_id, row.encoded) for row in rows)
    return write_text(path, text.getvalue())


def validate_submission(
    frame_or_path: pd.DataFrame | str | os.PathLike, sizes: Mapping[str, tuple[int, int]]
) -> list[Problem]:
    """Everything wrong with a submission, for a known set of images.

    Checks the header; that every image of ``sizes`` has rows and no other
    image does; that each EncodedPixels parses, with ascending, non-overlapping
    runs inside its image; that no row has an empty mask unless it is the only
    row of its image (an image without nuclei); and that no pixel is claimed
    by two masks of one image. Blank lines are ignored.

    Args:
        frame_or_path: The submission CSV, or a DataFrame of its rows (read
            with ``dtype=str, keep_default_na=False`` so empty cells are "").
        sizes: Image id -> (H, W) of every image the submission must cover.

    Returns:
        The problems in row order (then those about whole images); empty if
        the submission is valid.
    """
    return _validate(frame_or_path, sizes)[0]


def read_submission(
    path: str | os.PathLike, sizes: Mapping[str, tuple[int, int]]
) -> dict[str, np.ndarray]:
    """Label images of a valid submission.

    Args:
        path: The submission CSV.
        sizes: Image id -> (H, W) of every image the submission must cover.

    Returns:
        Image id -> int32 label image, in the order of ``sizes``; an image's
        objects are labelled 1, 2, ... in row order.

    Raises:
        SubmissionError: If the submission does not validate.
    """
    problems, labels_by_image = _validate(path, sizes)
    if problems:
        raise SubmissionError(problems)
    return labels_by_image


def score_submission(
    submission: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray]
) -> SubmissionScore:
    """Score predicted label images against the truth with the competition metric.

    Args:
        submission: Image id -> predicted label image.
        truth: Image id -> true label image; every image here is scored.

    Returns:
        Per-image results, in the order of ``truth``, and their mean.

    Raises:
        SubmissionError: If an image of the truth is missing from the
            submission, the submission has an image the truth does not, or
            the shapes of an image differ.
    """
    problems = []
    for image_id, true_labels in truth.items():
        if image_id not in submission:
            problems.append(Problem(image_id, None, "image missing from the submission"))
        elif np.shape(submission[image_id]) != np.shape(true_labels):
            shapes = f"{np.shape(submission[image_id])} != {np.shape(true_labels)}"
            problems.append(Problem(image_id, None, f"shape differs from the truth: {shapes}"))
    problems += [
        Problem(image_id, None, "unknown ImageId: not in the truth")
        for image_id in submission
        if image_id not in truth
    ]
    if problems:
        raise SubmissionError(problems)
    scores = [metric.average_precision(labels, submission[i]) for i, labels in truth.items()]
    per_image = pd.DataFrame(
        [
            {
                "image_id": image_id,
                "score": s.score,
                "n_true": s.n_true,
                "n_pred": s.n_pred,
                "tp": int(s.tp[_IOU_HALF]),
                "fp": int(s.fp[_IOU_HALF]),
                "fn": int(s.fn[_IOU_HALF]),
                "area_ratio": s.area_ratio,
                **dict(zip(PRECISION_COLUMNS, s.precision.tolist(), strict=True)),
            }
            for image_id, s in zip(truth, scores, strict=True)
        ],
        columns=[
            "image_id",
            *("score", "n_true", "n_pred", "tp", "fp", "fn", "area_ratio"),
            *PRECISION_COLUMNS,
        ],
    )
    return SubmissionScore(per_image, metric.mean_average_precision(scores))


def _validate(
    frame_or_path: pd.DataFrame | str | os.PathLike, sizes: Mapping[str, tuple[int, int]]
) -> tuple[list[Problem], dict[str, np.ndarray]]:
    """Problems of a submission in row order and the label images of its valid images."""
    rows, problems = _read_rows(frame_or_path)
    if rows is None:
        return problems, {}
    row_problems, labels_by_image = _check(rows, sizes)
    problems = sorted([*problems, *row_problems], key=lambda p: (p.row is None, p.row or 0))
    return problems, labels_by_image


def _read_rows(
    frame_or_path: pd.DataFrame | str | os.PathLike,
) -> tuple[list[_Row] | None, list[Problem]]:
    """Well-formed rows with their CSV line numbers, and the problems of the others.

    The rows are None when the file as a whole cannot be used (no such file,
    wrong header).
    """
    if isinstance(frame_or_path, pd.DataFrame):
        return _frame_rows(frame_or_path)
    # The csv module rather than pandas: pandas moves a row's surplus fields
    # into the index or drops them, and skips blank lines, losing line numbers.
    rows: list[_Row] = []
    problems: list[Problem] = []
    try:
        with open(frame_or_path, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            header = next(reader, None)
            if header != list(COLUMNS):
                return None, [_header_problem(header)]
            for record in reader:
                if not record:
                    continue
                if len(record) != len(COLUMNS):
                    image_id = record[0] if record[0] else None
                    message = f"expected 2 fields, got {len(record)}"
                    problems.append(Problem(image_id, reader.line_num, message))
                    continue
                rows.append(_Row(reader.line_num, *record))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        return None, [Problem(None, None, f"cannot read {frame_or_path}: {error}")]
    return rows, problems


def _frame_rows(frame: pd.DataFrame) -> tuple[list[_Row] | None, list[Problem]]:
    if list(frame.columns) != list(COLUMNS):
        return None, [_header_problem([str(c) for c in frame.columns])]
    rows: list[_Row] = []
    problems: list[Problem] = []
    for row, (image_id, encoded) in enumerate(frame.itertuples(index=False), start=2):
        if isinstance(image_id, str) and isinstance(encoded, str):
            rows.append(_Row(row, image_id, encoded))
        else:
            types = f"{type(image_id).__name__}, {type(encoded).__name__}"
            problems.append(Problem(str(image_id), row, f"cells must be strings, got {types}"))
    return rows, problems


def _header_problem(header: list[str] | None) -> Problem:
    if header is None:
        found = "an empty file"
    elif not header:
        found = "an empty line"
    else:
        found = ",".join(header)
    return Problem(None, 1, f"header must be {','.join(COLUMNS)}, got {found}")


def _check(
    rows: list[_Row], sizes: Mapping[str, tuple[int, int]]
) -> tuple[list[Problem], dict[str, np.ndarray]]:
    """Problems of the rows and, for images without any, their label images."""
    problems: list[Problem] = []
    rows_of: dict[str, list[_Row]] = defaultdict(list)
    for row in rows:
        if row.image_id in sizes:
            rows_of[row.image_id].append(row)
        else:
            problems.append(Problem(row.image_id, row.row, "unknown ImageId"))
    labels_by_image: dict[str, np.ndarray] = {}
    for image_id, shape in sizes.items():
        if not rows_of[image_id]:
            problems.append(Problem(image_id, None, "image missing from the submission"))
            continue
        image_problems, masks = _check_image(rows_of[image_id], tuple(shape))
        if image_problems:
            problems += image_problems
            continue
        decoded = rle.decode_labels([row.encoded for row in masks], shape)
        if decoded.overlap_pixels:
            problems += _overlap_problems(masks, decoded.labels)
            continue
        labels_by_image[image_id] = decoded.labels
    return problems, labels_by_image


def _check_image(rows: list[_Row], shape: tuple[int, int]) -> tuple[list[Problem], list[_Row]]:
    """Problems of one image's rows taken one by one, and its rows with a mask."""
    problems: list[Problem] = []
    masks: list[_Row] = []
    for row in rows:
        try:
            starts, _ = rle.parse(row.encoded, shape)
        except rle.RLEError as error:
            problems.append(Problem(row.image_id, row.row, str(error)))
            continue
        if starts.size:
            masks.append(row)
        elif len(rows) > 1:
            message = "empty mask; only an image's single row may be empty (no nuclei)"
            problems.append(Problem(row.image_id, row.row, message))
    return problems, masks


def _overlap_problems(masks: list[_Row], labels: np.ndarray) -> list[Problem]:
    """Name the rows behind overlapping masks, given the first-claim-wins label image."""
    # Only reached for a bad image, so decoding each mask again costs nothing
    # on the common path.
    problems = []
    for label, row in enumerate(masks, start=1):
        owners = labels[rle.decode(row.encoded, labels.shape)]
        taken = owners[owners != label]
        if taken.size:
            others = ", ".join(str(masks[o - 1].row) for o in np.unique(taken))
            message = f"{taken.size} pixel(s) already claimed by the mask in row(s) {others}"
            problems.append(Problem(row.image_id, row.row, message))
    return problems
