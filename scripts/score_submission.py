"""Score a submission CSV against ground truth with the competition metric.

Run from the repository root::

    .venv/bin/python scripts/score_submission.py submission.csv --truth path/to/stage1_train
    .venv/bin/python scripts/score_submission.py submission.csv \
        --truth stage1_train_labels.csv --images path/to/stage1_train --per-image scores.csv

The truth is a labelled folder (the competition layout with masks, or
``images/`` + ``labels/`` label images), a solution CSV with Height/Width, or
a train-labels CSV plus ``--images`` for the sizes. The submission is
validated against the truth's images first. The last line printed is
``score: <value>``. An invalid submission (one ``error:`` line per problem),
an unusable truth, image folder or ``--per-image`` path stops the command
with exit status 2 before anything is scored.
"""

import argparse
import logging
import sys
from pathlib import Path

from nucleiseg import cli
from nucleiseg.atomic import output_problem, write_text
from nucleiseg.competition import submission
from nucleiseg.competition.truth import load_truth
from nucleiseg.data import reading

log = logging.getLogger("score_submission")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("submission", type=Path, help="submission CSV (ImageId,EncodedPixels)")
    parser.add_argument(
        "--truth", type=Path, required=True, help="labelled folder or competition CSV"
    )
    parser.add_argument(
        "--images", type=Path, default=None, help="images giving the sizes for a train-labels CSV"
    )
    parser.add_argument(
        "--per-image", type=Path, default=None, help="write per-image scores to this CSV"
    )
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.per_image is not None:
        cli.refuse_if([output_problem(args.per_image)])
    with cli.refusing(reading.DataError):
        truth = load_truth(args.truth, args.images)
    log.info("truth: %d images from %s", len(truth), args.truth)
    sizes = {image_id: labels.shape for image_id, labels in truth.items()}
    try:
        predicted = submission.read_submission(args.submission, sizes)
    except submission.SubmissionError as error:
        cli.refuse(error.problems)
    result = submission.score_submission(predicted, truth)
    if args.per_image is not None:
        with cli.refusing(OSError, status=cli.FAILURE_STATUS):
            write_text(args.per_image, result.per_image.to_csv(index=False))
        log.info("per-image scores written to %s", args.per_image)
    print(f"score: {result.score:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
