"""Classical baseline (Otsu + distance-transform watershed): score it, write a submission.

Scores every labelled training image of the dataset with the competition
metric (overall and per modality), then segments the test images and writes
a validated submission. With no arguments it runs on the bundled sample:

    python scripts/baseline.py
    python scripts/baseline.py --data-dir ../shared/data/dsb2018 \
        --out submissions/stage1_test_classical.csv
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from nucleiseg.atomic import atomic_path
from nucleiseg.competition.metric import average_precision
from nucleiseg.competition.submission import write_submission
from nucleiseg.data import reading
from nucleiseg.data.modality import classify_modality
from nucleiseg.evaluation.summary import modality_table
from nucleiseg.models.classical import classical_instances

log = logging.getLogger("baseline")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=reading.SAMPLE_DIR,
        help="dataset root holding stage1_train/ and stage1_test/ (default: the bundled sample)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("submissions/sample_classical.csv"),
        help="submission CSV to write for the test images",
    )
    parser.add_argument("--per-image", type=Path, help="also write per-image training scores here")
    return parser


def main(args: argparse.Namespace) -> float:
    rows = []
    train = reading.find_images(args.data_dir / reading.TRAIN_STAGE)
    for image_id, path in tqdm(train.items(), desc="score train", unit="image"):
        sample = reading.load_sample(image_id, path)
        result = average_precision(sample.labels, classical_instances(sample.image))
        modality = classify_modality(sample.image)
        rows.append((image_id, modality, result.score, result.n_true, result.n_pred))
    per_image = pd.DataFrame(rows, columns=["image_id", "modality", "score", "n_true", "n_pred"])
    if args.per_image:
        with atomic_path(args.per_image) as tmp:
            per_image.to_csv(tmp, index=False)
    log.info(
        "classical baseline on %s:\n%s",
        args.data_dir / reading.TRAIN_STAGE,
        modality_table(per_image).to_string(float_format="%.4f"),
    )

    test = reading.find_images(args.data_dir / reading.TEST_STAGE)
    predictions = {
        image_id: classical_instances(reading.read_image(path))
        for image_id, path in tqdm(test.items(), desc="predict test", unit="image")
    }
    write_submission(predictions, args.out)
    log.info(
        "wrote %s (%d images, %d nuclei)",
        args.out,
        len(predictions),
        sum(np.count_nonzero(np.unique(p)) for p in predictions.values()),
    )
    score = float(per_image["score"].mean())
    print(f"train mean AP: {score:.4f}")
    return score


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
