"""Segment a folder of images with the fold models of one or more runs; write a submission.

    python scripts/predict.py --runs runs/unetpp_sample --images data/sample/stage1_test \
        --out submissions/sample_unetpp.csv
    python scripts/predict.py --runs runs/unetpp_effb0 --images ../shared/data/dsb2018/stage1_test \
        --out submissions/stage1_test_unetpp.csv --save-labels predictions/labels

Every finished fold of every run predicts each image; their probability maps
are averaged, then the watershed postprocessing (the first run's tuned
thresholds if it has them) gives the nuclei. ``--images`` is a folder in the
competition layout or a plain folder of PNG/TIFF files.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from nucleiseg import data
from nucleiseg.inference import load_fold_models, resolve_device, segment_images
from nucleiseg.oof import write_label_png
from nucleiseg.runs import load_postprocess
from nucleiseg.submission import write_submission

log = logging.getLogger("predict")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders")
    parser.add_argument(
        "--images", type=Path, default=data.SAMPLE_DIR / data.TEST_STAGE, help="images to segment"
    )
    parser.add_argument("--out", type=Path, required=True, help="submission CSV to write")
    parser.add_argument("--save-labels", type=Path, help="also write uint16 label PNGs here")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return parser


def main(args: argparse.Namespace) -> dict[str, np.ndarray]:
    device = resolve_device(args.device)
    models = [member for run in args.runs for member in load_fold_models(run, device)]
    params = load_postprocess(args.runs[0])
    images = data.find_images(args.images)
    log.info("%d models, %d images, %s", len(models), len(images), params)
    started = time.perf_counter()
    labels = segment_images(models, images, params, device)
    seconds = time.perf_counter() - started
    write_submission(labels, args.out)
    if args.save_labels:
        for image_id, image_labels in labels.items():
            write_label_png(args.save_labels / f"{image_id}.png", image_labels)
    nuclei = sum(int(np.count_nonzero(np.unique(v))) for v in labels.values())
    print(
        f"{len(labels)} images, {nuclei} nuclei, {seconds / len(labels):.2f} s per image "
        f"-> {args.out}"
    )
    return labels


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
