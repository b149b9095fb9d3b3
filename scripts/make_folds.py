"""Write cross-validation folds for the training images, keeping each scene in one fold.

Images showing the same scene (adjacent tiles of one field, overlapping views,
near-duplicates) are grouped and every group goes to a single fold; folds are
stratified by modality (see ``nucleiseg.competition.folds``).

Run from the repository root. The committed ``folds/folds.csv`` is made from
the full training set with::

    python scripts/make_folds.py --data-dir ../shared/data/dsb2018 --out folds/folds.csv

An existing output is only replaced with ``--force``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from nucleiseg.competition.folds import DEFAULT_FOLDS_PATH, fold_table, make_folds, write_folds
from nucleiseg.data.reading import SAMPLE_DIR

logger = logging.getLogger("make_folds")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=SAMPLE_DIR,
        help="dataset root holding stage1_train/ (default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_FOLDS_PATH, help="folds CSV (default: %(default)s)"
    )
    parser.add_argument("--folds", type=int, default=5, help="number of folds (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the assignment (default: 0)")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    return parser


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.out.exists() and not args.force:
        raise SystemExit(f"{args.out} exists; pass --force to replace it")
    frame = make_folds(args.data_dir, n_folds=args.folds, seed=args.seed)
    write_folds(frame, args.out)
    sizes = frame.groupby("group").size()
    largest = frame[frame["group"] == sizes.idxmax()]
    logger.info("images per fold and modality:\n%s", fold_table(frame).to_string())
    logger.info(
        "%d groups of more than one image (%d images); largest: %d %s images (group %d)",
        int((sizes > 1).sum()),
        int(sizes[sizes > 1].sum()),
        int(sizes.max()),
        largest["modality"].iloc[0],
        int(sizes.idxmax()),
    )
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
