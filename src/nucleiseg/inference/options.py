"""Command-line flags of the inference options, kept free of torch.

Scripts build their argument parsers from this module, so that ``--help``
answers before torch and the models are imported;
:class:`nucleiseg.inference.predictor.InferenceOptions` holds the options themselves.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from nucleiseg.inference import tta

FAMILY_MERGES = ("nms", "vote", "agree", "fill", "maps")

# The views of the fast preset (with its one model, see
# nucleiseg.inference.predictor.fast_preset_models): a single pass.
FAST_VIEWS = {"tta": "none", "scales": [1.0]}

# Whole-slide blocks (nucleiseg.inference.slide): the side of a block's core, a multiple
# of the label TIFF's 256 px tiles, and the context it sees on every side, wider than
# the largest DSB 2018 nucleus at the training scale (about 100 px across).
DEFAULT_BLOCK = 2048
DEFAULT_MARGIN = 128


def add_option_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line flags for the fields of :class:`InferenceOptions`, all defaulting to unset."""
    group = parser.add_argument_group("inference options (default: the bundle's, else built-in)")
    group.add_argument("--tta", choices=list(tta.TTA_SETS), help="test-time D4 views")
    group.add_argument("--scales", help="comma-separated, e.g. 1.0,1.25")
    group.add_argument("--tile", type=int, help="tile side in pixels (multiple of 32)")
    group.add_argument("--overlap", type=int, help="pixels shared by tiles")
    group.add_argument("--batch-size", type=int, help="tiles per forward pass")
    group.add_argument(
        "--max-memory",
        type=float,
        help="GB one forward pass may take; larger images are tiled automatically (default 2)",
    )
    group.add_argument("--vote-fraction", type=float, help="Mask R-CNN views/folds that must agree")
    group.add_argument("--merge", choices=FAMILY_MERGES, help="family merge")
    group.add_argument(
        "--map-weight", type=float, help="--merge maps: Mask R-CNN's share of the body map"
    )
    group.add_argument(
        "--size-adaptive",
        action=argparse.BooleanOptionalAction,
        help="rescale each image so its nuclei match the training size (two passes)",
    )
    group.add_argument("--size-target", type=float, help="median nucleus diameter to match, px")
    group.add_argument("--size-tolerance", type=float, help="diameters within this factor stay")


# Each command-line option (its argparse name, which the Python API's keywords
# share) and the InferenceOptions field it sets.
OPTION_FIELDS = {
    "tta": "tta",
    "scales": "scales",
    "tile": "tile",
    "overlap": "overlap",
    "batch_size": "batch_size",
    "max_memory": "max_memory",
    "vote_fraction": "vote_fraction",
    "merge": "family_merge",
    "map_weight": "map_weight",
    "size_adaptive": "size_adaptive",
    "size_target": "size_target",
    "size_tolerance": "size_tolerance",
}


def given_options(args: argparse.Namespace | Mapping[str, Any]) -> dict:
    """The :class:`InferenceOptions` fields set by :func:`add_option_arguments` flags.

    Args:
        args: Parsed flags, or a mapping of the same names (:data:`OPTION_FIELDS`);
            ``scales`` is ``"1.0,1.25"`` or a sequence of numbers.

    Returns:
        Field -> value for every option given (not None).
    """
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    given = {field: values.get(name) for name, field in OPTION_FIELDS.items()}
    if given["scales"] is not None:
        given["scales"] = list(tta.parse_scales(given["scales"]))
    return {field: value for field, value in given.items() if value is not None}
