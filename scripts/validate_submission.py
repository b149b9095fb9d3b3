"""Check a submission CSV against the images it must cover.

Run from the repository root::

    .venv/bin/python scripts/validate_submission.py submission.csv --images data/sample/stage1_test

Prints every problem as ``error: ImageId row N: message`` on stderr and exits
with status 2 if there is any; otherwise prints ``OK: <n> rows, <n> images``
and exits with 0. ``--images`` is required: a submission is valid only for
the images it is for (``data/sample/stage1_test`` for the bundled sample). An
unusable ``--images`` folder is one ``error:`` line and exit status 2 too.
"""

import argparse
import sys
from pathlib import Path

import pandas as pd

from nucleiseg import cli
from nucleiseg.competition import submission
from nucleiseg.data import reading


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("submission", type=Path, help="submission CSV (ImageId,EncodedPixels)")
    parser.add_argument(
        "--images",
        type=Path,
        required=True,
        help="images the submission is for: competition layout or a folder of PNG/TIFF files",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    with cli.refusing(reading.DataError):
        images = reading.find_images(args.images)
        sizes = {image_id: reading.image_size(path) for image_id, path in images.items()}
    cli.refuse_if(map(str, submission.validate_submission(args.submission, sizes)))
    rows = pd.read_csv(args.submission, dtype=str, keep_default_na=False)
    print(f"OK: {len(rows)} rows, {len(sizes)} images")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
