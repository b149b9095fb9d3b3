"""The README's main job: the reference bundle on the bundled sample, end to end, no training.

    python scripts/quickstart.py           # a few CPU minutes
    python scripts/quickstart.py --full    # every image with the whole bundle, 3x the CPU time

Checks the reference weights in ``weights/`` against their manifest, then:

1. segments the first ``--test-images`` (4) of the sample's test images with the
   whole bundle (every fold model in it, with its manifest's test-time views and,
   where it holds both families, their merge), writes the submission to
   ``submissions/sample_reference.csv``, reads it back and validates it against
   the images, and draws each image's nuclei in ``predictions/sample_overlays/``;
2. scores the sample's 40 labelled training images out of fold (each image only
   with a model of the fold that did not train on it) with the ``--fast`` preset
   of ``scripts/predict.py`` (that fold's U-Net++ alone, no test-time views),
   per fold and per modality, and ends with ``oof mean AP: <value>``.

``--full`` is the longer job: every test image, and the out-of-fold images with
the whole bundle as well. The bundle, the images (headers), the folds file and the
output paths are all checked first; each problem is one ``error:`` line, with exit
status 2.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from nucleiseg import cli
from nucleiseg.data import reading

log = logging.getLogger("quickstart")

QUICK_TEST_IMAGES = 4


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=cli.WEIGHTS_DIR, help="reference bundle")
    parser.add_argument("--data-dir", type=Path, default=reading.SAMPLE_DIR)
    parser.add_argument("--folds-csv", type=Path, default=cli.DEFAULT_FOLDS_PATH)
    parser.add_argument("--out", type=Path, default=Path("submissions/sample_reference.csv"))
    parser.add_argument("--overlays", type=Path, default=Path("predictions/sample_overlays"))
    parser.add_argument("--oof-dir", type=Path, default=Path("predictions/sample_oof"))
    parser.add_argument(
        "--test-images",
        type=int,
        default=QUICK_TEST_IMAGES,
        help="segment the first N test images by name (ignored with --full)",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="every test image, and the out-of-fold images with the whole bundle, not --fast",
    )
    cli.add_device_argument(parser)
    return parser


def main(args: argparse.Namespace) -> float:
    import numpy as np

    from nucleiseg.atomic import WriteError
    from nucleiseg.competition.folds import fold_assignment
    from nucleiseg.competition.submission import validate_submission, write_submission
    from nucleiseg.data.overlays import write_overlay
    from nucleiseg.evaluation.summary import evaluate_run, print_cv_report
    from nucleiseg.inference.ensemble import segment_images, write_out_of_fold
    from nucleiseg.inference.family import params_by_family
    from nucleiseg.inference.options import FAST_VIEWS
    from nucleiseg.inference.predictor import (
        fast_preset_models,
        load_fold_models,
        resolve_device,
        with_options,
    )
    from nucleiseg.training.checks import (
        bundle_problems,
        image_problems,
        labelled_problems,
        output_problems,
    )
    from nucleiseg.training.reference import inference_options

    problems = output_problems([args.out], [args.overlays, args.oof_dir])
    if not args.full and args.test_images < 1:
        problems.append(f"--test-images {args.test_images}: give at least 1 (or --full)")
    runs, found = bundle_problems(args.weights)
    problems += found
    test_images, found = image_problems(args.data_dir / reading.TEST_STAGE)
    problems += found
    train_images, found = labelled_problems(args.data_dir / reading.TRAIN_STAGE)
    problems += found
    try:
        if train_images:
            fold_of = fold_assignment(args.folds_csv, train_images).set_index("image_id")["fold"]
        options = inference_options(args.weights) if runs else None
        device = resolve_device(args.device)
    except (reading.DataError, ValueError, RuntimeError) as error:
        problems.append(str(error))
    cli.refuse_if(problems)
    if not args.full:
        test_images = {i: test_images[i] for i in sorted(test_images)[: args.test_images]}

    with cli.refusing(reading.DataError), cli.refusing(WriteError, status=cli.FAILURE_STATUS):
        models = [member for run in runs for member in load_fold_models(run, device)]
        params = params_by_family(runs)
        names = ", ".join(r.name for r in runs)
        print(f"reference ensemble: {len(models)} fold models of {names}")
        print(f"views {options.tta} x scales {options.scales}, family merge {options.family_merge}")

        def overlay(image_id: str, image, labels) -> None:
            write_overlay(args.overlays / f"{image_id}.png", image, labels)

        started = time.perf_counter()
        labels = segment_images(models, test_images, params, device, options, overlay)
        seconds = (time.perf_counter() - started) / max(len(labels), 1)
        write_submission(labels, args.out)
        sizes = {image_id: reading.image_size(path) for image_id, path in test_images.items()}
        invalid = validate_submission(args.out, sizes)  # the file as written, against the images
        if invalid:
            cli.refuse([str(problem) for problem in invalid], status=cli.FAILURE_STATUS)
        nuclei = sum(int(np.count_nonzero(np.unique(v))) for v in labels.values())
        print(f"wrote {args.out}: {nuclei} nuclei in {len(labels)} images, validated")
        print(f"{seconds:.1f} s per image; overlays: {args.overlays}/")

        if args.full:
            oof_models, oof_options = models, options
            print("out of fold: the whole bundle, each image with its own fold's models")
        else:
            folds = sorted({m.fold for m in models})
            oof_models = [fast_preset_models([m for m in models if m.fold == k])[0] for k in folds]
            oof_options = with_options(options, FAST_VIEWS)
            print("out of fold: --fast, each image with its own fold's U-Net++, no views")
        write_out_of_fold(
            oof_models,
            train_images,
            fold_of.to_dict(),
            params,
            device,
            args.oof_dir,
            args.data_dir,
            oof_options,
        )
        per_image = evaluate_run(args.oof_dir, args.data_dir, args.folds_csv)
    print_cv_report(per_image)
    score = float(per_image["score"].mean())
    print(f"oof mean AP: {score:.4f}")
    return score


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    main(get_args_parser().parse_args())
