"""Peak memory and time of U-Net++ inference on a large image: whole against tiled.

    python benchmarks/bench_tiling_memory.py
    python benchmarks/bench_tiling_memory.py --size 4000 --tile 512 --overlap 64 --bf16

Each mode runs in its own child process (so that one's peak cannot hide the
other's) on the same random image of ``--size`` x ``--size`` pixels with the
default U-Net++ (weights do not change memory or time). The child reports its
peak resident memory and the seconds of the prediction; the parent prints both
modes, the ratio whole / tiled, and checks that the two outputs agree away from
tile seams. The last line is the memory ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nucleiseg.inference.predictor import InferenceOptions, predict_probabilities
from nucleiseg.models.build import build_model
from nucleiseg.models.config import TrainConfig


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4000)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast in both modes")
    parser.add_argument("--child", choices=["whole", "tiled"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser


def child(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = build_model(TrainConfig()).eval()
    image = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    tile = args.tile if args.child == "tiled" else None
    # Whole means one pass, however large: no tiles for the memory budget.
    options = InferenceOptions(tile=tile, overlap=args.overlap, max_memory=math.inf)
    started = time.perf_counter()
    maps = predict_probabilities(model, image, torch.device("cpu"), args.bf16, options)
    seconds = time.perf_counter() - started
    np.save(args.out.with_suffix(".npy"), maps[0].astype(np.float16))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args.out.write_text(json.dumps({"peak_mb": peak_mb, "seconds": seconds}))


def run_child(mode: str, args: argparse.Namespace, folder: Path) -> dict:
    out = folder / f"{mode}.json"
    command = [sys.executable, __file__, "--child", mode, "--out", str(out)]
    command += ["--size", str(args.size), "--tile", str(args.tile), "--overlap", str(args.overlap)]
    command += ["--bf16"] if args.bf16 else []
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        return {
            "error": finished.stderr.strip().splitlines()[-1:] or [f"exit {finished.returncode}"]
        }
    result = json.loads(out.read_text())
    result["body"] = np.load(out.with_suffix(".npy")).astype(np.float32)
    return result


def main(args: argparse.Namespace) -> None:
    if args.child:
        child(args)
        return
    print(
        f"U-Net++ tu-efficientnet_b0, {args.size}x{args.size} image, tile {args.tile}, "
        f"overlap {args.overlap}, {'bfloat16' if args.bf16 else 'float32'}, "
        f"{torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as folder:
        results = {mode: run_child(mode, args, Path(folder)) for mode in ("whole", "tiled")}
    for mode, result in results.items():
        if "error" in result:
            print(f"{mode:6s} failed: {result['error']}")
        else:
            print(f"{mode:6s} peak {result['peak_mb']:9.0f} MB  {result['seconds']:7.1f} s")
    whole, tiled = results["whole"], results["tiled"]
    if "error" in whole or "error" in tiled:
        return
    difference = np.abs(whole["body"] - tiled["body"])[8:-8, 8:-8]
    mean, worst = difference.mean(), difference.max()
    print(f"body probability |whole - tiled|: mean {mean:.2e}, max {worst:.3f}")
    print(f"time whole / tiled: {whole['seconds'] / tiled['seconds']:.2f}")
    print(f"memory_ratio_whole_vs_tiled: {whole['peak_mb'] / tiled['peak_mb']:.2f}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
