"""What the scripts share: stopping on bad input with one line per problem, not a traceback.

Kept free of heavy imports (torch, the models), so that a script can build
its argument parser, and answer ``--help``, before it loads any of them.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

# Exit status of a command refused for its input or output paths (argparse's, too)
# and of one stopped by a failure on the way (a file that could not be written).
USAGE_STATUS = 2
FAILURE_STATUS = 1

# Default paths the scripts share: the reference bundle (nucleiseg.training.reference reads
# it) and the committed folds (nucleiseg.competition.folds).
WEIGHTS_DIR = Path("weights")
DEFAULT_FOLDS_PATH = Path("folds/folds.csv")

# The model families, for command-line choices; nucleiseg.inference.family.FAMILIES has
# their code (a test keeps the two in step).
MODEL_FAMILIES = ("unetpp", "maskrcnn")

# Where a script runs, for ``--device``: ``auto`` takes a CUDA GPU when there is one
# (nucleiseg.inference.predictor.resolve_device reads the name).
DEVICES = ("auto", "cpu", "cuda")


def add_device_argument(parser) -> None:
    """The ``--device`` option every script that runs a model takes."""
    parser.add_argument(
        "--device", default="auto", choices=DEVICES, help="auto: a CUDA GPU when there is one"
    )


class Refused(SystemExit):
    """A command stopped before (or while) doing its work, for the reasons in ``problems``.

    Args:
        problems: One message per problem, each naming its file or flag.
        status: The exit status.
    """

    def __init__(self, problems: Sequence[str], status: int = USAGE_STATUS):
        self.problems = [str(problem) for problem in problems]
        super().__init__("\n".join(f"error: {problem}" for problem in self.problems))
        self.code = status


def refuse(problems: Sequence[str], status: int = USAGE_STATUS) -> NoReturn:
    """Print every problem on its own ``error:`` line to stderr and exit with ``status``.

    Args:
        problems: One message per problem.
        status: The exit status (2 for bad input or output paths).

    Raises:
        Refused: Always.
    """
    refused = Refused(problems, status)
    print(refused, file=sys.stderr)
    raise refused


def refuse_if(problems: Iterable[str | None]) -> None:
    """:func:`refuse` with exit status 2 if there is any problem (None entries are none)."""
    problems = [problem for problem in problems if problem is not None]
    if problems:
        refuse(problems)


@contextlib.contextmanager
def refusing(*errors: type[Exception], status: int = USAGE_STATUS) -> Iterator[None]:
    """Turn the given exceptions raised in the block into :func:`refuse` with their messages.

    A message of several lines (one problem a line, as
    :func:`nucleiseg.training.reference.export` raises) gives one ``error:`` line each.

    Args:
        errors: Exception types whose message names the file or flag at fault
            (e.g. ``DataError``); others pass through as they are.
        status: The exit status.
    """
    try:
        yield
    except errors as error:
        refuse(str(error).splitlines() or [type(error).__name__], status)
