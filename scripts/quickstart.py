"""The README's main job: the reference ensemble on the bundled sample, end to end.

    python scripts/quickstart.py

Checks the reference weights in ``weights/`` against their manifest, segments
the sample's test images with every fold model, with the bundle's own test-time
views and family merge (its manifest's ``inference``), and writes a validated
submission to ``submissions/sample_reference.csv`` with outline overlays in
``predictions/sample_overlays/``; then scores the sample's labelled training
images out of fold (each image only with the models of the fold that did not
train on it) with the competition metric, per fold and per modality, and ends
with ``oof mean AP: <value>``. A few minutes on 2 CPU cores, no training.
The bundle, the images (headers), the folds file and the output paths are all
checked first; each problem is one ``error:`` line, with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from nucleiseg import cli
from nucleiseg.data import reading

log = logging.getLogger("quickstart")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=cli.WEIGHTS_DIR, help="reference bundle")
    parser.add_argument("--data-dir", type=Path, default=reading.SAMPLE_DIR)
    parser.add_argument("--folds-csv", type=Path, default=cli.DEFAULT_FOLDS_PATH)
    parser.add_argument("--out", type=Path, default=Path("submissions/sample_reference.csv"))
    parser.add_argument("--overlays", type=Path, default=Path("predictions/sample_overlays"))
    parser.add_argument("--oof-dir", type=Path, default=Path("predictions/sample_oof"))
    cli.add_device_argument(parser)
    return parser


def main(args: argparse.Namespace) -> float:
    from nucleiseg.atomic import WriteError
    from nucleiseg.competition.folds import fold_assignment
    from nucleiseg.competition.submission import write_submission
    from nucleiseg.data.overlays import write_overlay
    from nucleiseg.evaluation.summary import evaluate_run, print_cv_report
    from nucleiseg.inference.ensemble import segment_images, write_out_of_fold
    from nucleiseg.inference.family import params_by_family
    from nucleiseg.inference.predictor import load_fold_models, resolve_device
    from nucleiseg.training.checks import (
        bundle_problems,
        image_problems,
        labelled_problems,
        output_problems,
    )
    from nucleiseg.training.reference import inference_options

    problems = output_problems([args.out], [args.overlays, args.oof_dir])
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
        write_submission(labels, args.out)
        seconds = (time.perf_counter() - started) / max(len(labels), 1)
        print(f"wrote {args.out} ({len(labels)} images, {seconds:.1f} s per image)")
        print(f"overlays: {args.overlays}/")

        write_out_of_fold(
            models,
            train_images,
            fold_of.to_dict(),
            params,
            device,
            args.oof_dir,
            args.data_dir,
            options,
        )
        per_image = evaluate_run(args.oof_dir, args.data_dir, args.folds_csv)
    print_cv_report(per_image)
    score = float(per_image["score"].mean())
    print(f"oof mean AP: {score:.4f}")
    return score


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    main(get_args_parser().parse_args())
