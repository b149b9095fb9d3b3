"""Segment images with the fold models of one or more runs; write a submission or OOF labels.

    python scripts/predict.py --images ../shared/data/dsb2018/stage1_test \
        --out submissions/stage1_test_reference.csv
    python scripts/predict.py --runs runs/unetpp_sample --images data/sample/stage1_test \
        --out submissions/sample_unetpp.csv
    python scripts/predict.py --runs runs/unetpp_effb0_generalized runs/maskrcnn_r18_generalized \
        --images ../shared/data/dsb2018/stage1_test --out submissions/stage1_test_ens.csv \
        --tta d4 --scales 1.0,1.25 --save-labels predictions/labels \
        --save-overlays predictions/overlays --save-outlines predictions/outlines
    python scripts/predict.py --images my_tissue_ome_tiffs --pixel-size auto --fast \
        --out predictions/tissue.csv --save-labels predictions/labels --save-rois predictions/rois
    python scripts/predict.py --oof --runs runs/unetpp_effb0_generalized --tta flip \
        --out-dir runs/oof_flip
    python scripts/predict.py --whole-slide slide.ome.tif --pixel-size auto --fast \
        --out predictions/slide_labels.tif

Without ``--runs``, the reference ensemble bundled in ``weights/`` predicts,
after every file is checked against its manifest (``--weights`` names another
bundle). Every finished fold of every run predicts each image, over the test-time views
(``--tta``, ``--scales``), whole or in overlapping tiles (``--tile``,
``--overlap``; an image whose whole-image pass would take more than
``--max-memory`` GB is tiled without being asked, so any size works, and the
progress bar counts its tiles). ``--fast`` keeps one model (the first U-Net++
fold, else the first fold given; with ``--oof`` each image's own fold) and no
test-time views. U-Net++ folds are averaged as probabilities, Mask R-CNN folds
merged by vote, and the two families merged by ``--merge``; each run's tuned
thresholds are used (its ``postprocess.yaml``, that of the run above when
``--runs`` names one fold folder). ``--images`` is a folder in the
competition layout or a plain folder of PNG/TIFF files (OME-TIFF included).
The images are segmented through :class:`nucleiseg.api.Segmenter`, as
``nucleiseg.load(...).segment(image)`` segments them in Python.

``--pixel-size`` rescales every image to the pixel size the models are taken to
have trained at (0.25 micron; see :mod:`nucleiseg.data.sizing`): a number of
microns for every image, or ``auto`` for each image's own, read from its OME-TIFF
or ImageJ TIFF metadata. The submission's record, ``<out>.yaml`` beside it,
keeps the models, the options and each image's pixel size.

Side outputs, each one file per image named by its id: ``--save-labels``
(``<id>.png``, uint16, when the labels fit, else ``<id>.tif``, uint32;
``--label-format tif`` for TIFF always), ``--save-overlays``,
``--save-outlines`` (GeoJSON for QuPath) and ``--save-rois`` (ImageJ ROI zip).
If one fails, the side outputs stop with a warning, the images are still
segmented and the submission is written, then the failure is one ``error:``
line and the exit status is 1.

Every input and output is checked before any model loads: the output paths,
every image's header, the bundle against its manifest or each run's configs
and weights against their recorded checksums. Each problem is printed on its
own ``error:`` line and the exit status is 2; a file that cannot be written
later (a full disk) stops the run with one line naming it and status 1.

With ``--whole-slide``, one TIFF larger than memory (tiled or in strips; a
pyramidal OME-TIFF's full resolution) is segmented block by block, each
block of ``--block`` pixels seen with ``--block-margin`` pixels of context on
every side (wider than any nucleus), and ``--out`` is its label image: a
tiled uint32 TIFF, written tile by tile, with its record beside it; memory
does not grow with the slide (see :mod:`nucleiseg.inference.slide`). The
progress bar counts blocks. ``--images`` and the side outputs do not apply.

With ``--oof``, each training image of the runs' data is predicted by the
models of its own fold only, and the label images are written as a run
folder (``<out-dir>/fold<K>/oof/labels/``) that ``scripts/evaluate_oof.py``
scores; the script prints the same tables and ends with ``cv: <value>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from pathlib import Path

from nucleiseg import cli
from nucleiseg.data import reading
from nucleiseg.data.sizing import TRAIN_PIXEL_SIZE
from nucleiseg.inference.options import DEFAULT_BLOCK, DEFAULT_MARGIN

log = logging.getLogger("predict")


def get_args_parser() -> argparse.ArgumentParser:
    from nucleiseg.inference.options import add_option_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="+", help="run folders (default: --weights)")
    parser.add_argument(
        "--weights", type=Path, default=cli.WEIGHTS_DIR, help="reference bundle used without --runs"
    )
    parser.add_argument(
        "--images",
        type=Path,
        default=reading.SAMPLE_DIR / reading.TEST_STAGE,
        help="images to segment",
    )
    parser.add_argument(
        "--out", type=Path, help="submission CSV to write (its record beside it: <out>.yaml)"
    )
    parser.add_argument(
        "--save-labels",
        type=Path,
        help="also write label images here: <id>.png (uint16) when the labels fit, else "
        "<id>.tif (uint32, for more than 65,535 nuclei)",
    )
    parser.add_argument(
        "--label-format",
        choices=("png", "tif"),
        default="png",
        help="png: as --save-labels says; tif: TIFF always (uint16, uint32 when needed)",
    )
    parser.add_argument("--save-overlays", type=Path, help="also write outline overlays here")
    parser.add_argument(
        "--save-outlines",
        type=Path,
        help="also write GeoJSON outlines here, one Polygon detection per nucleus "
        "(QuPath: File > Import objects)",
    )
    parser.add_argument(
        "--save-rois",
        type=Path,
        help="also write ImageJ ROI zips of the outlines here (Fiji: File > Open)",
    )
    parser.add_argument(
        "--pixel-size",
        type=_pixel_size,
        metavar="auto|MICRONS",
        help=f"rescale the images from this pixel size to the {TRAIN_PIXEL_SIZE} micron "
        "assumed for the models: DSB 2018 records no pixel size, and the bundle also trained "
        "on MoNuSeg at its 0.25 micron (40x H&E), whose nuclei match the DSB ones in pixels; "
        "auto: each image's own, from its OME-TIFF or ImageJ TIFF metadata "
        "(not with --size-adaptive or --oof)",
    )
    cli.add_device_argument(parser)
    parser.add_argument(
        "--whole-slide",
        type=Path,
        metavar="TIFF",
        help="segment this TIFF, larger than memory, block by block; --out is then its label "
        "image, a tiled uint32 TIFF",
    )
    parser.add_argument(
        "--block",
        type=int,
        default=DEFAULT_BLOCK,
        help="with --whole-slide: side of the blocks, a multiple of 256",
    )
    parser.add_argument(
        "--block-margin",
        type=int,
        default=DEFAULT_MARGIN,
        help="with --whole-slide: pixels each block sees beyond its side, wider than any nucleus",
    )
    parser.add_argument("--oof", action="store_true", help="predict the runs' OOF images")
    parser.add_argument("--out-dir", type=Path, help="with --oof: run folder to write")
    parser.add_argument("--data-dir", type=Path, help="with --oof: dataset (default: the runs')")
    parser.add_argument("--folds-csv", type=Path, default=cli.DEFAULT_FOLDS_PATH)
    parser.add_argument(
        "--fast",
        action="store_true",
        help="one model (the first U-Net++ fold, else the first fold; with --oof each "
        "image's own fold) and no test-time views",
    )
    parser.add_argument(
        "--adapt-bn",
        action="store_true",
        help="re-estimate every model's BatchNorm statistics over --images before predicting "
        "them (no labels, no training; see docs/adaptation.md)",
    )
    add_option_arguments(parser)
    return parser


def _pixel_size(text: str) -> str | float:
    """``auto`` or a positive number of microns, for ``--pixel-size``."""
    if text == "auto":
        return text
    try:
        microns = float(text)
    except ValueError:
        microns = math.nan
    if not (math.isfinite(microns) and microns > 0):
        raise argparse.ArgumentTypeError(f"expected auto or a positive number, got {text!r}")
    return microns


def _flag(name: str) -> str:
    """The command-line flag of an option of :data:`nucleiseg.api.OPTION_NAMES`."""
    return "--" + name.replace("_", "-")


def _side_outputs(args: argparse.Namespace):
    """The per-image side outputs asked for (:class:`nucleiseg.data.side_outputs.SideOutputs`)."""
    from nucleiseg.data.side_outputs import SideOutputs

    return SideOutputs(
        labels=args.save_labels,
        overlays=args.save_overlays,
        outlines=args.save_outlines,
        rois=args.save_rois,
        tiff_labels=args.label_format == "tif",
    )


def _record_path(args: argparse.Namespace) -> Path | None:
    """Where the submission's record goes: ``<out>.yaml``."""
    return None if args.out is None else args.out.with_suffix(".yaml")


def _summary(labels: dict, seconds: float, shapes: set) -> str:
    import numpy as np

    nuclei = sum(int(np.count_nonzero(np.unique(v))) for v in labels.values())
    sizes = ", ".join(f"{h}x{w}" for h, w in sorted(shapes)[:3]) + (
        ", ..." if len(shapes) > 3 else ""
    )
    return (
        f"{len(labels)} images ({sizes}), {nuclei} nuclei, "
        f"{seconds / max(len(labels), 1):.2f} s per image"
    )


def _changed(settings) -> str:
    """The fields of a settings dataclass that differ from its defaults, as ``name=value``."""
    defaults = type(settings)()
    changed = [
        f"{field.name}={getattr(settings, field.name)}"
        for field in dataclasses.fields(settings)
        if getattr(settings, field.name) != getattr(defaults, field.name)
    ]
    return ", ".join(changed) or "defaults"


def _oof_inputs(args: argparse.Namespace, runs: list[Path]) -> tuple[Path | None, dict, dict, list]:
    """The dataset, its training images and their folds for ``--oof``, and the problems met."""
    from nucleiseg.competition.folds import fold_assignment
    from nucleiseg.models.runs import fold_dirs, read_run_info
    from nucleiseg.training.checks import image_problems

    data_dir = args.data_dir
    first_folds = list(fold_dirs(runs[0]).values()) if runs else []
    if data_dir is None and not first_folds:
        return None, {}, {}, []  # the run's own problem is reported
    try:
        if data_dir is None:
            data_dir = Path(read_run_info(first_folds[0])["data_dir"])
        images, problems = image_problems(reading.labelled_root(data_dir))
        fold_of = {}
        if images:
            assignment = fold_assignment(args.folds_csv, images)
            fold_of = assignment.set_index("image_id")["fold"].to_dict()
    except (reading.DataError, OSError, KeyError) as error:
        return None, {}, {}, [str(error)]
    return data_dir, images, fold_of, problems


@dataclasses.dataclass
class _Inputs:
    """What a prediction needs, every part checked before any model loads."""

    runs: list[Path]
    images: dict[str, Path]
    params: dict
    base: object
    given: dict
    settings: object
    device: object
    pixel_sizes: dict[str, float]
    data_dir: Path | None = None
    fold_of: dict[str, int] | None = None


def _check_inputs(args: argparse.Namespace) -> _Inputs:
    """Check outputs, runs or bundle, images and options; refuse (status 2) naming every problem."""
    from nucleiseg.api import OPTION_NAMES, resolve_settings
    from nucleiseg.data.slide_files import slide_problem
    from nucleiseg.inference.family import params_by_family, run_config
    from nucleiseg.inference.predictor import InferenceOptions, resolve_device
    from nucleiseg.inference.slide import slide_problems
    from nucleiseg.training.checks import (
        image_problems,
        model_problems,
        output_problems,
        split_problems,
    )
    from nucleiseg.training.reference import inference_options

    problems = []
    side = [args.save_labels, args.save_overlays, args.save_outlines, args.save_rois]
    if args.adapt_bn and (args.oof or args.whole_slide is not None):
        # OOF images are the models' own training data; a slide is never read whole.
        problems.append("--adapt-bn: only with --images (not with --oof or --whole-slide)")
    if args.whole_slide is not None:
        problems += _slide_argument_problems(args, side)
    elif args.oof:
        if args.out_dir is None:
            problems.append("--oof needs --out-dir")
        if args.pixel_size is not None:
            problems.append("--pixel-size: the --oof images are the training images; leave it out")
        problems += output_problems(folders=[args.out_dir, *side])
    else:
        if args.out is None:
            problems.append("--out is required (or --oof with --out-dir)")
        problems += output_problems([args.out, _record_path(args)], side)
    runs, found = model_problems(args.runs, args.weights)
    problems += found
    data_dir, fold_of = None, None
    if args.whole_slide is not None:
        images = {args.whole_slide.stem: args.whole_slide}
        found = [problem for problem in [slide_problem(args.whole_slide)] if problem]
    elif args.oof:
        data_dir, images, fold_of, found = _oof_inputs(args, runs)
        found += split_problems(runs, fold_of, args.folds_csv)
    else:
        images, found = image_problems(args.images)
    problems += found
    pixel_sizes, found = _pixel_sizes(None if args.oof else args.pixel_size, images)
    problems += found
    given = {name: getattr(args, name) for name in OPTION_NAMES if name != "pixel_size"}
    base = settings = device = params = None
    try:
        base = inference_options(args.weights) if runs and not args.runs else InferenceOptions()
        settings = resolve_settings(base, given, _flag)
        for size in sorted(set(pixel_sizes.values())):
            resolve_settings(base, given | {"pixel_size": size}, _flag)
    except (reading.DataError, ValueError) as error:
        problems.append(str(error))
    try:
        device = resolve_device(args.device)
        if args.whole_slide is not None and settings is not None:
            configs = [run_config(run) for run in runs] if not problems else []
            problems += slide_problems(settings.options, configs, _flag)
        if runs and not problems:
            params = params_by_family(runs)
    except (reading.DataError, ValueError, RuntimeError) as error:
        problems.append(str(error))
    cli.refuse_if(problems)
    return _Inputs(
        runs, images, params, base, given, settings, device, pixel_sizes, data_dir, fold_of
    )


def _slide_argument_problems(args: argparse.Namespace, side: list) -> list[str]:
    """The problems of ``--whole-slide`` with the other flags and its output, one line each."""
    from nucleiseg.inference.slide import check_blocks
    from nucleiseg.training.checks import output_problems

    problems = []
    if args.oof:
        problems.append("--whole-slide and --oof: choose one")
    if args.out is None:
        problems.append("--whole-slide needs --out, the label TIFF to write")
    elif args.out.suffix.lower() not in (".tif", ".tiff"):
        problems.append(f"--out {args.out}: with --whole-slide it is the label image; name a .tif")
    elif args.out.resolve() == args.whole_slide.resolve():
        problems.append(f"--out {args.out}: is the slide itself; name another file")
    flags = ["--save-labels", "--save-overlays", "--save-outlines", "--save-rois"]
    given = [flag for flag, path in zip(flags, side, strict=True) if path is not None]
    if given:
        problems.append(
            f"{', '.join(given)}: not with --whole-slide, whose --out is the label image"
        )
    try:
        check_blocks(args.block, args.block_margin)
    except ValueError as error:
        problems.append(f"--block {args.block}, --block-margin {args.block_margin}: {error}")
    if args.out is not None:
        problems += output_problems([args.out, _record_path(args)])
    return problems


def _pixel_sizes(given: str | float | None, images: dict[str, Path]) -> tuple[dict, list[str]]:
    """Each image's microns per pixel for ``--pixel-size`` (none without it), and the problems:
    with ``auto``, every image whose metadata records none."""
    from nucleiseg.data.sizing import read_pixel_size

    if given != "auto":
        return ({} if given is None else dict.fromkeys(images, given)), []
    sizes, problems = {}, []
    for image_id, path in images.items():
        try:
            sizes[image_id] = read_pixel_size(path)
        except reading.DataError as error:
            problems.append(str(error))
            continue
        if sizes[image_id] is None:
            problems.append(
                f"{path}: records no pixel size (--pixel-size auto reads OME-TIFF and ImageJ "
                "TIFF metadata); give --pixel-size MICRONS"
            )
    return {i: size for i, size in sizes.items() if size is not None}, problems


def main(args: argparse.Namespace):
    from nucleiseg.atomic import WriteError
    from nucleiseg.inference.family import ByModality, run_config
    from nucleiseg.models.runs import postprocess_path

    inputs = _check_inputs(args)
    if not args.runs:
        log.info("reference ensemble %s", args.weights)
    for run in inputs.runs:
        tuned = postprocess_path(run)
        source = tuned if tuned.is_file() else f"its training config (no {tuned})"
        log.info("%s: %s, thresholds from %s", run, run_config(run).model, source)
    for name, thresholds in inputs.params.items():
        if isinstance(thresholds, ByModality):
            log.info("%s thresholds: %s", name, _changed(thresholds.default))
            for modality, own in thresholds.modalities:
                log.info("%s thresholds of %s images: %s", name, modality, _changed(own))
        else:
            log.info("%s thresholds: %s", name, _changed(thresholds))
    log.info(
        "%d images; inference options: %s", len(inputs.images), _changed(inputs.settings.options)
    )
    with cli.refusing(reading.DataError), cli.refusing(WriteError, status=cli.FAILURE_STATUS):
        if args.whole_slide is not None:
            return _predict_slide(args, inputs)
        return _predict_oof(args, inputs) if args.oof else _predict(args, inputs)


def _predict(args: argparse.Namespace, inputs: _Inputs) -> dict:
    """Segment the images, writing each one's side outputs as it comes, then the submission."""
    import yaml

    from nucleiseg.api import Segmenter
    from nucleiseg.atomic import WriteError, write_text
    from nucleiseg.competition.submission import write_submission

    segmenter = Segmenter.from_runs(
        inputs.runs, device=inputs.device, options=inputs.base, **inputs.given
    )
    log.info("%d fold models", len(segmenter.members()))
    if args.adapt_bn:
        passes = segmenter.adapt_batchnorm(inputs.images)
        log.info(
            "BatchNorm statistics re-estimated over %d images (%d passes)",
            len(inputs.images),
            passes,
        )
    outputs = _side_outputs(args)
    started = time.perf_counter()
    labels = {}
    for image_id, image, found in segmenter.segment_files(inputs.images, inputs.pixel_sizes):
        labels[image_id] = found
        outputs(image_id, image, found)
    seconds = time.perf_counter() - started
    try:
        write_submission(labels, args.out)
        write_text(_record_path(args), yaml.safe_dump(_record(args, inputs), sort_keys=False))
    except WriteError as error:
        cli.refuse([p for p in (outputs.failure, str(error)) if p], status=cli.FAILURE_STATUS)
    shapes = {reading.image_size(p) for p in inputs.images.values()}
    print(f"{_summary(labels, seconds, shapes)} -> {args.out}")
    if args.save_overlays:
        print(f"overlays: {args.save_overlays}")
    if outputs.failure:
        cli.refuse([outputs.failure], status=cli.FAILURE_STATUS)
    return labels


def _predict_slide(args: argparse.Namespace, inputs: _Inputs):
    """Segment one slide block by block into its tiled label TIFF, then write its record."""
    import yaml

    from nucleiseg.api import Segmenter
    from nucleiseg.atomic import write_text

    segmenter = Segmenter.from_runs(
        inputs.runs, device=inputs.device, options=inputs.base, **inputs.given
    )
    log.info("%d fold models", len(segmenter.members()))
    pixel_size = inputs.pixel_sizes.get(args.whole_slide.stem)
    result = segmenter.segment_slide(
        args.whole_slide,
        args.out,
        block=args.block,
        margin=args.block_margin,
        pixel_size=pixel_size,
    )
    record = _record(args, inputs) | {
        "images": str(args.whole_slide),
        "whole_slide": {"block": args.block, "margin": args.block_margin},
        "nuclei": result.nuclei,
    }
    write_text(_record_path(args), yaml.safe_dump(record, sort_keys=False))
    height, width = result.shape
    print(
        f"{height}x{width} slide, {result.blocks} blocks, {result.nuclei} nuclei, "
        f"{result.seconds / (height * width / 1e6):.3f} s per megapixel -> {args.out}"
    )
    return result


def _record(args: argparse.Namespace, inputs: _Inputs) -> dict:
    """The submission's record: images, models, options, thresholds and the images' pixel
    sizes."""
    from nucleiseg.inference.family import as_dict
    from nucleiseg.models.config import plain

    models = (
        {"runs": [str(run) for run in args.runs]} if args.runs else {"weights": str(args.weights)}
    )
    record = {
        "images": str(args.images),
        **models,
        "fast": args.fast,
        "adapt_bn": args.adapt_bn,
        "inference": plain(dataclasses.asdict(inputs.settings.options)),
        "thresholds": {name: plain(as_dict(each)) for name, each in inputs.params.items()},
    }
    if inputs.pixel_sizes:
        record["pixel_size"] = {"training": TRAIN_PIXEL_SIZE, "images": inputs.pixel_sizes}
    return record


def _predict_oof(args: argparse.Namespace, inputs: _Inputs) -> float:
    """Each training image predicted by its own fold's models; returns the CV score."""
    from nucleiseg.evaluation.summary import evaluate_run, print_cv_report
    from nucleiseg.inference.ensemble import write_out_of_fold
    from nucleiseg.inference.predictor import fast_preset_models, load_fold_models

    device = inputs.device
    models = [member for run in inputs.runs for member in load_fold_models(run, device)]
    folds = {m.fold for m in models}
    outputs = _side_outputs(args)
    if args.fast:
        models = [fast_preset_models([m for m in models if m.fold == k])[0] for k in sorted(folds)]
    log.info("%d fold models", len(models))
    images = {i: p for i, p in inputs.images.items() if inputs.fold_of[i] in folds}
    results = write_out_of_fold(
        models,
        images,
        inputs.fold_of,
        inputs.params,
        device,
        args.out_dir,
        inputs.data_dir,
        inputs.settings.options,
        outputs,
    )
    for fold, (labels, seconds) in results.items():
        shapes = {reading.image_size(images[i]) for i in labels}
        print(f"fold {fold}: {_summary(labels, seconds, shapes)}")
    per_image = evaluate_run(args.out_dir, inputs.data_dir, args.folds_csv)
    cv = print_cv_report(per_image)
    if outputs.failure:
        cli.refuse([outputs.failure], status=cli.FAILURE_STATUS)
    return cv


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
