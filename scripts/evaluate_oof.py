"""Recompute the cross-validation score of a run from its saved out-of-fold predictions.

    python scripts/evaluate_oof.py runs/unetpp_effb0
    python scripts/evaluate_oof.py runs/unetpp_effb0 --per-image oof.csv --markdown
    python scripts/evaluate_oof.py runs/maskrcnn_r18 --per-threshold
    python scripts/evaluate_oof.py runs/maskrcnn_r18/fold3 --params thresholds.yaml

No model and no GPU: it reads ``fold<K>/oof/labels/*.png`` and the true masks,
prints the score per fold and per modality (with ``--markdown`` also as the
README's table; with ``--per-threshold`` the precision at each IoU threshold
and the tp/fp/fn counts at 0.5, per modality), and ends with ``cv: <value>``.
With ``--params`` the label images are made again from the saved raw outputs
(probability maps or soft instances, not committed) with other thresholds.

A folds file that disagrees with the images a fold recorded it trained on
and held out (its ``split.csv``) is refused with one ``error:`` line, exit
status 2: its scores would count images the models trained on. Runs trained
before the record was kept are scored as they are, with one INFO line.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from nucleiseg import cli
from nucleiseg.atomic import output_problem, write_text

log = logging.getLogger("evaluate_oof")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="run folder holding fold<K>/oof/, or one fold")
    parser.add_argument(
        "--data-dir", type=Path, help="dataset root with the truth (default: the run's own)"
    )
    parser.add_argument("--folds-csv", type=Path, default=Path("folds/folds.csv"))
    parser.add_argument(
        "--params",
        type=Path,
        help="thresholds YAML: relabel the saved raw outputs with these instead",
    )
    parser.add_argument("--per-image", type=Path, help="write per-image scores to this CSV")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    parser.add_argument(
        "--per-threshold",
        action="store_true",
        help="also print the precision at each IoU threshold, per modality",
    )
    return parser


def main(args: argparse.Namespace) -> float:
    from nucleiseg.data.reading import DataError
    from nucleiseg.evaluation.summary import (
        evaluate_run,
        markdown_table,
        print_cv_report,
        threshold_table,
    )

    if args.per_image is not None:
        cli.refuse_if([output_problem(args.per_image)])
    with cli.refusing(DataError, FileNotFoundError):
        per_image = evaluate_run(args.run_dir, args.data_dir, args.folds_csv, args.params)
    if args.per_image:
        with cli.refusing(OSError, status=cli.FAILURE_STATUS):
            write_text(args.per_image, per_image.to_csv(index=False))
    if args.markdown:
        print(markdown_table(per_image), end="\n\n")
    if args.per_threshold:
        print(threshold_table(per_image).to_string(float_format="%.4f"), end="\n\n")
    return print_cv_report(per_image)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
