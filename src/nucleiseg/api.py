"""The Python API: load a model once, then segment numpy images with it.

    import nucleiseg
    from nucleiseg.data.reading import read_image

    model = nucleiseg.load("weights")  # the shipped bundle, a run folder or a fold folder
    labels = model.segment(read_image("cells.png"))  # int32 (H, W), 0 = background
    labels = model.segment(image, fast=True)  # one model, one view
    for labels in model.segment_many(images, tile=512):
        ...
    model.segment_slide("slide.ome.tif", "slide_labels.tif", fast=True)  # larger than memory

A bundle is checked against its manifest before any model is built and
starts from the inference options it was chosen with (its manifest's
``inference``); run and fold folders start from the built-in defaults. Either
way each run's tuned thresholds are used. Options are keywords named as
``scripts/predict.py``'s flags (:data:`OPTION_NAMES`): given to :func:`load`
they hold for every call, given to a call they hold for it. ``scripts/predict.py``
and ``scripts/evaluate_external.py`` segment through :class:`Segmenter` too,
so a script and a notebook give the same label images.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nucleiseg.cli import WEIGHTS_DIR
from nucleiseg.data.reading import as_rgb_uint8, read_image
from nucleiseg.data.sizing import pixel_size_scale
from nucleiseg.inference import predictor
from nucleiseg.inference import slide as slide_module
from nucleiseg.inference.batchnorm import adapt_batchnorm
from nucleiseg.inference.ensemble import segment_each, segment_image
from nucleiseg.inference.family import Thresholds, params_by_family
from nucleiseg.inference.options import FAST_VIEWS, OPTION_FIELDS, given_options
from nucleiseg.inference.predictor import (
    FoldModel,
    InferenceOptions,
    fast_preset_index,
    fast_preset_models,
    resolve_device,
    with_options,
)
from nucleiseg.models.config import load_config
from nucleiseg.models.runs import CONFIG, fold_dirs, weights_path
from nucleiseg.training.checks import bundle_problems, run_problems
from nucleiseg.training.reference import MANIFEST, inference_options

# The options of load() and of every Segmenter call, named as the command-line
# flags: the inference options, the fast preset and the images' pixel size.
OPTION_NAMES = (*OPTION_FIELDS, "fast", "pixel_size")


@dataclass(frozen=True)
class Settings:
    """How a call segments.

    Attributes:
        options: The inference options, scales already multiplied by the
            pixel-size factor when a pixel size is given.
        fast: Keep the fast preset's one model (see
            :func:`nucleiseg.inference.predictor.fast_preset_models`).
        pixel_size: Microns per pixel of the images, None when not given.
    """

    options: InferenceOptions
    fast: bool = False
    pixel_size: float | None = None


def resolve_settings(
    base: InferenceOptions, given: Mapping[str, Any], flag: Callable[[str], str] = str
) -> Settings:
    """The settings of options given by name (:data:`OPTION_NAMES`) over ``base``.

    ``fast`` keeps one model and one view (``tta`` and ``scales`` cannot come
    with it); ``pixel_size`` (microns) multiplies every scale by
    :func:`nucleiseg.data.sizing.pixel_size_scale`, and cannot come with
    ``size_adaptive``, which sets the scale from the nuclei instead.

    Args:
        base: The options a bundle gives, or the defaults.
        given: Option name -> value; None is not given.
        flag: How messages name an option (the scripts name their flags, ``--tta``).

    Returns:
        The settings.

    Raises:
        TypeError: For an unknown option name.
        ValueError: For a bad value or options that exclude each other, naming them.
    """
    unknown = sorted(set(given) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(unknown)}; the options are {', '.join(OPTION_NAMES)}"
        )
    given = {name: value for name, value in given.items() if value is not None}
    fast = bool(given.get("fast", False))
    if fast and ("tta" in given or "scales" in given):
        raise ValueError(
            f"{flag('fast')} has no test-time views: leave out {flag('tta')} and {flag('scales')}"
        )
    try:
        fields = given_options(given)
    except ValueError as error:  # scales, the only option parsed here
        raise ValueError(f"{flag('scales')} {given['scales']}: {error}") from error
    options = with_options(base, (fields | FAST_VIEWS) if fast else fields)
    pixel_size = given.get("pixel_size")
    if pixel_size is not None:
        if options.size_adaptive:
            raise ValueError(
                f"{flag('pixel_size')} and {flag('size_adaptive')} both set the scale; choose one"
            )
        factor = pixel_size_scale(pixel_size)
        options = with_options(options, {"scales": [scale * factor for scale in options.scales]})
    return Settings(options, fast, pixel_size)


def _rgb(image: Any, name: str) -> np.ndarray:
    """An image given to the API as RGB uint8, or a ValueError saying what is wrong with it."""
    if not isinstance(image, np.ndarray):
        hint = ""
        if isinstance(image, (str, os.PathLike)):
            hint = "; read a file first: nucleiseg.data.reading.read_image(path)"
        raise ValueError(f"{name}: expected a numpy array, got {type(image).__name__}{hint}")
    return as_rgb_uint8(image, name)


class Segmenter:
    """Fold models ready to segment images, with their thresholds and starting options.

    Made by :func:`load`, or by :meth:`from_runs` for runs already checked.

    Args:
        models: The fold models (see :func:`nucleiseg.inference.predictor.load_fold_models`).
        params: Family name -> thresholds of its raw output -> instances step.
        device: Where the models run.
        options: The starting inference options (None: the defaults).
        **given: Options for every call (:data:`OPTION_NAMES`).

    Raises:
        TypeError: For an unknown option.
        ValueError: For a bad option value.
    """

    def __init__(
        self,
        models: Sequence[FoldModel],
        params: Mapping[str, Thresholds],
        device: torch.device,
        options: InferenceOptions | None = None,
        **given: Any,
    ) -> None:
        self.models = list(models)
        self.params = dict(params)
        self.device = device
        self.options = options or InferenceOptions()
        self.given = given
        self.settings()

    @classmethod
    def from_runs(
        cls,
        runs: Sequence[str | os.PathLike],
        *,
        device: str | torch.device = "auto",
        folds: Collection[int] | None = None,
        options: InferenceOptions | None = None,
        **given: Any,
    ) -> Segmenter:
        """Load the finished fold models of run or fold folders checked before (see :func:`load`).

        With ``fast=True`` among ``given`` only the fast preset's model is
        loaded, so every call is fast.

        Args:
            runs: Run folders, or fold folders, ensembled.
            device: ``auto`` (a CUDA GPU when there is one), ``cpu``, ``cuda`` or a torch device.
            folds: Keep only these folds' models (None: every finished fold).
            options: The starting inference options (None: the defaults).
            **given: Options for every call.

        Returns:
            The segmenter.
        """
        runs = [Path(run) for run in runs]
        settings = resolve_settings(options or InferenceOptions(), given)  # before any model loads
        device = device if isinstance(device, torch.device) else resolve_device(device)
        params = params_by_family(runs)
        if settings.fast:
            runs, folds = [_fast_fold(runs, folds)], None
        models = [m for run in runs for m in predictor.load_fold_models(run, device, folds)]
        return cls(models, params, device, options, **given)

    def __repr__(self) -> str:
        families = [member.config.model for member in self.models]
        counts = ", ".join(f"{name} x{families.count(name)}" for name in dict.fromkeys(families))
        return f"Segmenter({counts} on {self.device}; options {self.given or 'as loaded'})"

    def settings(self, **options: Any) -> Settings:
        """The settings of a call with these options (over those given to :func:`load`)."""
        return resolve_settings(self.options, {**self.given, **options})

    def members(self, **options: Any) -> list[FoldModel]:
        """The fold models a call with these options runs: all of them, or the fast preset's one."""
        return self._members(self.settings(**options))

    def _members(self, settings: Settings) -> list[FoldModel]:
        return fast_preset_models(self.models) if settings.fast else self.models

    def segment(self, image: np.ndarray, **options: Any) -> np.ndarray:
        """Label image of one image.

        Args:
            image: A numpy array: grey (H, W), RGB (H, W, 3) or RGBA (H, W, 4)
                (alpha dropped); uint8, or uint16 or float stretched from the
                image's own range (NaN shown as 0, with a warning).
            **options: Options for this call (:data:`OPTION_NAMES`), e.g.
                ``fast=True``, ``tta="flip"``, ``tile=512``, ``merge="nms"``,
                ``pixel_size=0.5`` (microns per pixel).

        Returns:
            int32 label image (H, W), 0 = background, one value per nucleus.

        Raises:
            ValueError: If ``image`` is not such an array (a path, a 4-D,
                empty or all-NaN array), or an option's value is bad.
            TypeError: For an unknown option.
        """
        settings = self.settings(**options)
        rgb = _rgb(image, "image")
        return segment_image(
            self._members(settings), rgb, self.params, self.device, settings.options
        )

    def segment_many(self, images: Iterable[np.ndarray], **options: Any) -> Iterator[np.ndarray]:
        """Label images of several images, as they come, with a progress bar.

        Args:
            images: Numpy arrays as :meth:`segment` takes them (a list, or a
                generator that reads them one at a time).
            **options: Options for every image of this call.

        Returns:
            An iterator of int32 label images, in the order of ``images``.

        Raises:
            ValueError: As :meth:`segment`, when the bad image comes (options at once).
        """
        settings = self.settings(**options)
        total = len(images) if isinstance(images, Sized) else None
        items = (
            (str(index), _rgb(image, f"image {index}"), settings.options)
            for index, image in enumerate(images)
        )
        found = segment_each(self._members(settings), items, self.params, self.device, total)
        return (labels for _, _, labels in found)

    def segment_files(
        self,
        files: Mapping[str, str | os.PathLike],
        pixel_sizes: Mapping[str, float] | None = None,
        **options: Any,
    ) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """Label images of image files, as they come, with a progress bar.

        Args:
            files: Image id -> PNG or TIFF file (read with
                :func:`nucleiseg.data.reading.read_image`).
            pixel_sizes: Image id -> microns per pixel, for the images that
                have one (the ``pixel_size`` option of each; see
                :func:`nucleiseg.data.sizing.read_pixel_size`).
            **options: Options for every image of this call.

        Returns:
            An iterator of (id, RGB uint8 image, int32 label image), in the order of ``files``.
        """
        settings = self.settings(**options)
        pixel_sizes = pixel_sizes or {}

        def items() -> Iterator[tuple[str, np.ndarray, InferenceOptions]]:
            for image_id, path in files.items():
                own = settings
                if image_id in pixel_sizes:
                    own = self.settings(**{**options, "pixel_size": pixel_sizes[image_id]})
                yield image_id, read_image(path), own.options

        return segment_each(self._members(settings), items(), self.params, self.device, len(files))

    def adapt_batchnorm(self, files: Mapping[str, str | os.PathLike]) -> int:
        """Re-estimate every model's BatchNorm statistics over image files (AdaBN); the
        weights stay. Later calls predict with the new statistics.

        Args:
            files: Image id -> PNG or TIFF file, typically the images about to be segmented.

        Returns:
            The forward passes the statistics average over, summed over the models.

        Raises:
            ValueError: If ``files`` is empty.
        """
        return sum(
            adapt_batchnorm(
                member.model,
                (read_image(path) for path in files.values()),
                member.config,
                self.device,
                total=len(files),
            )
            for member in self.models
        )

    def segment_slide(
        self,
        slide: str | os.PathLike,
        out: str | os.PathLike,
        *,
        block: int = slide_module.DEFAULT_BLOCK,
        margin: int = slide_module.DEFAULT_MARGIN,
        **options: Any,
    ) -> slide_module.SlideResult:
        """Segment a whole-slide TIFF, larger than memory, into a tiled uint32 label TIFF.

        The slide is read and segmented block by block, each block as
        :meth:`segment` segments an image, and the label image is written tile
        by tile (see :mod:`nucleiseg.inference.slide`).

        Args:
            slide: A TIFF, tiled or in strips (a pyramidal OME-TIFF: its full resolution).
            out: The label TIFF to write (atomically; uint32, tiles of 256 px).
            block: Side of the blocks' cores, a multiple of 256.
            margin: Pixels each block sees beyond its core; wider than any nucleus.
            **options: Options for this call (:data:`OPTION_NAMES`), e.g.
                ``pixel_size=0.5``; not ``size_adaptive``.

        Returns:
            The :class:`nucleiseg.inference.slide.SlideResult`: the file, the
            slide's shape, the number of nuclei (ids 1..nuclei), blocks and seconds.

        Raises:
            ValueError: For a bad option, block or margin, or an option a slide
                cannot be segmented with (see :func:`nucleiseg.inference.slide.slide_problems`).
            nucleiseg.data.reading.DataError: If the slide cannot be read window by window.
            nucleiseg.atomic.WriteError: If ``out`` cannot be written.
        """
        settings = self.settings(**options)
        members = self._members(settings)
        slide_module.check_blocks(block, margin)
        problems = slide_module.slide_problems(settings.options, [m.config for m in members])
        if problems:
            raise ValueError("; ".join(problems))

        def segment(window: np.ndarray) -> np.ndarray:
            return segment_image(members, window, self.params, self.device, settings.options)

        return slide_module.segment_slide(slide, out, segment, block, margin)


def _fast_fold(runs: Sequence[Path], folds: Collection[int] | None) -> Path:
    """The fold folder of the fast preset's model, chosen from the configurations alone."""
    finished = [
        fold_dir
        for run in runs
        for fold, fold_dir in fold_dirs(run).items()
        if weights_path(fold_dir) is not None and (folds is None or fold in folds)
    ]
    if not finished:
        raise FileNotFoundError(f"{', '.join(map(str, runs))}: no finished fold to segment with")
    families = [load_config(fold_dir / CONFIG).model for fold_dir in finished]
    return finished[fast_preset_index(families)]


def load(
    weights: str | os.PathLike | Sequence[str | os.PathLike] = WEIGHTS_DIR,
    *,
    device: str | torch.device = "auto",
    folds: Collection[int] | None = None,
    **options: Any,
) -> Segmenter:
    """Load a model for segmenting: a bundle, a run folder, a fold folder, or several runs.

    Args:
        weights: A reference bundle (a folder with ``manifest.yaml``, such as
            the shipped ``weights/``: every file is checked against the
            manifest, whose inference options are the starting ones), a run
            folder (``runs/<name>``: its finished folds), one fold folder
            (``runs/<name>/fold0``), or a list of run and fold folders,
            ensembled as ``scripts/predict.py --runs`` does.
        device: ``auto`` (a CUDA GPU when there is one), ``cpu``, ``cuda`` or a torch device.
        folds: Keep only these folds' models (None: every finished fold).
        **options: Options for every call (:data:`OPTION_NAMES`); a call's
            own options override them. ``fast=True`` here loads the fast
            preset's one model only.

    Returns:
        The :class:`Segmenter`.

    Raises:
        FileNotFoundError: If a folder does not exist.
        ValueError: Naming every problem: a bundle file missing or altered, a
            run without a finished fold or with altered weights, a bad option value.
        TypeError: For an unknown option.
    """
    paths = [weights] if isinstance(weights, (str, os.PathLike)) else list(weights)
    paths = [Path(path) for path in paths]
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such bundle, run or fold folder")
    if len(paths) == 1 and (paths[0] / MANIFEST).is_file():
        runs, problems = bundle_problems(paths[0])
        base = None if problems else inference_options(paths[0])
    else:
        runs, problems, base = paths, run_problems(paths), None
    if problems:
        raise ValueError("cannot load " + ", ".join(map(str, paths)) + ":\n" + "\n".join(problems))
    return Segmenter.from_runs(runs, device=device, folds=folds, options=base, **options)
