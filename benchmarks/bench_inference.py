"""Inference cost per megapixel, whole against tiled, for the reference bundle and for one fold.

    python benchmarks/bench_inference.py
    python benchmarks/bench_inference.py --sizes 1 --modes whole,tiled --sets bundle
    python benchmarks/bench_inference.py --results benchmarks/results/inference.jsonl

A test image (default: a 1000 x 1000 MoNuSeg H&E tile) is mirrored into square
images of 0.25, 1, 4 and 16 megapixels, and each is segmented by ``bundle`` (the
reference ensemble of ``weights/`` with its manifest's options, e.g. U-Net++ and
Mask R-CNN fold models and flip views) and by ``fast`` (``predict.py --fast``:
the first U-Net++ fold alone, no test-time views), in three modes: ``whole``
(one pass per view, whatever the memory), ``tiled`` (``--tile``, default 512,
with the default overlap) and ``default`` (the command as it ships: whole unless
a pass would exceed ``max_memory``, then tiles chosen to fit it). Each run is a
child process, so that its peak resident memory is its own; it reports wall and
CPU seconds (the process's, every thread's), the same two spent inside the
networks' modules (forward hooks on the U-Net++ and on the Mask R-CNN's stages),
its peak memory and the nuclei found. The parent prints one row per run, in CPU
seconds (``--clock cpu``, the default, fairer on a machine other work shares;
run with ``OMP_NUM_THREADS=1`` there) or wall seconds: seconds, seconds per
megapixel, the ratio to the whole image of the same size and models, the share
of the time outside the networks, peak memory, nuclei, and the mean AP of the
run's nuclei scored against the whole image's (1.0: the same nuclei). Whole
images above ``--whole-max-mp`` are skipped (a 16 MP whole-image pass of the
bundle needs about 10 GB).

With ``--results FILE``, each run is appended to FILE as one JSON line and
runs already there are not repeated, so a long benchmark can be resumed;
their label images are kept beside it. The last lines give the targets of the
tiling work: tiled / whole at 1 MP, the largest share outside the networks,
and the 16 MP default run against 16 x the 1 MP whole-image time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_IMAGE = Path("../shared/data/monuseg/test/images/TCGA-2Z-A9J9-01A-01-TS1.png")
SETS = ("bundle", "fast")
MODES = ("whole", "tiled", "default")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="RGB image to mirror")
    parser.add_argument("--weights", type=Path, default=Path("weights"), help="the bundle")
    parser.add_argument("--sizes", default="0.25,1,4,16", help="megapixels, comma-separated")
    parser.add_argument("--sets", default=",".join(SETS), help="bundle and/or fast")
    parser.add_argument("--modes", default=",".join(MODES), help="whole, tiled and/or default")
    parser.add_argument("--tile", type=int, default=512, help="tile side of the tiled mode")
    parser.add_argument("--whole-max-mp", type=float, default=4.0, help="largest whole image")
    parser.add_argument("--results", type=Path, help="JSON lines file to append to and resume")
    parser.add_argument(
        "--clock", choices=["cpu", "wall"], default="cpu", help="seconds the table reports"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="print the table of --results, run nothing"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def mirrored(image: np.ndarray, megapixels: float) -> np.ndarray:
    """A square image of about ``megapixels`` (side a multiple of 8) of mirrored copies."""
    side = int(round(np.sqrt(megapixels * 1e6) / 8)) * 8
    reps = -(-side // min(image.shape[:2]))
    tile = np.concatenate([image, image[::-1]], axis=0)
    tile = np.concatenate([tile, tile[:, ::-1]], axis=1)
    big = np.tile(tile, (-(-reps // 2), -(-reps // 2), 1))
    return np.ascontiguousarray(big[:side, :side])


def _network_modules(model) -> list:
    """The modules whose forward passes are the network's work (none nested in another)."""
    if hasattr(model, "roi_heads"):  # Mask R-CNN: its stages, as NucleusMaskRCNN.detect calls them
        return [model.transform, model.backbone, model.rpn, *model.roi_heads.children()]
    return [model]


def _clocks() -> np.ndarray:
    """Wall seconds and the process's CPU seconds (every thread's)."""
    return np.array([time.perf_counter(), time.process_time()])


def _timed(models) -> np.ndarray:
    """Forward hooks adding each pass's wall and CPU seconds to the returned pair."""
    spent, started = np.zeros(2), {}

    def before(module, _):
        started[module] = _clocks()

    def after(module, _, __):
        spent[:] += _clocks() - started.pop(module)

    for member in models:
        for module in _network_modules(member.model):
            module.register_forward_pre_hook(before)
            module.register_forward_hook(after)
    return spent


def child(args: argparse.Namespace) -> None:
    import torch

    from nucleiseg.data.reading import read_image
    from nucleiseg.inference.ensemble import segment_image
    from nucleiseg.inference.family import params_by_family
    from nucleiseg.inference.options import FAST_VIEWS
    from nucleiseg.inference.predictor import fast_preset_models, load_fold_models, with_options
    from nucleiseg.training.reference import inference_options, verify

    job = json.loads(args.child)
    device = torch.device("cpu")
    runs = verify(args.weights)
    models = [m for run in runs for m in load_fold_models(run, device)]
    options = inference_options(args.weights)
    if job["set"] == "fast":
        models = fast_preset_models(models)
        options = with_options(options, FAST_VIEWS)
    if job["mode"] == "whole":
        options = with_options(options, {"max_memory": float("inf")})
    elif job["mode"] == "tiled":
        options = with_options(options, {"tile": args.tile})
    image = mirrored(read_image(args.image), job["mp"])
    params = params_by_family(runs)
    network = _timed(models)
    started = _clocks()
    labels = segment_image(models, image, params, device, options)
    seconds, cpu_seconds = _clocks() - started
    np.save(job["labels"], labels)
    result = {
        "pixels": int(labels.size),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "network_seconds": network[0],
        "network_cpu_seconds": network[1],
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "nuclei": int(len(np.unique(labels)) - 1),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


def _run(args: argparse.Namespace, job: dict) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps(job)]
    command += ["--image", str(args.image), "--weights", str(args.weights)]
    command += ["--tile", str(args.tile)]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        lines = finished.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {finished.returncode}"}
    return json.loads(finished.stdout.strip().splitlines()[-1])


def _load(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {(r["set"], r["mp"], r["mode"]): r for r in rows}


def _agreement(folder: Path, row: dict, whole: dict | None) -> str:
    from nucleiseg.competition.metric import average_precision

    if whole is None or "error" in whole or "error" in row:
        return "n/a"
    if row is whole:
        return "1"
    truth = np.load(folder / whole["labels_file"])
    return f"{average_precision(truth, np.load(folder / row['labels_file'])).score:.4f}"


def main(args: argparse.Namespace) -> None:
    if args.child:
        child(args)
        return
    sizes = [float(s) for s in args.sizes.split(",")]
    sets, modes = args.sets.split(","), args.modes.split(",")
    folder = args.results.parent if args.results else Path(tempfile.mkdtemp(prefix="bench_"))
    folder.mkdir(parents=True, exist_ok=True)
    done = _load(args.results)
    for name in sets:
        for mp in sizes:
            for mode in modes:
                key = (name, mp, mode)
                skipped = args.report_only or (mode == "whole" and mp > args.whole_max_mp)
                if key in done or skipped:
                    continue
                labels_file = f"labels_{name}_{mp:g}mp_{mode}.npy"
                job = {"set": name, "mp": mp, "mode": mode, "labels": str(folder / labels_file)}
                print(f"running {name} {mp:g} MP {mode} ...", file=sys.stderr, flush=True)
                row = {"set": name, "mp": mp, "mode": mode, "labels_file": labels_file}
                row |= _run(args, job)
                done[key] = row
                if args.results:
                    with args.results.open("a") as out:
                        out.write(json.dumps(row) + "\n")
    _report(args, done, folder, sets, sizes, modes)


def _report(args, done: dict, folder: Path, sets, sizes, modes) -> None:
    # Timed in the clock of --clock: CPU seconds are the fairer one on a shared machine
    # (a run is not charged for the time other processes held the cores).
    total, network = (
        ("cpu_seconds", "network_cpu_seconds")
        if args.clock == "cpu"
        else ("seconds", "network_seconds")
    )
    print(
        f"image {args.image.name} mirrored to each size; tiled = --tile {args.tile}, default "
        f"overlap; default = as shipped (tiles above the memory budget); {args.clock} seconds"
    )
    print(
        "| models | MP | mode | s | s / MP | / whole | outside networks | wall s | peak MB "
        "| nuclei | AP vs whole |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    shares = []
    for name in sets:
        for mp in sizes:
            whole = done.get((name, mp, "whole"))
            for mode in modes:
                row = done.get((name, mp, mode))
                if row is None:
                    continue
                if "error" in row:
                    print(f"| {name} | {mp:g} | {mode} | failed: {row['error']} |")
                    continue
                megapixels = row["pixels"] / 1e6
                ratio = "n/a"
                if whole is not None and "error" not in whole:
                    ratio = f"{row[total] / whole[total]:.2f}"
                outside = 1 - row[network] / row[total]
                shares.append(outside)
                print(
                    f"| {name} | {megapixels:.2f} | {mode} | {row[total]:.1f} "
                    f"| {row[total] / megapixels:.1f} | {ratio} | {outside:.0%} "
                    f"| {row['seconds']:.1f} | {row['peak_mb']:.0f} | {row['nuclei']} "
                    f"| {_agreement(folder, row, whole)} |"
                )
    one = done.get(("bundle", 1.0, "whole"))
    tiled = done.get(("bundle", 1.0, "tiled"))
    large = done.get(("bundle", 16.0, "default"))
    if one and tiled and "error" not in one and "error" not in tiled:
        print(f"bundle 1 MP tiled / whole: {tiled[total] / one[total]:.2f} (target 1.5)")
    if shares:
        print(f"largest share outside the networks: {max(shares):.0%} (target 25%)")
    if one and large and "error" not in one and "error" not in large:
        per_mp = (large[total] / large["pixels"]) / (one[total] / one["pixels"])
        print(
            f"bundle 16 MP default: {per_mp:.2f} x the 1 MP whole time per pixel (target 1.5), "
            f"peak {large['peak_mb']:.0f} MB (target 4096)"
        )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
