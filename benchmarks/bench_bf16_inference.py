"""Does bfloat16 autocast change a trained fold's predictions? Accuracy and speed against float32.

    python benchmarks/bench_bf16_inference.py runs/unetpp_effb0/fold0 \
        --data-dir ../shared/data/dsb2018

Predicts the fold's validation images (its out-of-fold set) once in float32 and
once with bfloat16 autocast, in the same process, and prints the mean AP of
each after the same postprocessing, the largest and mean absolute probability
difference, and seconds per image. The last line is the bf16/fp32 speed ratio.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from nucleiseg.competition.metric import average_precision
from nucleiseg.data import reading
from nucleiseg.data.label_files import label_files
from nucleiseg.data.modality import classify_modality
from nucleiseg.inference import oof
from nucleiseg.inference.family import for_modality, load_params
from nucleiseg.inference.predictor import load_fold_models, predict_probabilities
from nucleiseg.postprocessing.watershed import instances_from_probabilities


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fold_dir", type=Path, help="a finished fold folder")
    parser.add_argument("--data-dir", type=Path, default=reading.SAMPLE_DIR)
    parser.add_argument("--limit", type=int, help="use only the first N validation images")
    return parser


def main(args: argparse.Namespace) -> None:
    device = torch.device("cpu")
    (member,) = load_fold_models(args.fold_dir, device)
    params = load_params(args.fold_dir.parent)
    images = reading.find_images(args.data_dir / reading.TRAIN_STAGE)
    ids = list(label_files(args.fold_dir / oof.OOF_DIR / oof.LABELS_DIR))
    ids = ids[: args.limit] if args.limit else ids
    scores = {False: [], True: []}
    seconds = {False: 0.0, True: 0.0}
    max_diff, mean_diff = 0.0, []
    for image_id in ids:
        sample = reading.load_sample(image_id, images[image_id])
        own = for_modality(params, classify_modality(sample.image))
        maps = {}
        for bf16 in (False, True):
            started = time.perf_counter()
            maps[bf16] = predict_probabilities(member.model, sample.image, device, amp=bf16)
            seconds[bf16] += time.perf_counter() - started
            labels = instances_from_probabilities(maps[bf16], own)
            scores[bf16].append(average_precision(sample.labels, labels).score)
        diff = np.abs(maps[True] - maps[False])
        max_diff = max(max_diff, float(diff.max()))
        mean_diff.append(float(diff.mean()))
    n = len(ids)
    print(f"{n} images of {args.fold_dir}")
    print(f"float32:  mean AP {np.mean(scores[False]):.4f}, {seconds[False] / n:.3f} s/image")
    print(f"bfloat16: mean AP {np.mean(scores[True]):.4f}, {seconds[True] / n:.3f} s/image")
    print(f"probability difference: max {max_diff:.4f}, mean {np.mean(mean_diff):.5f}")
    print(f"bf16_inference_speedup: {seconds[False] / seconds[True]:.2f}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
