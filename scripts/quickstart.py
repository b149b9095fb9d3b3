"""The README's main job: a quick U-Net++ run on the bundled sample, end to end.

    python scripts/quickstart.py

Trains two folds of ``configs/unetpp_sample.yaml`` on ``data/sample`` (resuming
them if an earlier run was interrupted), scores their out-of-fold predictions
with the competition metric, segments the sample's test images with both fold
models and writes a validated submission to ``submissions/sample_unetpp.csv``.
A few minutes on 2 CPU cores; the model is far from converged: the run shows
the pipeline, the full-data folds (``scripts/train.py --fold all``) give the
real scores.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from nucleiseg import data
from nucleiseg.config import load_config
from nucleiseg.engine import train_folds
from nucleiseg.ensemble import segment_images
from nucleiseg.evaluation import evaluate_run, fold_table, modality_table
from nucleiseg.family import load_params
from nucleiseg.folds import DEFAULT_FOLDS_PATH
from nucleiseg.inference import load_fold_models, resolve_device
from nucleiseg.submission import write_submission

log = logging.getLogger("quickstart")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/unetpp_sample.yaml"))
    parser.add_argument("--data-dir", type=Path, default=data.SAMPLE_DIR)
    parser.add_argument("--folds", default="0,1", help="folds to train (default: 0,1)")
    parser.add_argument("--out", type=Path, default=Path("submissions/sample_unetpp.csv"))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return parser


def main(args: argparse.Namespace) -> float:
    config = load_config(args.config)
    device = resolve_device(args.device)
    run_dir = Path("runs") / config.experiment
    train_folds(config, args.data_dir, DEFAULT_FOLDS_PATH, args.folds, run_dir, device, resume=True)

    per_image = evaluate_run(run_dir, args.data_dir, DEFAULT_FOLDS_PATH)
    print(fold_table(per_image).to_string(float_format="%.4f"))
    print(modality_table(per_image).to_string(float_format="%.4f"))

    models = load_fold_models(run_dir, device)
    test_images = data.find_images(args.data_dir / data.TEST_STAGE)
    params = {config.model: load_params(run_dir)}
    labels = segment_images(models, test_images, params, device)
    write_submission(labels, args.out)
    print(f"wrote {args.out} ({len(labels)} images)")
    score = float(per_image["score"].mean())
    print(f"oof mean AP: {score:.4f}")
    return score


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    main(get_args_parser().parse_args())
