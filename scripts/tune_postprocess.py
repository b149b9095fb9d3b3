"""Tune a run's raw output -> instances thresholds on its out-of-fold predictions.

    python scripts/tune_postprocess.py runs/unetpp_effb0_generalized
    python scripts/tune_postprocess.py runs/unetpp_effb0_generalized --apply  # OOF labels too
    python scripts/tune_postprocess.py runs/unetpp_effb0_generalized_ft_bitdepth --by-modality \
        --start runs/unetpp_effb0_generalized_ft_bitdepth/postprocess.yaml
    python scripts/tune_postprocess.py runs/maskrcnn_r18_generalized --folds 3  # fold 3 only

U-Net++ runs tune the watershed thresholds on their probability maps, Mask
R-CNN runs the instance thresholds (score, mask, NMS, minimum size) on their
soft instances.

A fold whose ``oof/`` holds label images only (a fresh clone: raw outputs
are not committed) has its raw outputs predicted again from its weights,
without test-time views as in training, and cached where ``scripts/ablate.py``
keeps them (``<run>/cache/``).

Writes the best thresholds to ``<run>/postprocess.yaml`` (used by
``scripts/predict.py``) and every evaluation to ``<run>/postprocess_search.csv``.
With ``--by-modality``, fluorescence and the light-background modalities
(brightfield with stained tissue) then search again, each on its own images from
the thresholds of all, and keep their own where they gain at least 0.002 there:
``postprocess.yaml`` holds them under ``modalities`` and every image is segmented
with its modality's (classified from its pixels, as at inference).
With ``--apply`` the out-of-fold label images are rewritten with the tuned
thresholds, so that ``scripts/evaluate_oof.py`` reports the tuned CV. The
thresholds are chosen on these same out-of-fold images (a handful of numbers
over hundreds of images, so the optimism is small), never on test images.

A run folder without out-of-fold outputs, a missing dataset or an unreadable
configuration is one ``error:`` line and exit status 2, before any work; so is a
fold whose raw outputs must be predicted again but whose weights are not there (a
run kept for its OOF labels and records), when that fold is reached.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from nucleiseg import cli
from nucleiseg.atomic import atomic_path
from nucleiseg.competition.metric import average_precision
from nucleiseg.data import reading
from nucleiseg.data.modality import MODALITIES, classify_modality
from nucleiseg.evaluation.ablation import run_raws
from nucleiseg.inference import oof
from nucleiseg.inference.family import (
    ByModality,
    Thresholds,
    as_dict,
    for_modality,
    get_family,
    read_params,
)
from nucleiseg.inference.predictor import InferenceOptions, resolve_device
from nucleiseg.models.config import load_config
from nucleiseg.models.runs import CONFIG, POSTPROCESS_YAML, read_run_info
from nucleiseg.postprocessing.tuning import coordinate_search, mean_score, tune_by_modality

log = logging.getLogger("tune_postprocess")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="run folder holding fold<K>/oof/")
    parser.add_argument("--data-dir", type=Path, help="dataset root (default: the run's own)")
    parser.add_argument(
        "--folds", type=int, nargs="+", help="tune on these folds' OOF outputs only (default: all)"
    )
    parser.add_argument("--apply", action="store_true", help="rewrite the OOF label images")
    parser.add_argument(
        "--start",
        type=Path,
        help="thresholds YAML to search from, e.g. the run's postprocess.yaml to refine it "
        "(default: those the run trained with)",
    )
    parser.add_argument(
        "--by-modality",
        action="store_true",
        help="then tune fluorescence and brightfield + tissue on their own images",
    )
    cli.add_device_argument(parser)
    return parser


def main(args: argparse.Namespace) -> None:
    with cli.refusing(reading.DataError, FileNotFoundError, ValueError, RuntimeError):
        folds = oof.oof_fold_dirs(args.run_dir)
        if args.folds:
            absent = sorted(set(args.folds) - set(folds))
            if absent:
                cli.refuse([f"{args.run_dir}: no OOF outputs for fold(s) {absent}"])
            folds = {k: folds[k] for k in args.folds}
        first = next(iter(folds.values()))
        data_dir = args.data_dir or Path(read_run_info(first)["data_dir"])
        config = load_config(first / CONFIG)
        family = get_family(config.model)
        start = family.params(config)
        if args.start is not None:
            # The thresholds of all images: a file by modality starts from its default.
            start = read_params(args.start, family)
            start = start.default if isinstance(start, ByModality) else start
        images = reading.find_images(reading.labelled_root(data_dir))
        device = resolve_device(args.device)
    raws, fold_dir_of = {}, {}
    for fold, fold_dir in folds.items():
        try:
            fold_raws = family.load_oof(fold_dir)
        except reading.DataError:  # label images only
            log.info("fold %d: no raw outputs in %s, predicting them again", fold, fold_dir)
            # A fold without weights (a run kept for its OOF labels): one error line.
            with cli.refusing(FileNotFoundError):
                fold_raws, _ = run_raws(args.run_dir, InferenceOptions(), data_dir, device, [fold])
        for image_id, raw in fold_raws.items():
            raws[image_id] = raw
            fold_dir_of[image_id] = fold_dir
    truth = {i: reading.labels_of(images[i]) for i in tqdm(raws, desc="truth", unit="image")}

    best, history = coordinate_search(raws, truth, start)
    tuned: Thresholds = best
    modality_of = {}
    if args.by_modality:
        modality_of = {
            i: classify_modality(reading.read_image(images[i]))
            for i in tqdm(raws, desc="modality", unit="image")
        }
        own, groups = tune_by_modality(raws, truth, modality_of, best)
        for group in groups.itertuples():
            log.info(
                "%s (%d images): %.4f -> %.4f%s",
                group.group,
                group.images,
                group.start,
                group.tuned,
                "" if group.kept else ", not kept",
            )
        if own:
            tuned = ByModality(best, tuple((m, own[m]) for m in MODALITIES if m in own))
    with atomic_path(args.run_dir / "postprocess_search.csv") as tmp:
        history.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(args.run_dir / POSTPROCESS_YAML) as tmp:
        tmp.write_text(yaml.safe_dump(as_dict(tuned), sort_keys=False))
    log.info("start %s: %.4f", start, mean_score(raws, truth, start))
    log.info("tuned %s", tuned)
    scores = []
    for image_id, raw in tqdm(raws.items(), desc="apply" if args.apply else "score", unit="image"):
        params = for_modality(tuned, modality_of.get(image_id, ""))
        labels = family.to_labels(raw, params)
        scores.append(average_precision(truth[image_id], labels).score)
        if args.apply:
            oof.save_prediction(fold_dir_of[image_id], image_id, None, labels)
    print(f"tuned oof mean AP: {np.mean(scores):.4f}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
