"""Peak memory and time per megapixel of whole-slide segmentation, against a 1 MP image.

    python benchmarks/bench_whole_slide.py                # a 20000 x 20000 slide (400 MP)
    OMP_NUM_THREADS=1 python benchmarks/bench_whole_slide.py --side 4000 --block 2048
    python benchmarks/bench_whole_slide.py --side 14000 --machinery  # no model: the rest alone

A synthetic tiled TIFF of ``--side`` pixels a side (bright discs of radius 6-13 px
on a jittered grid, fluorescence-like) is written tile by tile, never whole in
memory. Two child processes, each with the ``--fast`` model of ``--weights``,
report their peak resident memory and seconds: the *reference* segments the
slide's top-left 1000 x 1000 window in memory (``Segmenter.segment``), the
*slide* streams the whole slide block by block into a tiled label TIFF
(``Segmenter.segment_slide``). The last lines are the ratios slide / reference
of the seconds per megapixel and of the peak memory: the first stays near the
blocks' margin overhead, the second near 1 whatever the side.

``--machinery`` puts a threshold (pixels brighter than the discs' floor, then
connected components) in the model's place in both children, so the times are
those of everything around the model: reading windows, keeping the nuclei whose
centre a core holds, assembling the cores and writing the label tiles. Their
seconds per megapixel should not grow with the side.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from skimage.draw import disk
from skimage.measure import label

from nucleiseg.inference.options import DEFAULT_BLOCK, DEFAULT_MARGIN

REFERENCE_SIDE = 1000
INPUT_TILE = 512
SPACING = 40  # px between disc centres
DISC_FLOOR = 100  # grey level between the background (20-31) and the discs (150-241)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=20000, help="slide side in pixels")
    parser.add_argument("--block", type=int, default=DEFAULT_BLOCK)
    parser.add_argument("--margin", type=int, default=DEFAULT_MARGIN)
    parser.add_argument("--weights", type=Path, default=Path("weights"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--machinery", action="store_true", help="a threshold in the model's place (see above)"
    )
    parser.add_argument("--child", choices=["reference", "slide"], help=argparse.SUPPRESS)
    parser.add_argument("--slide", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser


def synthetic_tile(y0: int, x0: int, side: int) -> np.ndarray:
    """The grey uint8 tile at (y0, x0) of the synthetic slide: discs on a jittered grid, the
    same disc whichever tile draws it."""
    rows, columns = min(INPUT_TILE, side - y0), min(INPUT_TILE, side - x0)
    tile = np.full((INPUT_TILE, INPUT_TILE), 20, np.uint8)
    reach = 13 + SPACING
    for gy in range((y0 - reach) // SPACING, (y0 + rows + reach) // SPACING + 1):
        for gx in range((x0 - reach) // SPACING, (x0 + columns + reach) // SPACING + 1):
            code = (gy * 7919 + gx * 104729) & 0xFFFF
            centre = (gy * SPACING + code % 17 - 8 - y0, gx * SPACING + code // 17 % 17 - 8 - x0)
            tile[disk(centre, 6 + code % 8, shape=(rows, columns))] = 150 + code % 80
    noise = np.random.default_rng(y0 * side + x0).integers(0, 12, tile.shape, np.uint8)
    return tile + noise


def write_slide(path: Path, side: int) -> None:
    """The synthetic slide as a tiled, deflated grey TIFF, written tile by tile."""

    def tiles() -> Iterator[np.ndarray]:
        for y0 in range(0, side, INPUT_TILE):
            for x0 in range(0, side, INPUT_TILE):
                yield synthetic_tile(y0, x0, side)

    tifffile.imwrite(
        path,
        tiles(),
        shape=(side, side),
        dtype=np.uint8,
        tile=(INPUT_TILE, INPUT_TILE),
        compression="zlib",
        bigtiff=side * side >= 2**31,
    )


def threshold_segment(image: np.ndarray) -> np.ndarray:
    """The synthetic discs found without a model: brighter than the background's noise."""
    return label(image[..., 0] > DISC_FLOOR).astype(np.int32)


def child(args: argparse.Namespace) -> None:
    from nucleiseg.data.slide_files import SlideReader
    from nucleiseg.inference.slide import segment_slide

    if args.machinery:
        segment = threshold_segment
    else:
        import nucleiseg

        segment = nucleiseg.load(args.weights, device=args.device, fast=True).segment
    if args.child == "reference":
        with SlideReader(args.slide) as reader:
            image = reader.window(0, 0, REFERENCE_SIDE, REFERENCE_SIDE)
        segment(image)  # warm-up, not counted
        started = time.perf_counter()
        nuclei = int(segment(image).max())
        seconds, megapixels = time.perf_counter() - started, REFERENCE_SIDE**2 / 1e6
    else:
        started = time.perf_counter()
        result = segment_slide(
            args.slide, args.out.with_suffix(".tif"), segment, block=args.block, margin=args.margin
        )
        seconds, megapixels = time.perf_counter() - started, args.side**2 / 1e6
        nuclei = result.nuclei
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {"peak_mb": peak_mb, "seconds": seconds, "megapixels": megapixels, "nuclei": nuclei}
    args.out.write_text(json.dumps(report))


def run_child(mode: str, args: argparse.Namespace, folder: Path, slide: Path) -> dict:
    out = folder / f"{mode}.json"
    command = [sys.executable, __file__, "--child", mode, "--slide", str(slide), "--out", str(out)]
    command += ["--side", str(args.side), "--block", str(args.block), "--margin", str(args.margin)]
    command += ["--weights", str(args.weights), "--device", args.device]
    command += ["--machinery"] if args.machinery else []
    finished = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if finished.returncode != 0:
        return {
            "error": finished.stderr.strip().splitlines()[-1:] or [f"exit {finished.returncode}"]
        }
    return json.loads(out.read_text())


def main(args: argparse.Namespace) -> None:
    if args.child:
        child(args)
        return
    import torch

    segmenter = "a threshold (--machinery)" if args.machinery else f"--fast model of {args.weights}"
    print(
        f"whole slide {args.side}x{args.side} ({args.side**2 / 1e6:.0f} MP), block {args.block}, "
        f"margin {args.margin}, {segmenter} on {args.device}, {torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as folder:
        slide = Path(folder) / "slide.tif"
        started = time.perf_counter()
        write_slide(slide, args.side)
        size_mb = slide.stat().st_size / 2**20
        print(
            f"synthetic slide written in {time.perf_counter() - started:.0f} s ({size_mb:.0f} MB)"
        )
        results = {
            mode: run_child(mode, args, Path(folder), slide) for mode in ("reference", "slide")
        }
    for mode, result in results.items():
        if "error" in result:
            print(f"{mode:9s} failed: {result['error']}")
            continue
        per_mp = result["seconds"] / result["megapixels"]
        print(
            f"{mode:9s} {result['megapixels']:7.1f} MP  {result['nuclei']:8d} nuclei  "
            f"{result['seconds']:8.1f} s  {per_mp:6.2f} s/MP  peak {result['peak_mb']:6.0f} MB"
        )
    reference, streamed = results["reference"], results["slide"]
    if "error" in reference or "error" in streamed:
        return
    time_ratio = (streamed["seconds"] / streamed["megapixels"]) / (
        reference["seconds"] / reference["megapixels"]
    )
    print(f"time_per_mp_ratio_slide_vs_1mp: {time_ratio:.2f}")
    print(f"peak_memory_ratio_slide_vs_1mp: {streamed['peak_mb'] / reference['peak_mb']:.2f}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
