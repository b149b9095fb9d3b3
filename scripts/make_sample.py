"""Rebuild the bundled sample ``data/sample`` from the full competition data.

    python scripts/make_sample.py --data-dir ../shared/data/dsb2018 --out data/sample

Training images are picked per modality and spread over the folds of
``folds/folds.csv``; test images are picked per modality. Small images are
preferred to keep the repository light.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from nucleiseg.competition.folds import read_folds
from nucleiseg.data import reading
from nucleiseg.data.modality import BRIGHTFIELD, FLUORESCENCE, TISSUE, classify_modality
from nucleiseg.data.sample import copy_items, select_sample

log = logging.getLogger("make_sample")

TRAIN_COUNTS = {FLUORESCENCE: 25, TISSUE: 10, BRIGHTFIELD: 5}
TEST_COUNTS = {FLUORESCENCE: 5, TISSUE: 3}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="full dataset root")
    parser.add_argument("--out", type=Path, default=reading.SAMPLE_DIR)
    parser.add_argument("--folds", type=Path, default=Path("folds/folds.csv"))
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _candidates(stage_dir: Path) -> pd.DataFrame:
    rows = []
    for image_id, path in reading.find_images(stage_dir).items():
        image = reading.read_image(path)
        rows.append((image_id, classify_modality(image), image.shape[0] * image.shape[1]))
    return pd.DataFrame(rows, columns=["image_id", "modality", "pixels"])


def main(args: argparse.Namespace) -> None:
    folds = read_folds(args.folds)[["image_id", "fold"]]
    train = _candidates(args.data_dir / reading.TRAIN_STAGE).merge(folds, on="image_id")
    test = _candidates(args.data_dir / reading.TEST_STAGE)
    for stage, candidates, counts in [
        (reading.TRAIN_STAGE, train, TRAIN_COUNTS),
        (reading.TEST_STAGE, test, TEST_COUNTS),
    ]:
        image_ids = select_sample(candidates, counts, args.seed)
        copy_items(args.data_dir / stage, args.out / stage, image_ids)
        chosen = candidates[candidates["image_id"].isin(image_ids)]
        by = ["modality", "fold"] if "fold" in chosen.columns else ["modality"]
        log.info("%s: %d images\n%s", stage, len(image_ids), chosen.groupby(by).size().to_string())


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
