"""Segment images with the fold models of one or more runs; write a submission or OOF labels.

    python scripts/predict.py --images ../shared/data/dsb2018/stage1_test \
        --out submissions/stage1_test_reference.csv
    python scripts/predict.py --runs runs/unetpp_sample --images data/sample/stage1_test \
        --out submissions/sample_unetpp.csv
    python scripts/predict.py --runs runs/unetpp_effb0 runs/maskrcnn_r18 \
        --images ../shared/data/dsb2018/stage1_test --out submissions/stage1_test_ens.csv \
        --tta d4 --scales 1.0,1.25 --save-labels predictions/labels \
        --save-overlays predictions/overlays
    python scripts/predict.py --oof --runs runs/unetpp_effb0 --tta flip --out-dir runs/oof_flip

Without ``--runs``, the reference ensemble bundled in ``weights/`` predicts,
after every file is checked against its manifest (``--weights`` names another
bundle). Every finished fold of every run predicts each image, over the test-time views
(``--tta``, ``--scales``), whole or in overlapping tiles (``--tile``,
``--overlap``). U-Net++ folds are averaged as probabilities, Mask R-CNN folds
merged by vote, and the two families merged by ``--merge``; each run's tuned
thresholds are used (its ``postprocess.yaml``). ``--images`` is a folder in the
competition layout or a plain folder of PNG/TIFF files.

With ``--oof``, each training image of the runs' data is predicted by the
models of its own fold only, and the label images are written as a run
folder (``<out-dir>/fold<K>/oof/labels/``) that ``scripts/evaluate_oof.py``
scores; the script prints the same tables and ends with ``cv: <value>``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

from nucleiseg import data, oof
from nucleiseg.ensemble import segment_images, write_out_of_fold
from nucleiseg.evaluation import evaluate_run, print_cv_report
from nucleiseg.family import params_by_family
from nucleiseg.folds import DEFAULT_FOLDS_PATH, fold_assignment
from nucleiseg.inference import (
    InferenceOptions,
    add_option_arguments,
    given_options,
    load_fold_models,
    resolve_device,
    with_options,
)
from nucleiseg.overlays import write_overlay
from nucleiseg.reference import WEIGHTS_DIR, ReferenceWeightsError, inference_options, verify
from nucleiseg.runs import fold_dirs, read_run_info
from nucleiseg.submission import write_submission

log = logging.getLogger("predict")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", help="run folders (default: --weights)")
    parser.add_argument(
        "--weights", type=Path, default=WEIGHTS_DIR, help="reference bundle used without --runs"
    )
    parser.add_argument(
        "--images", type=Path, default=data.SAMPLE_DIR / data.TEST_STAGE, help="images to segment"
    )
    parser.add_argument("--out", type=Path, help="submission CSV to write")
    parser.add_argument("--save-labels", type=Path, help="also write uint16 label PNGs here")
    parser.add_argument("--save-overlays", type=Path, help="also write outline overlays here")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--oof", action="store_true", help="predict the runs' OOF images")
    parser.add_argument("--out-dir", type=Path, help="with --oof: run folder to write")
    parser.add_argument("--data-dir", type=Path, help="with --oof: dataset (default: the runs')")
    parser.add_argument("--folds-csv", type=Path, default=DEFAULT_FOLDS_PATH)
    add_option_arguments(parser)
    return parser


def _writer(args: argparse.Namespace):
    """The per-image callback: label PNGs and overlays, as asked."""

    def write(image_id: str, image: np.ndarray, labels: np.ndarray) -> None:
        if args.save_labels:
            oof.write_label_png(args.save_labels / f"{image_id}.png", labels)
        if args.save_overlays:
            write_overlay(args.save_overlays / f"{image_id}.png", image, labels)

    return write


def _summary(labels: dict[str, np.ndarray], seconds: float, shapes: set) -> str:
    nuclei = sum(int(np.count_nonzero(np.unique(v))) for v in labels.values())
    sizes = ", ".join(f"{h}x{w}" for h, w in sorted(shapes)[:3]) + (
        ", ..." if len(shapes) > 3 else ""
    )
    return (
        f"{len(labels)} images ({sizes}), {nuclei} nuclei, "
        f"{seconds / max(len(labels), 1):.2f} s per image"
    )


def predict_oof(args: argparse.Namespace, device: torch.device, options: InferenceOptions) -> float:
    """Each training image predicted by its own fold's models; returns the CV score."""
    if args.out_dir is None:
        raise SystemExit("--oof needs --out-dir")
    first_fold = next(iter(fold_dirs(args.runs[0]).values()))
    data_dir = args.data_dir or Path(read_run_info(first_fold)["data_dir"])
    images = data.find_images(data_dir / data.TRAIN_STAGE)
    fold_of = fold_assignment(args.folds_csv, images).set_index("image_id")["fold"].to_dict()
    models = [member for run in args.runs for member in load_fold_models(run, device)]
    images = {i: p for i, p in images.items() if fold_of[i] in {m.fold for m in models}}
    results = write_out_of_fold(
        models,
        images,
        fold_of,
        params_by_family(args.runs),
        device,
        args.out_dir,
        data_dir,
        options,
        _writer(args),
    )
    for fold, (labels, seconds) in results.items():
        shapes = {data.image_size(images[i]) for i in labels}
        print(f"fold {fold}: {_summary(labels, seconds, shapes)}")
    per_image = evaluate_run(args.out_dir, data_dir, args.folds_csv)
    return print_cv_report(per_image)


def main(args: argparse.Namespace):
    device = resolve_device(args.device)
    try:
        given = given_options(args)
        base = InferenceOptions()
        if not args.runs:
            args.runs = verify(args.weights)
            base = inference_options(args.weights)
            runs = ", ".join(r.name for r in args.runs)
            log.info("reference ensemble %s: %s", args.weights, runs)
        options = with_options(base, given)
    except (ReferenceWeightsError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    if args.oof:
        return predict_oof(args, device, options)
    if args.out is None:
        raise SystemExit("--out is required (or --oof with --out-dir)")
    models = [member for run in args.runs for member in load_fold_models(run, device)]
    params = params_by_family(args.runs)
    images = data.find_images(args.images)
    log.info("%d models, %d images, %s, %s", len(models), len(images), params, options)
    started = time.perf_counter()
    labels = segment_images(models, images, params, device, options, _writer(args))
    seconds = time.perf_counter() - started
    write_submission(labels, args.out)
    shapes = {data.image_size(p) for p in images.values()}
    print(f"{_summary(labels, seconds, shapes)} -> {args.out}")
    if args.save_overlays:
        print(f"overlays: {args.save_overlays}")
    return labels


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
