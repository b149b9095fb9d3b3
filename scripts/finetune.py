"""Fine-tune a trained model on your own labelled images and export a bundle predict.py uses.

    python scripts/finetune.py --images my_nuclei --out-dir runs/finetune_my_nuclei
    python scripts/finetune.py --images ../shared/data/monuseg/train \
        --from runs/unetpp_effb0_generalized/fold0 --out-dir runs/finetune_monuseg
    python scripts/finetune.py --images my_nuclei --from weights --family maskrcnn \
        --out-dir runs/finetune_my_nuclei_maskrcnn
    python scripts/finetune.py --images my_nuclei --out-dir runs/finetune_my_nuclei --resume
    python scripts/predict.py --weights runs/finetune_my_nuclei/bundle --images new_images \
        --out predictions/new.csv --save-labels predictions/labels

``--images`` holds ``images/<name>.png`` (or .tif) and ``labels/<name>.png``:
one label image per image, 0 = background and one value per nucleus (16-bit
PNG or TIFF). ``--from`` is a bundle (default: the reference one, ``weights/``;
its U-Net++ unless ``--family``), a run folder or a fold folder; ``--fold``
picks its fold model (default: the lowest). Fold 0 of the images (one in five)
is held out to validate on and to re-tune the thresholds on; with fewer than
5 images, every image is validated by a model that did not train on it (one
model per image, all in the bundle). Training images larger than 512 px are cut into
tiles. The settings are ``nucleiseg.training.finetune.FinetuneConfig`` (fine-tuning
values: 8 epochs of 192 crops at a learning rate of 5e-4), overridden by
``--config FILE.yaml`` and then by ``--epochs``, ``--lr`` and ``--seed``.
``--scratch`` trains the same architecture from random weights instead.

Writes ``<out-dir>/``: folds.csv, fold<K>/ (as scripts/train.py: config.yaml,
run.yaml, epochs.csv, checkpoints, weights, oof/ with the validation images'
labels and probabilities), postprocess.yaml (the re-tuned thresholds),
postprocess_search.csv, finetune.yaml (settings and scores), and the bundle
(``--bundle``, default ``<out-dir>/bundle``). The outputs, the start model and
every image and label image are checked before any model loads: each problem
is one ``error:`` line naming its file, and the exit status is 2; warnings
name label images that are binary masks (touching nuclei become one) or hold
no nucleus.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from nucleiseg import cli
from nucleiseg.data import reading

log = logging.getLogger("finetune")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--images", type=Path, required=True, help="labelled folder: images/ + labels/"
    )
    parser.add_argument(
        "--from",
        dest="start",
        type=Path,
        default=cli.WEIGHTS_DIR,
        help="bundle, run or fold folder to start from (default: the reference bundle)",
    )
    parser.add_argument("--family", choices=cli.MODEL_FAMILIES, help="family of the start model")
    parser.add_argument("--fold", type=int, help="fold model to start from (default: the lowest)")
    parser.add_argument("--scratch", action="store_true", help="random weights, same architecture")
    parser.add_argument("--config", type=Path, help="YAML file overriding the fine-tune settings")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--seed", type=int, help="seed of the folds, weights and crops")
    parser.add_argument("--out-dir", type=Path, help="run folder (default: runs/finetune_<name>)")
    parser.add_argument("--bundle", type=Path, help="bundle to write (default: <out-dir>/bundle)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted fine-tune")
    cli.add_device_argument(parser)
    return parser


def main(args: argparse.Namespace):
    from nucleiseg.atomic import WriteError
    from nucleiseg.inference.predictor import resolve_device
    from nucleiseg.training.finetune import load_finetune_config, plan_finetune, run_finetune

    out_dir = args.out_dir or Path("runs") / f"finetune_{args.images.resolve().name}"
    with cli.refusing(reading.DataError, ValueError, RuntimeError):
        settings = load_finetune_config(
            args.config, {"train": {"epochs": args.epochs, "lr": args.lr, "seed": args.seed}}
        )
        device = resolve_device(args.device)
    with cli.refusing(reading.DataError, ValueError):
        plan, problems = plan_finetune(
            args.images,
            args.start,
            settings,
            out_dir,
            args.bundle,
            family=args.family,
            fold=args.fold,
            scratch=args.scratch,
            resume=args.resume,
        )
    cli.refuse_if(problems)
    origin = "random weights" if args.scratch else str(plan.start.weights)
    log.info(
        "%d images, fold(s) %s trained; %s from %s",
        len(plan.samples),
        ",".join(map(str, plan.trained_folds)),
        plan.config.model,
        origin,
    )
    command = "python scripts/finetune.py " + shlex.join(sys.argv[1:])
    with cli.refusing(reading.DataError), cli.refusing(WriteError, status=cli.FAILURE_STATUS):
        result = run_finetune(plan, device, resume=args.resume, note=command)
    for fold in result.folds:
        print(
            f"fold {fold.fold}: {fold.train_images} training images ({fold.train_tiles} tiles), "
            f"{fold.val_images} validation; loss {fold.start_val_loss:.4f} -> {fold.val_loss:.4f}, "
            f"mean AP {fold.start_val_map:.4f} -> {fold.val_map:.4f} (start model -> fine-tuned), "
            f"{fold.train_minutes:.1f} min"
        )
    print(
        f"validation mean AP: start model {result.start_val_map:.4f}, fine-tuned "
        f"{result.val_map:.4f}, with re-tuned thresholds {result.val_map_tuned:.4f} "
        f"(chosen on these images) in {result.minutes:.1f} min"
    )
    print(f"bundle: {result.bundle_dir}; predict with")
    print(
        f"  python scripts/predict.py --weights {result.bundle_dir} --images DIR --out OUT.csv "
        "--save-labels LABELS_DIR"
    )
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    main(get_args_parser().parse_args())
