"""Score inference-time variants out of fold and write a leaderboard.

    python scripts/ablate.py --config ablations/unetpp_postprocess.yaml
    python scripts/ablate.py --config ablations/tta.yaml --workers 2 --device auto

Reads the variants of ``--config`` (see ``nucleiseg.evaluation.ablation.load_ablation``),
computes (or takes from the runs' caches) the out-of-fold model outputs each
needs, scores every variant on the same images, and writes
``<out-dir>/<name>.csv`` and ``<out-dir>/<name>.md``: one row per variant with
the CV overall and per modality, the delta against the baseline row and the
seconds per image. The last line is ``best: <variant> <cv>``. A bad file, or a run
whose models must run but whose weights are not there (a run kept for its OOF labels
and records), stops it with one ``error:`` line each, exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import pandas as pd

from nucleiseg import cli
from nucleiseg.atomic import atomic_path
from nucleiseg.data.reading import DataError
from nucleiseg.evaluation.ablation import (
    leaderboard_markdown,
    load_ablation,
    run_ablation,
    update_leaderboard,
)
from nucleiseg.inference.predictor import resolve_device
from nucleiseg.models.precision import describe_machine

log = logging.getLogger("ablate")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="ablation YAML file")
    parser.add_argument("--out-dir", type=Path, default=Path("ablations/results"))
    parser.add_argument("--workers", type=int, default=2, help="processes for the instance step")
    parser.add_argument(
        "--update",
        action="store_true",
        help="score only the variants and external folders the written leaderboard lacks",
    )
    cli.add_device_argument(parser)
    return parser


def main(args: argparse.Namespace):
    with cli.refusing(DataError, FileNotFoundError, ValueError, RuntimeError):
        ablation = load_ablation(args.config)
        device = resolve_device(args.device)
    written = args.out_dir / f"{ablation.name}.csv"
    if args.update:
        if not written.is_file():
            raise SystemExit(f"error: --update: no leaderboard {written} to update")
        earlier = pd.read_csv(written, dtype={"command": str}).fillna({"command": ""})
    # A model that must run but whose run keeps no weights (only its OOF labels and
    # records) is named before anything is predicted: one error line per run.
    with cli.refusing(FileNotFoundError):
        if args.update:
            results = update_leaderboard(ablation, earlier, device, args.workers)
        else:
            results = run_ablation(ablation, device, args.workers)
    command = "python scripts/ablate.py --config " + shlex.quote(str(args.config))
    title = f"Ablation: {ablation.name}"
    markdown = leaderboard_markdown(results, title, command, describe_machine(device))
    with atomic_path(written) as tmp:
        results.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(args.out_dir / f"{ablation.name}.md") as tmp:
        tmp.write_text(markdown)
    sys.stdout.write(markdown)
    best = results.loc[results["cv"].idxmax()]
    print(f"best: {best['variant']} {best['cv']:.4f}")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
