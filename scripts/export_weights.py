"""Bundle the fold models of finished runs as the reference ensemble under weights/.

    python scripts/export_weights.py --runs runs/unetpp_effb0 --data-dir ../shared/data/dsb2018
    python scripts/export_weights.py --runs runs/unetpp_effb0 runs/maskrcnn_r18 \
        --folds 0,1,2,3 --precision int8 --max-megabytes 100

Copies each chosen fold's config.yaml, run.yaml and weights (float16 as
trained, or int8 with ``--precision int8``) and the run's tuned
postprocess.yaml into ``--out`` in the run layout, scores each fold's
out-of-fold labels, and writes ``manifest.yaml`` with every file's size and
sha256 and every member's CV, training time, data and seed. Refuses a bundle
larger than ``--max-megabytes``. The old bundle stays in place until the new
one is complete.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import pandas as pd

from nucleiseg.compact import PRECISIONS
from nucleiseg.folds import DEFAULT_FOLDS_PATH, parse_fold_list, read_folds
from nucleiseg.reference import WEIGHTS_DIR, export


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders")
    parser.add_argument("--folds", help="folds to keep, e.g. 0,1,2 (default: all finished)")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="bundle folder")
    parser.add_argument("--data-dir", type=Path, help="dataset (default: the runs')")
    parser.add_argument("--folds-csv", type=Path, default=DEFAULT_FOLDS_PATH)
    parser.add_argument("--precision", default="float16", choices=PRECISIONS)
    parser.add_argument("--max-megabytes", type=float, default=100.0)
    return parser


def main(args: argparse.Namespace) -> dict:
    command = "python scripts/export_weights.py " + shlex.join(sys.argv[1:])
    try:
        folds = None
        if args.folds:
            folds = parse_fold_list(args.folds, read_folds(args.folds_csv)["fold"])
        manifest = export(
            args.runs,
            folds,
            args.out,
            args.data_dir,
            args.folds_csv,
            args.precision,
            args.max_megabytes,
            note=command,
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    members = pd.DataFrame(manifest["members"])
    columns = ["run", "fold", "precision", "oof_cv", "oof_images", "train_minutes", "epochs"]
    print(members[columns].to_string(index=False))
    print(f"{len(manifest['files'])} files, {manifest['total_megabytes']} MB -> {args.out}")
    return manifest


if __name__ == "__main__":
    main(get_args_parser().parse_args())
