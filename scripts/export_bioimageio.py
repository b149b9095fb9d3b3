"""Export a U-Net++ fold as a bioimage.io model package (rdf.yaml, TorchScript, test tensors).

    python scripts/export_bioimageio.py --weights weights --fold 0 --out exports/unetpp_fold0
    python scripts/export_bioimageio.py --weights runs/unetpp_effb0_generalized --fold 2 \\
        --test-image data/sample/stage1_test/<id>/images/<id>.png --out exports/effb0_fold2

``--weights`` is a reference bundle (its files checked against its manifest;
its first U-Net++ run, or ``--run NAME``) or a run folder. The test image
(default: the first image of the bundled sample's test set) is cut to its
top-left square of at most 256 px, a multiple of 32; the package holds it and
the fold's probabilities for it, so that a tool can check that it runs the
model right (see :mod:`nucleiseg.training.bioimageio`). ``--out`` must be a new
or empty folder; it is written whole or not at all. Every input is checked
before the model is built: one ``error:`` line per problem, exit status 2.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from nucleiseg import cli
from nucleiseg.data import reading

log = logging.getLogger("export_bioimageio")

TEST_SIDE = 256


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--weights", type=Path, default=cli.WEIGHTS_DIR, help="a reference bundle or a run folder"
    )
    parser.add_argument("--run", help="in a bundle: the run to export (default: its first U-Net++)")
    parser.add_argument("--fold", type=int, default=0, help="the fold to export")
    parser.add_argument("--out", type=Path, required=True, help="package folder (new or empty)")
    parser.add_argument(
        "--test-image", type=Path, help="the package's test image (default: a sample image)"
    )
    return parser


def _fold_dir(args: argparse.Namespace) -> tuple[Path | None, list[str]]:
    """The fold folder to export, and the problems met finding it."""
    from nucleiseg.inference.family import run_config
    from nucleiseg.models.runs import fold_dirs
    from nucleiseg.training.checks import bundle_problems, run_problems
    from nucleiseg.training.reference import MANIFEST

    if not args.weights.is_dir():
        return None, [f"--weights {args.weights}: no such bundle or run folder"]
    if (args.weights / MANIFEST).is_file():
        runs, problems = bundle_problems(args.weights)
    else:
        runs, problems = [args.weights], run_problems([args.weights])
    if problems:
        return None, problems
    if args.run is not None:
        runs = [run for run in runs if run.name == args.run]
        if not runs:
            return None, [f"--run {args.run}: no such run in {args.weights}"]
    unetpp = [run for run in runs if run_config(run).model == "unetpp"]
    if not unetpp:
        return None, [f"{args.weights}: no U-Net++ run; only U-Net++ folds export to bioimage.io"]
    folds = fold_dirs(unetpp[0])
    if args.fold not in folds:
        return None, [f"--fold {args.fold}: {unetpp[0]} has folds {sorted(folds)}"]
    return folds[args.fold], []


def _test_image(path: Path | None) -> tuple[object, list[str]]:
    """The test image's top-left square (at most 256 px, a multiple of 32), and its problems."""
    if path is None:
        images = reading.find_images(reading.SAMPLE_DIR / reading.TEST_STAGE)
        path = next(iter(images.values()))
    try:
        image = reading.read_image(path)
    except reading.DataError as error:
        return None, [f"--test-image {error}"]
    side = min(TEST_SIDE, *image.shape[:2]) // 32 * 32
    if side < 64:
        return None, [f"--test-image {path}: smaller than 64 x 64 pixels"]
    return image[:side, :side], []


def main(args: argparse.Namespace) -> Path:
    from nucleiseg.atomic import WriteError, output_problem
    from nucleiseg.training.bioimageio import export_bioimageio, export_problems

    fold_dir, problems = _fold_dir(args)
    image, found = _test_image(args.test_image)
    problems += found
    problems += [p for p in [output_problem(args.out, folder=True)] if p is not None]
    if fold_dir is not None:
        problems += export_problems(fold_dir, args.out)
    cli.refuse_if(dict.fromkeys(problems))
    log.info("exporting %s with a %dx%d test image", fold_dir, *image.shape[:2])
    with cli.refusing(WriteError, status=cli.FAILURE_STATUS):
        out = export_bioimageio(fold_dir, args.out, image)
    print(f"bioimage.io package: {out}/rdf.yaml")
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
