"""A U-Net++ fold as a bioimage.io model package, for tools outside this repo.

The package is a folder that bioimage.io tools (bioimageio.core, deepImageJ,
ilastik, the bioimage.io website) open as it is:

- ``rdf.yaml``: the model description (bioimage.io spec 0.5), with the input's
  normalization written as preprocessing, so that a tool feeds the network what
  :func:`nucleiseg.data.dataset.to_tensor` feeds it (``x / 255``, then the
  ImageNet mean and standard deviation per channel; a run trained with
  percentile ``input_norm`` first stretches each image between its
  percentiles, clipped), and the sigmoid as postprocessing;
- ``weights.pt``: the model as TorchScript, float32, traced on the CPU, so no
  code of this repo is needed to run it;
- ``test_input.npy`` and ``test_output.npy``: an image (1, 3, H, W) of 0..255
  values and its body, border and separation probabilities, as this repo
  computes them; a tool that reproduces the output runs the model right;
- ``README.md``: what the maps are and the postprocessing that makes nuclei of
  them, the seeded watershed of :mod:`nucleiseg.postprocessing.watershed`
  with the run's tuned thresholds (also in the rdf's ``config``).

The package is written in a temporary folder beside the destination and
renamed onto it once every file is in, so a failed export leaves nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from nucleiseg.atomic import WriteError, write_bytes
from nucleiseg.data.dataset import IMAGE_MEAN, IMAGE_STD, to_tensor
from nucleiseg.data.intensity import PERCENTILE, normalize_input
from nucleiseg.data.sizing import TRAIN_PIXEL_SIZE
from nucleiseg.inference.family import as_dict, load_params
from nucleiseg.models.build import build_model, load_weights
from nucleiseg.models.config import TrainConfig, load_config, plain
from nucleiseg.models.runs import CONFIG, run_root, weights_path

FORMAT_VERSION = "0.5.4"
RDF = "rdf.yaml"
WEIGHTS_FILE = "weights.pt"
TEST_INPUT = "test_input.npy"
TEST_OUTPUT = "test_output.npy"
DOCUMENTATION = "README.md"
PACKAGE_FILES = (RDF, WEIGHTS_FILE, TEST_INPUT, TEST_OUTPUT, DOCUMENTATION)
INPUT_ID = "raw"
OUTPUT_ID = "probabilities"
MAPS = ("body", "border", "separation")
# The U-Net++'s stride: inputs are multiples of it (see nucleiseg.inference.tiling).
STRIDE = 32
MIN_SIDE = 64
DSB_2018 = {
    "text": "Caicedo et al. (2019), Nucleus segmentation across imaging experiments: "
    "the 2018 Data Science Bowl. Nature Methods 16, 1247-1253",
    "doi": "10.1038/s41592-019-0612-7",
}
UNETPP = {
    "text": "Zhou et al. (2018), UNet++: A Nested U-Net Architecture for Medical Image "
    "Segmentation. DLMIA 2018",
    "doi": "10.1007/978-3-030-00889-5_1",
}


def fold_config(fold_dir: Path) -> TrainConfig:
    """The configuration of a fold, for inference (no pretrained weights fetched)."""
    return load_config(Path(fold_dir) / CONFIG, {"encoder_weights": None, "init_from": None})


def export_problems(fold_dir: Path, out: Path) -> list[str]:
    """What stops a fold from being exported to ``out``, found before any model is built."""
    problems = []
    fold_dir, out = Path(fold_dir), Path(out)
    if not (fold_dir / CONFIG).is_file() or weights_path(fold_dir) is None:
        problems.append(f"{fold_dir}: not a finished fold (no {CONFIG} and compact weights)")
    elif fold_config(fold_dir).model != "unetpp":
        model = fold_config(fold_dir).model
        problems.append(
            f"{fold_dir}: a {model} fold; only U-Net++ folds export to bioimage.io "
            "(their output is a dense map a tool can compare)"
        )
    if out.exists() and not out.is_dir():
        problems.append(f"{out}: is a file; give a folder for the package")
    elif out.is_dir() and any(out.iterdir()):
        problems.append(f"{out}: holds other files; give a new or empty folder")
    return problems


def preprocessing(config: TrainConfig) -> list[dict[str, Any]]:
    """The rdf's preprocessing: what turns 0..255 pixels into this run's network input."""
    steps = []
    if config.input_norm.mode == PERCENTILE:
        axes = ["channel", "y", "x"]  # one scale for the three channels, as input_norm
        steps += [
            {
                "id": "scale_range",
                "kwargs": {
                    "axes": axes,
                    "min_percentile": config.input_norm.low,
                    "max_percentile": config.input_norm.high,
                },
            },
            {"id": "clip", "kwargs": {"min": 0.0, "max": 1.0}},
        ]
        gain = 1.0 / IMAGE_STD
    else:
        gain = 1.0 / (255.0 * IMAGE_STD)
    offset = -IMAGE_MEAN / IMAGE_STD
    steps.append(
        {
            "id": "scale_linear",
            "kwargs": {
                "axis": "channel",
                "gain": [float(g) for g in gain],
                "offset": [float(o) for o in offset],
            },
        }
    )
    return steps


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _file(name: str, payload: bytes) -> dict[str, str]:
    return {"source": name, "sha256": hashlib.sha256(payload).hexdigest()}


def _documentation(config: TrainConfig, fold: str, thresholds: dict, source: str) -> str:
    stretched = config.input_norm.mode == PERCENTILE
    norm = (
        f"each image is stretched between its {config.input_norm.low}th and "
        f"{config.input_norm.high}th percentiles (over the three channels together) to 0..1, "
        "clipped, then"
        if stretched
        else "the pixels are divided by 255, then"
    )
    rows = "\n".join(
        f"| `{name}` | {value} |" for name, value in thresholds.items() if name != "modalities"
    )
    for modality, own in thresholds.get("modalities", {}).items():
        rows += "".join(f"\n| `{name}`, {modality} images | {v} |" for name, v in own.items())
    return f"""# {config.experiment}, {fold}: nuclei as body, border and separation maps

A U-Net++ ({config.encoder} encoder) trained by nucleiseg on the DSB 2018
nuclei ({config.experiment}, {fold}; see its `docs/training.md`). It segments
nuclei in fluorescence, brightfield and H&E tissue images at about
{TRAIN_PIXEL_SIZE} micron per pixel.

## Input

`{INPUT_ID}`: an RGB image (grey images repeated over three channels) with
0..255 values, axes batch, channel, y, x; sides of at least {MIN_SIDE} px and
multiples of {STRIDE}. Preprocessing (in `rdf.yaml`): {norm} each channel is
normalized with the ImageNet mean {[float(m) for m in IMAGE_MEAN]} and standard
deviation {[float(s) for s in IMAGE_STD]}.

## Output

`{OUTPUT_ID}`: three probability maps (after the sigmoid in the postprocessing),
same size as the input:

- `body`: the pixel is inside a nucleus;
- `border`: the pixel is on a nucleus's rim;
- `separation`: the pixel lies where two nuclei touch.

## From maps to nuclei: the seeded watershed

The maps are not a label image yet. nucleiseg turns them into one with a seeded
watershed (`nucleiseg.postprocessing.watershed.instances_from_probabilities`):
seeds are the connected regions where `body > seed_threshold` and
`border < border_threshold` and `separation < separation_threshold`, seeds
smaller than `min_seed_size` px dropped; the watershed floods from the seeds
over the inverted body map, within the mask `body > mask_threshold`; nuclei
smaller than `min_size` px are dropped. The thresholds of this model ({source}):

| threshold | value |
| --- | --- |
{rows}

Large images are best predicted in overlapping tiles of 512 px (128 px shared),
blended, before the watershed; the test image here is one tile.

## Validation

The test output is the fold's probabilities for the test input as nucleiseg
computes them (`to_tensor`, the network, the sigmoid); the TorchScript weights
with this file's pre- and postprocessing reproduce it. The fold's accuracy on
held-out DSB 2018 images (the competition metric, out of fold) is in nucleiseg's
`docs/results.md`.
"""


def export_bioimageio(fold_dir: Path, out: Path, image: np.ndarray) -> Path:
    """Write a U-Net++ fold as a bioimage.io model package folder.

    Args:
        fold_dir: A finished U-Net++ fold folder (``<run>/fold<K>``, in a run or a bundle).
        out: The package folder to write: new, or empty.
        image: RGB uint8 (H, W, 3) test image, sides multiples of 32, at least 64.

    Returns:
        ``out``.

    Raises:
        ValueError: For a fold that cannot be exported, an ``out`` holding other
            files, or a test image of another shape.
        nucleiseg.atomic.WriteError: If the package cannot be written, naming ``out``.
    """
    fold_dir, out = Path(fold_dir), Path(out)
    problems = export_problems(fold_dir, out)
    height, width = image.shape[:2]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        problems.append(
            f"test image: expected RGB uint8 (H, W, 3), got {image.dtype} {image.shape}"
        )
    elif min(height, width) < MIN_SIDE or height % STRIDE or width % STRIDE:
        problems.append(f"test image: sides must be multiples of {STRIDE} of at least {MIN_SIDE}")
    if problems:
        raise ValueError("\n".join(problems))
    config = fold_config(fold_dir)
    model = build_model(config)
    load_weights(model, weights_path(fold_dir))
    model = model.float().eval()
    network_input = to_tensor(normalize_input(image, config.input_norm))[None]
    weights = io.BytesIO()
    # bioimage.io tools run TorchScript; torch now marks it deprecated in favour of export.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, network_input)
        probabilities = torch.sigmoid(traced(network_input)).numpy()
        torch.jit.save(traced, weights)
    payloads = {
        WEIGHTS_FILE: weights.getvalue(),
        TEST_INPUT: _npy(np.ascontiguousarray(image.transpose(2, 0, 1)[None], np.float32)),
        TEST_OUTPUT: _npy(probabilities.astype(np.float32)),
    }
    run = run_root(fold_dir)
    thresholds = as_dict(load_params(run))
    source = (
        "tuned on out-of-fold predictions"
        if (run / "postprocess.yaml").is_file()
        else ("the training defaults")
    )
    payloads[DOCUMENTATION] = _documentation(config, fold_dir.name, thresholds, source).encode()
    rdf = _rdf(config, fold_dir, thresholds, payloads)
    payloads[RDF] = yaml.safe_dump(rdf, sort_keys=False).encode()
    _write_folder(out, payloads)
    return out


def _rdf(config: TrainConfig, fold_dir: Path, thresholds: dict, payloads: dict) -> dict:
    space = {"min": MIN_SIDE, "step": STRIDE}
    return {
        "type": "model",
        "format_version": FORMAT_VERSION,
        "name": f"NucleiSeg UNetPP {config.experiment} {fold_dir.name}".replace("_", " "),
        "description": "Nuclei in fluorescence, brightfield and H&E images as body, border "
        "and separation probability maps (DSB 2018), made into nuclei by a seeded watershed.",
        "authors": [{"name": "nucleiseg contributors"}],
        "cite": [DSB_2018, UNETPP],
        "license": "MIT",
        "documentation": DOCUMENTATION,
        "tags": [
            "nuclei",
            "instance-segmentation",
            "semantic-segmentation",
            "2d",
            "unet++",
            "fluorescence-light-microscopy",
            "brightfield",
            "histology",
            "pytorch",
        ],
        "inputs": [
            {
                "id": INPUT_ID,
                "description": "RGB image, 0..255 (grey images repeated over three channels)",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": ["red", "green", "blue"]},
                    {"type": "space", "id": "y", "size": dict(space)},
                    {"type": "space", "id": "x", "size": dict(space)},
                ],
                "test_tensor": _file(TEST_INPUT, payloads[TEST_INPUT]),
                "data": {"type": "float32", "range": [0.0, 255.0]},
                "preprocessing": preprocessing(config),
            }
        ],
        "outputs": [
            {
                "id": OUTPUT_ID,
                "description": "body, border and separation probabilities; nuclei come from "
                "the seeded watershed in the documentation",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": list(MAPS)},
                    {"type": "space", "id": "y", "size": {"tensor_id": INPUT_ID, "axis_id": "y"}},
                    {"type": "space", "id": "x", "size": {"tensor_id": INPUT_ID, "axis_id": "x"}},
                ],
                "test_tensor": _file(TEST_OUTPUT, payloads[TEST_OUTPUT]),
                "data": {"type": "float32", "range": [0.0, 1.0]},
                "postprocessing": [{"id": "sigmoid"}],
            }
        ],
        "weights": {
            "torchscript": {
                **_file(WEIGHTS_FILE, payloads[WEIGHTS_FILE]),
                "pytorch_version": torch.__version__.split("+")[0],
            }
        },
        "config": {
            "nucleiseg": {
                "run": config.experiment,
                "fold": fold_dir.name,
                "encoder": config.encoder,
                "input_norm": plain(dataclasses.asdict(config.input_norm)),
                "watershed": plain(thresholds),
                "pixel_size_microns": TRAIN_PIXEL_SIZE,
            }
        },
    }


def _write_folder(out: Path, payloads: dict[str, bytes]) -> None:
    """Write every file into a temporary folder beside ``out``, then rename it onto ``out``."""
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        for name, payload in payloads.items():
            write_bytes(staging / name, payload)
        os.replace(staging, out)  # onto a missing or empty folder only, as POSIX renames
    except WriteError as error:
        raise WriteError(out, str(error).split(": could not write: ")[-1], error.errno) from error
    except OSError as error:
        raise WriteError(out, error.strerror or str(error), error.errno) from error
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
