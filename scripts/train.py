"""Train a model family on K folds, saving checkpoints, per-epoch CSVs and out-of-fold predictions.

    python scripts/train.py --model unetpp --fold 0
    python scripts/train.py --model unetpp --fold all --data-dir ../shared/data/dsb2018
    python scripts/train.py --model unetpp --fold 0 --resume          # continue an interrupted run
    python scripts/train.py --config configs/unetpp_sample.yaml --fold 0,1 --device auto
    torchrun --nproc-per-node 4 scripts/train.py --model unetpp --fold 0 --device cuda

Each fold writes to ``<out-dir>/fold<K>/`` (default ``runs/<experiment>/fold<K>/``):
config.yaml, run.yaml, split.csv, epochs.csv, last.ckpt, best.ckpt, weights_fp16.pt and
oof/ (see ``nucleiseg.inference.oof``). Score the out-of-fold predictions with
``scripts/evaluate_oof.py runs/<experiment>``.

Started by ``torchrun --nproc-per-node N``, the N processes train each fold
together with DistributedDataParallel (NCCL, one GPU each, with
``--device cuda``; gloo on CPU), sharing every batch of ``batch_size`` crops;
rank 0 alone validates and writes, and ``--resume`` works as in one process
(see ``nucleiseg.training.distributed``).

The configuration, the run folder, the dataset's images (headers) and labels,
the folds file and the weights to start from are checked before any image is
read or model built, and with ``--resume`` that each fold goes on with the
settings and the folds it was started with (its config.yaml and split.csv;
only ``--epochs`` and ``num_workers`` may change); each problem is printed on
its own ``error:`` line and the exit status is 2.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from nucleiseg import cli
from nucleiseg.data import reading

log = logging.getLogger("train")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", choices=cli.MODEL_FAMILIES, help="model family (default: the config's, unetpp)"
    )
    parser.add_argument("--fold", default="0", help="fold number, comma-separated list, or all")
    parser.add_argument("--config", type=Path, help="YAML file overriding the defaults")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=reading.SAMPLE_DIR,
        help="dataset root holding stage1_train/ (default: the bundled sample)",
    )
    parser.add_argument("--folds-csv", type=Path, default=Path("folds/folds.csv"))
    parser.add_argument("--out-dir", type=Path, help="run folder (default: runs/<experiment>)")
    parser.add_argument("--experiment", help="run name (default: the config's)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--encoder", help="smp encoder name, e.g. tu-efficientnet_b0, resnet34")
    parser.add_argument("--encoder-weights", help="pretrained encoder weights, e.g. imagenet")
    parser.add_argument(
        "--init-from",
        help="local checkpoint to start the model from; {fold} in it stands for each fold",
    )
    cli.add_device_argument(parser)
    parser.add_argument("--resume", action="store_true", help="continue from last.ckpt")
    return parser


def main(args: argparse.Namespace) -> None:
    from nucleiseg.atomic import WriteError
    from nucleiseg.inference.predictor import resolve_device
    from nucleiseg.models.config import load_config
    from nucleiseg.models.runs import read_yaml
    from nucleiseg.training.checks import training_problems
    from nucleiseg.training.distributed import launch
    from nucleiseg.training.engine import train_folds

    with cli.refusing(reading.DataError, ValueError, RuntimeError):
        if args.config is not None:
            read_yaml(args.config)
        config = load_config(
            args.config,
            {
                "model": args.model,
                "experiment": args.experiment,
                "epochs": args.epochs,
                "seed": args.seed,
                "encoder": args.encoder,
                "encoder_weights": args.encoder_weights,
                "init_from": args.init_from,
            },
        )
        device = resolve_device(args.device)
    run_dir = args.out_dir or Path("runs") / config.experiment
    cli.refuse_if(
        training_problems(config, args.data_dir, args.folds_csv, args.fold, run_dir, args.resume)
    )
    with (
        cli.refusing(reading.DataError),
        cli.refusing(WriteError, status=cli.FAILURE_STATUS),
        launch(device) as device,
    ):
        train_folds(config, args.data_dir, args.folds_csv, args.fold, run_dir, device, args.resume)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    main(get_args_parser().parse_args())
