"""Learning curve: fine-tuned from a trained model vs from random weights, by number of images.

    python scripts/learning_curve.py --config ablations/learning_curve.yaml
    python scripts/learning_curve.py --config ablations/learning_curve.yaml --out-dir /tmp/curve
    python scripts/learning_curve.py --config ablations/learning_curve.yaml --tables-only

Reads the curve of ``--config`` (see ``nucleiseg.training.learning_curve.load_curve``):
for every size, seed and arm (fine-tuned, from scratch) it fine-tunes a point
with ``nucleiseg.training.finetune`` in ``<work_dir>/<arm>_n<N>_seed<S>/`` and scores
its bundle on the held-out test folder; the start model is scored too
(n = 0). Finished points (their ``point.json``) are skipped, so an
interrupted curve continues where it stopped, and an interrupted point resumes
from its last checkpoints. After every point it writes
``<out-dir>/<name>.csv`` (one row per point), ``<name>.md`` (mean AP per
number of images and arm, then every point) and ``<name>.png`` (mean AP
against the number of training images, both curves); ``--tables-only`` writes
those three from the finished points and trains nothing. The folders, the sizes
and the start model (not with ``--tables-only``, which runs no model) are checked
before any model loads (one ``error:`` line each, exit status 2).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from nucleiseg import cli
from nucleiseg.data import reading

log = logging.getLogger("learning_curve")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="learning-curve YAML file")
    parser.add_argument("--out-dir", type=Path, default=Path("ablations/results"))
    parser.add_argument(
        "--tables-only",
        action="store_true",
        help="rewrite the CSV, Markdown and plot from the finished points; train nothing",
    )
    cli.add_device_argument(parser)
    return parser


def main(args: argparse.Namespace):
    from nucleiseg.atomic import WriteError
    from nucleiseg.inference.predictor import resolve_device
    from nucleiseg.models.precision import describe_machine
    from nucleiseg.training.learning_curve import (
        curve_problems,
        load_curve,
        run_curve,
        summary_table,
        write_results,
    )

    with cli.refusing(reading.DataError, ValueError, RuntimeError):
        curve = load_curve(args.config)
        device = resolve_device(args.device)
    cli.refuse_if(curve_problems(curve, args.out_dir, tables_only=args.tables_only))
    command = "python scripts/learning_curve.py " + shlex.join(sys.argv[1:])
    with (
        cli.refusing(reading.DataError, ValueError),
        cli.refusing(WriteError, status=cli.FAILURE_STATUS),
    ):
        machine = describe_machine(device)
        if args.tables_only:
            points = write_results(curve, args.out_dir, command, machine)
        else:
            points = run_curve(curve, device, args.out_dir, command, machine)
    print(summary_table(points).to_string(float_format="%.4f"))
    print(f"wrote {args.out_dir / curve.name}.csv, .md and .png")
    return points


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    main(get_args_parser().parse_args())
