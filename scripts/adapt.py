"""Adapt a trained model to a folder of unlabelled images, and export a bundle predict.py uses.

    python scripts/adapt.py --images ../shared/data/bitdepth/test/images \
        --from runs/unetpp_effb0_stainonly_ft_bitdepth/fold0 --out-dir runs/adapt_bitdepth
    python scripts/adapt.py --images ../shared/data/dsb2018/stage1_test --out-dir runs/adapt_stage1
    python scripts/adapt.py --images ../shared/data/dsb2018/stage1_test --adapt-bn-only \
        --out-dir runs/adapt_bn_stage1
    python scripts/predict.py --weights runs/adapt_bitdepth/bundle --images DIR --out OUT.csv

``--images`` holds the target images (any folder predict.py reads; no labels).
``--from`` is a bundle (default: the reference one, ``weights/``), a run folder
or a fold folder. By default every U-Net++ fold model is self-trained: the
start ensemble (every fold model, every test-time view) predicts the images,
only the nuclei most voters find with a high body probability become
pseudo-labels and the pixels it is unsure of stay unknown (left out of the
loss); each fold model then trains from its own weights, a few epochs at a
low learning rate, on the images it trained on (its ``run.yaml`` dataset and
external sources, outside its fold; ``--data-dir``, ``--folds-csv``) with a
fixed share of every batch (``--share``) of pseudo-labelled crops, and is
validated on its fold. ``--rounds 2`` pseudo-labels again with the adapted
models and trains on. A bundle's Mask R-CNN members are kept as they are.
``--adapt-bn-only`` trains nothing: every fold model of both families
re-estimates its BatchNorm statistics over the images.

The settings are ``nucleiseg.training.adapt.AdaptConfig``, overridden by
``--config FILE.yaml`` and then by the flags. The pseudo-labelling views are
the bundle's (``--tta``, ``--scales`` and the other inference flags override them).

Writes ``<out-dir>/``: round<R>/pseudo_labels/ (labels/, unknown/ and
pseudo_labels.csv: nuclei kept and dropped, unknown pixel share), round<R>/<run>_adapted/
fold<K>/ (as scripts/train.py writes a fold; ``batchnorm/`` with
``--adapt-bn-only``), adapt.yaml (settings, counts, scores), and the bundle
(``--bundle``, default ``<out-dir>/bundle``), whose manifest has an
``adaptation`` section with the source folder, image count and every setting.
The output folder must be new or empty; it, the images, the start model and
its training data are checked before any model loads: each problem is one
``error:`` line, and the exit status is 2.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from nucleiseg import cli
from nucleiseg.data import reading
from nucleiseg.inference.options import add_option_arguments, given_options

log = logging.getLogger("adapt")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of unlabelled images")
    parser.add_argument(
        "--from",
        dest="start",
        type=Path,
        default=cli.WEIGHTS_DIR,
        help="bundle, run or fold folder to start from (default: the reference bundle)",
    )
    parser.add_argument("--family", choices=cli.MODEL_FAMILIES, help="adapt only this family")
    parser.add_argument("--out-dir", type=Path, required=True, help="new or empty folder")
    parser.add_argument("--bundle", type=Path, help="bundle to write (default: <out-dir>/bundle)")
    parser.add_argument("--config", type=Path, help="YAML file overriding the adaptation settings")
    parser.add_argument(
        "--adapt-bn-only",
        action="store_true",
        help="no training: re-estimate every model's BatchNorm statistics on the images",
    )
    parser.add_argument("--rounds", type=int, choices=(1, 2), help="pseudo-label rounds")
    parser.add_argument("--share", type=float, help="share of every batch of pseudo-labelled crops")
    parser.add_argument("--agreement", type=float, help="share of voters that must find a nucleus")
    parser.add_argument("--min-body", type=float, help="mean body probability of a kept nucleus")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--seed", type=int, help="seed of the crops")
    parser.add_argument("--data-dir", type=Path, help="dataset the start models trained on")
    parser.add_argument("--folds-csv", type=Path, help="their folds file")
    add_option_arguments(parser)
    cli.add_device_argument(parser)
    return parser


def main(args: argparse.Namespace):
    from nucleiseg.atomic import WriteError
    from nucleiseg.inference.predictor import resolve_device
    from nucleiseg.locks import FolderInUse
    from nucleiseg.training.adapt import load_adapt_config, plan_adaptation, run_adaptation

    overrides = {
        "batchnorm_only": args.adapt_bn_only or None,
        "rounds": args.rounds,
        "share": args.share,
        "pseudo": {"agreement": args.agreement, "min_body": args.min_body},
        "train": {"epochs": args.epochs, "lr": args.lr, "seed": args.seed},
    }
    with cli.refusing(reading.DataError, ValueError, RuntimeError):
        settings = load_adapt_config(args.config, overrides)
        device = resolve_device(args.device)
        plan, problems = plan_adaptation(
            args.images,
            args.start,
            settings,
            args.out_dir,
            args.bundle,
            family=args.family,
            data_dir=args.data_dir,
            folds_csv=args.folds_csv,
            options=given_options(args),
        )
    cli.refuse_if(problems)
    log.info(
        "%d target images; adapting %s; %s",
        len(plan.images),
        ", ".join(f"{f.run.name} fold {f.fold}" for f in plan.folds),
        "BatchNorm statistics only" if settings.batchnorm_only else f"{settings.rounds} round(s)",
    )
    command = "python scripts/adapt.py " + shlex.join(sys.argv[1:])
    with (
        cli.refusing(reading.DataError, ValueError),
        cli.refusing(WriteError, FolderInUse, status=cli.FAILURE_STATUS),
    ):
        result = run_adaptation(plan, device, note=command)
    for counts in result.pseudo:
        print(
            f"round {counts['round']}: {counts['kept']} of {counts['nuclei']} nuclei kept as "
            f"pseudo-labels in {counts['images_trained']} of {counts['images']} images, "
            f"{counts['unknown_share']:.1%} of pixels unknown"
        )
    for fold in result.folds:
        print(
            f"{fold['run']} fold {fold['fold']}: source validation loss {fold['val_loss']:.4f}, "
            f"mean AP {fold['val_map']:.4f}, {fold['minutes']:.1f} min"
        )
    print(f"bundle: {result.bundle_dir} ({result.minutes:.1f} min); predict with")
    print(f"  python scripts/predict.py --weights {result.bundle_dir} --images DIR --out OUT.csv")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    main(get_args_parser().parse_args())
