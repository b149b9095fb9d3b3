"""Bundle the fold models of finished runs as the reference ensemble under weights/.

    python scripts/export_weights.py --runs runs/unetpp_effb0_generalized \
        --data-dir ../shared/data/dsb2018
    python scripts/export_weights.py \
        --runs runs/unetpp_effb0_generalized runs/maskrcnn_r18_generalized \
        --folds all 0,1 --precision int8 --tta flip --merge maps --max-megabytes 100

``--folds`` and ``--precision`` take one value for every run or one per run,
in the order of ``--runs``. Copies each chosen fold's config.yaml, run.yaml and
weights (float16 as trained, or int8 per output channel) and the run's tuned
postprocess.yaml into ``--out`` in the run layout, keeps the inference
options given (``--tta``, ``--merge``, ...) as the bundle's own, scores each fold's
out-of-fold labels, and writes ``manifest.yaml`` with every file's size and
sha256 and every member's CV, training time, data and seed. Refuses a bundle
larger than ``--max-megabytes``. The old bundle stays in place until the new
one is complete.

``--out`` is replaced whole, so it must be new, empty or a bundle, and neither
a run given nor inside one of its fold folders; every weights file must match
the checksum recorded when it was written; and a second export into the same
``--out`` while one runs is refused at once (see ``nucleiseg.locks``). Each
problem is printed on its own ``error:`` line before any work.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import pandas as pd

from nucleiseg import cli
from nucleiseg.atomic import WriteError
from nucleiseg.competition.folds import DEFAULT_FOLDS_PATH, parse_fold_list, read_folds
from nucleiseg.inference.options import add_option_arguments, given_options
from nucleiseg.models.compact import PRECISIONS
from nucleiseg.training.reference import WEIGHTS_DIR, BundlePart, export


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders")
    parser.add_argument(
        "--folds", nargs="+", help="folds to keep, e.g. 0,1,2 or all (default: all finished)"
    )
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="bundle folder")
    parser.add_argument("--data-dir", type=Path, help="dataset (default: the runs')")
    parser.add_argument("--folds-csv", type=Path, default=DEFAULT_FOLDS_PATH)
    parser.add_argument("--precision", nargs="+", default=["float16"], choices=PRECISIONS)
    parser.add_argument("--max-megabytes", type=float, default=100.0)
    add_option_arguments(parser)
    return parser


def _per_run(values: list, runs: list[Path], flag: str) -> list:
    """One value for every run, or one per run."""
    if len(values) == 1:
        return values * len(runs)
    if len(values) != len(runs):
        raise ValueError(f"{flag} takes one value or one per run ({len(runs)}), not {len(values)}")
    return values


def main(args: argparse.Namespace) -> dict:
    command = "python scripts/export_weights.py " + shlex.join(sys.argv[1:])
    cli.refuse_if(f"--runs: {run} is not a folder" for run in args.runs if not run.is_dir())
    with cli.refusing(ValueError):
        folds = [None]
        if args.folds:
            available = read_folds(args.folds_csv)["fold"]
            folds = [tuple(parse_fold_list(spec, available)) for spec in args.folds]
        parts = [
            BundlePart(run, run_folds, precision)
            for run, run_folds, precision in zip(
                args.runs,
                _per_run(folds, args.runs, "--folds"),
                _per_run(args.precision, args.runs, "--precision"),
                strict=True,
            )
        ]
    with (
        cli.refusing(ValueError, FileNotFoundError),
        cli.refusing(WriteError, status=cli.FAILURE_STATUS),
    ):
        manifest = export(
            parts,
            args.out,
            args.data_dir,
            args.folds_csv,
            args.max_megabytes,
            note=command,
            inference=given_options(args),
        )
    members = pd.DataFrame(manifest["members"])
    columns = ["run", "fold", "precision", "oof_cv", "oof_images", "train_minutes", "epochs"]
    print(members[columns].to_string(index=False))
    print(f"{len(manifest['files'])} files, {manifest['total_megabytes']} MB -> {args.out}")
    return manifest


if __name__ == "__main__":
    main(get_args_parser().parse_args())
