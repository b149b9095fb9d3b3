"""Score a model, a run, a bundle or saved label images on any labelled folder (held-out data).

    python scripts/evaluate_external.py --images ../shared/data/monuseg/test
    python scripts/evaluate_external.py --runs runs/unetpp_effb0_generalized --folds 0 --tta flip \
        --images ../shared/data/monuseg/test
    python scripts/evaluate_external.py --runs runs/unetpp_effb0_generalized --size-adaptive \
        --images ../shared/data/monuseg/test --save-labels predictions/monuseg_labels
    python scripts/evaluate_external.py --labels predictions/monuseg_labels \
        --images ../shared/data/monuseg/test

``--images`` is a labelled folder: ``images/`` + ``labels/`` (label images)
or the competition layout with masks. Without ``--runs`` or ``--labels`` the
reference bundle in ``weights/`` predicts, with the inference options of its
manifest (flags override them). ``--folds`` keeps only some fold models of the
runs (e.g. ``0`` to compare one fold-0 model with another); the images are
segmented through :class:`nucleiseg.api.Segmenter`. With ``--labels`` no model
runs: the label images in that folder (``<id>.png`` or ``<id>.tif``, as
``--save-labels`` and ``scripts/predict.py`` write them) are scored.
Prints the mean AP (the competition metric) per image and per modality in the
same style as the CV, and ends with ``<name> mean AP: <value>``. Every input
and output is checked before any model loads (images and their labels, the
runs or the bundle, the output paths): each problem is one ``error:`` line and
the exit status is 2. If writing ``--save-labels`` fails, the saving stops with
a warning, the scores are still printed, then the failure is one ``error:``
line and the exit status is 1.

MoNuSeg (Kumar et al., IEEE TMI 2017 and 2020; CC BY-NC-SA 4.0) is the
held-out external check of this project: its ``test/`` never trains anything.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from nucleiseg import cli
from nucleiseg.data import reading

log = logging.getLogger("evaluate_external")


def get_args_parser() -> argparse.ArgumentParser:
    from nucleiseg.inference.options import add_option_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="labelled folder to score on")
    parser.add_argument("--runs", type=Path, nargs="+", help="run folders (default: --weights)")
    parser.add_argument(
        "--weights", type=Path, default=cli.WEIGHTS_DIR, help="bundle used without --runs"
    )
    parser.add_argument("--folds", help="fold models to use: a number, a list or all (default)")
    parser.add_argument(
        "--labels", type=Path, help="score these saved label images (<id>.png or .tif); no model"
    )
    parser.add_argument("--name", help="name of the data in the last line (default: folder)")
    parser.add_argument(
        "--save-labels",
        type=Path,
        help="also write the label images here: <id>.png (uint16) when the labels fit, else "
        "<id>.tif (uint32)",
    )
    parser.add_argument("--per-image", type=Path, help="write per-image scores to this CSV")
    cli.add_device_argument(parser)
    add_option_arguments(parser)
    return parser


def _data_name(folder: Path) -> str:
    """``monuseg/test`` for ``../shared/data/monuseg/test``."""
    return "/".join(folder.resolve().parts[-2:])


def _check_inputs(args: argparse.Namespace) -> tuple[dict[str, Path], list[Path], object, set]:
    """Images with labels, runs, options and folds, every problem refused at once (status 2)."""
    from nucleiseg.competition.folds import parse_fold_list
    from nucleiseg.data.label_files import label_file
    from nucleiseg.inference.options import given_options
    from nucleiseg.inference.predictor import InferenceOptions, with_options
    from nucleiseg.models.runs import fold_dirs
    from nucleiseg.training.checks import labelled_problems, model_problems, output_problems
    from nucleiseg.training.reference import inference_options

    problems = output_problems([args.per_image], [args.save_labels])
    images, found = labelled_problems(args.images)
    problems += found
    runs, options, folds = [], None, None
    if args.labels is not None:
        try:
            missing = [i for i in images if label_file(args.labels, i) is None]
        except reading.DataError as error:
            problems.append(str(error))
            missing = []
        if missing:
            shown = f"{len(missing)} images, e.g. {missing[0]}"
            problems.append(f"{args.labels}: no label image (.png or .tif) for {shown}")
        cli.refuse_if(problems)
        return images, runs, options, folds
    runs, found = model_problems(args.runs, args.weights)
    problems += found
    try:
        base = inference_options(args.weights) if runs and not args.runs else InferenceOptions()
        options = with_options(base, given_options(args))
        if args.folds is not None:
            available = {k for run in runs for k in fold_dirs(run)}
            folds = set(parse_fold_list(args.folds, available))
    except (reading.DataError, ValueError) as error:
        problems.append(str(error))
    cli.refuse_if(problems)
    return images, runs, options, folds


def main(args: argparse.Namespace) -> float:
    from nucleiseg.atomic import WriteError, atomic_path
    from nucleiseg.data.side_outputs import SideOutputs
    from nucleiseg.evaluation.summary import print_external_report, score_labelled

    images, runs, options, folds = _check_inputs(args)
    outputs = SideOutputs(labels=args.save_labels)
    with cli.refusing(reading.DataError), cli.refusing(WriteError, status=cli.FAILURE_STATUS):
        if args.labels is not None:
            predictions, modalities = _saved(args, images)
        else:
            predictions, modalities = _predicted(args, images, runs, options, folds, outputs)
        per_image = score_labelled(predictions, args.images, modalities)
        if args.per_image:
            with atomic_path(args.per_image) as tmp:
                per_image.to_csv(tmp, index=False, float_format="%.6g")
    score = print_external_report(per_image, args.name or _data_name(args.images))
    if outputs.failure:
        cli.refuse([outputs.failure], status=cli.FAILURE_STATUS)
    return score


def _saved(args: argparse.Namespace, images: dict[str, Path]) -> tuple[dict, dict]:
    """Saved label images and each image's modality; no model."""
    from nucleiseg.data.label_files import label_file, read_label_file
    from nucleiseg.data.modality import classify_modality

    predictions = {i: read_label_file(label_file(args.labels, i)) for i in images}
    modalities = {i: classify_modality(reading.read_image(path)) for i, path in images.items()}
    return predictions, modalities


def _predicted(args, images, runs, options, folds, outputs) -> tuple[dict, dict]:
    """Label images segmented now by the runs' fold models, and each image's modality."""
    from nucleiseg.api import Segmenter
    from nucleiseg.data.modality import classify_modality

    segmenter = Segmenter.from_runs(runs, device=args.device, folds=folds, options=options)
    names = ", ".join(Path(r).name for r in runs)
    log.info("%d models (%s), %d images", len(segmenter.members()), names, len(images))
    predictions, modalities = {}, {}
    started = time.perf_counter()
    for image_id, image, labels in segmenter.segment_files(images):
        predictions[image_id] = labels
        modalities[image_id] = classify_modality(image)
        outputs(image_id, image, labels)
    print(f"{(time.perf_counter() - started) / len(images):.2f} s per image")
    return predictions, modalities


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
