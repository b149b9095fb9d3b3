"""Segmenting images with the fold models of one or more runs, of one or both families.

Within a family, models are combined in the form of its raw output: U-Net++
probability maps (over folds and test-time views) are averaged before the
watershed, so that the models' agreement decides every boundary; Mask R-CNN
instances of the folds are merged by vote (found by enough folds, masks
averaged). Across families, the default ``maps`` rule of
:class:`nucleiseg.inference.predictor.InferenceOptions` fuses them before instances are
made: Mask R-CNN's soft masks, weighted by their scores, are blended into
U-Net++'s body probability, and U-Net++'s watershed makes the nuclei
(:func:`fuse_maps`). The instance-level rules (``nms``, ``vote``, ``agree``,
``fill``) let each family make its own instances first (U-Net++ nuclei scored
by their mean body probability, Mask R-CNN nuclei by their detection score after
its tuned thresholds), merge the two sets and resolve overlaps, so each pixel
belongs to one nucleus (:func:`merge_families`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nucleiseg.data.reading import read_image
from nucleiseg.data.sizing import rescale_factor
from nucleiseg.inference import oof
from nucleiseg.inference.family import Params, Thresholds, get_family, image_thresholds
from nucleiseg.inference.predictor import FoldModel, InferenceOptions
from nucleiseg.models.runs import write_run_info, write_split
from nucleiseg.postprocessing.instances import (
    Instances,
    SoftInstances,
    found_in,
    merge_views,
    resolve_overlaps,
    suppress_duplicates,
)
from nucleiseg.postprocessing.watershed import BODY

log = logging.getLogger(__name__)

# Box IoU of the box stage of the cross-family NMS (the mask IoU decides).
FAMILY_BOX_IOU = 0.7


def merge_families(
    sets: Sequence[SoftInstances], rule: str, iou: float, min_size: int
) -> np.ndarray:
    """Label image from the instance sets of several families.

    Args:
        sets: One set per family, binary masks (as 0/1 soft masks) with scores.
        rule: ``nms``: pool, suppress the lower-scored of two instances whose
            masks overlap by more than ``iou``; ``vote``: instances matched
            across families (mask IoU above ``iou``) become one, masks averaged
            and kept where at least half the families agree, unmatched ones
            stay; ``agree``: as ``vote``, but only nuclei found by every family;
            ``fill``: every nucleus of the first set is kept, and each later set
            adds the nuclei that no earlier set found (none of whose masks
            overlaps them by more than ``iou``), painted after them, so that
            contested pixels go to the earlier set. (The ``maps`` rule of
            :func:`labels_from_raws` works on maps, before instances exist.)
        iou: Mask IoU above which two instances are the same nucleus.
        min_size: Nuclei left with fewer pixels after overlaps are resolved are dropped.

    Returns:
        int32 label image, 0 = background.
    """
    if rule == "nms":
        pooled = SoftInstances.concatenate(list(sets)).binarize(0.5)
        return resolve_overlaps(suppress_duplicates(pooled, FAMILY_BOX_IOU, iou), min_size)
    if rule == "fill":
        found = [sets[0].binarize(0.5)]
        for later in sets[1:]:
            candidates = later.binarize(0.5)
            novel = ~np.any([found_in(candidates, earlier, iou) for earlier in found], axis=0)
            found.append(candidates.subset(novel))
        # Each set is painted after the earlier ones, by score within a set.
        offsets = np.cumsum([0] + [len(f) for f in found[:-1]])
        order = np.concatenate(
            [f.canonical_order() + offset for f, offset in zip(found, offsets, strict=True)]
        )
        return resolve_overlaps(Instances.concatenate(found), min_size, order)
    if rule in ("vote", "agree"):
        min_votes = len(sets) if rule == "agree" else 1
        merged = merge_views(list(sets), iou, min_votes)
        # Averaged binary masks: a pixel is kept where at least half of the matched
        # instances put it (a mean of exactly 0.5 is kept, so just below 0.5).
        return resolve_overlaps(merged.binarize(0.5 - 1e-6), min_size)
    raise ValueError(f"unknown family merge {rule!r}")


def detection_body(detections: SoftInstances) -> np.ndarray:
    """A body probability map from detections: at each pixel, the highest score x mask value.

    Args:
        detections: Soft instances of one image (all of them, before any threshold).

    Returns:
        float32 (H, W) in [0, 1].
    """
    body = np.zeros(detections.shape, np.float32)
    for score, (y0, x0, y1, x1), mask in zip(
        detections.scores, detections.boxes, detections.masks, strict=True
    ):
        np.maximum(body[y0:y1, x0:x1], float(score) * mask, out=body[y0:y1, x0:x1])
    return body


def fuse_maps(maps: np.ndarray, detections: SoftInstances, weight: float) -> np.ndarray:
    """U-Net++ maps with the detector's nuclei blended into the body channel.

    The body map becomes ``(1 - weight) x body + weight x`` :func:`detection_body`;
    border and separation stay U-Net++'s, so the watershed draws the boundaries
    and the detector moves confidence: nuclei both models see get seeds more
    easily, blobs only U-Net++ sees lose them.

    Args:
        maps: U-Net++ probability maps (3, H, W): body, border, separation.
        detections: Mask R-CNN soft instances of the same image.
        weight: Share of the detector in the body map, in [0, 1].

    Returns:
        The fused maps, same shape.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"map weight must be in [0, 1], got {weight}")
    fused = np.array(maps, np.float32, copy=True)
    fused[BODY] = (1.0 - weight) * fused[BODY] + weight * detection_body(detections)
    return fused


def labels_from_raws(
    raws: Mapping[str, Iterable],
    params: Mapping[str, Params],
    options: InferenceOptions | None = None,
) -> np.ndarray:
    """Label image from the raw outputs of several models of one or both families.

    Args:
        raws: Family name -> the raw outputs of its models for one image: a
            sequence, or an iterator that makes them one at a time, so that a
            family's outputs are combined as they come rather than all held.
        params: Family name -> its raw output -> instances thresholds.
        options: The vote and family merge settings.

    Returns:
        int32 label image, 0 = background.
    """
    options = options or InferenceOptions()
    families = [name for name, outputs in raws.items() if outputs]  # in the runs' order
    if not families:
        raise ValueError("no raw outputs to combine")
    missing = [name for name in families if name not in params]
    if missing:
        raise KeyError(f"no thresholds for family {', '.join(missing)}")
    combined = {name: get_family(name).combine(raws[name], options) for name in families}
    if len(families) == 1:
        return get_family(families[0]).to_labels(combined[families[0]], params[families[0]])
    if options.family_merge == "maps":
        if sorted(families) != ["maskrcnn", "unetpp"]:
            raise ValueError(f"the maps merge needs U-Net++ and Mask R-CNN, not {families}")
        fused = fuse_maps(combined["unetpp"], combined["maskrcnn"], options.map_weight)
        return get_family("unetpp").to_labels(fused, params["unetpp"])
    sets = [get_family(name).instances(combined[name], params[name]) for name in families]
    min_size = min(params[name].min_size for name in families)
    return merge_families(sets, options.family_merge, options.family_iou, min_size)


def segment_image(
    models: Sequence[FoldModel],
    image: np.ndarray,
    params: Mapping[str, Thresholds],
    device: torch.device,
    options: InferenceOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Label image of one RGB image from fold models of one or both families.

    With ``options.size_adaptive``, a first pass (one view, same models)
    measures the nuclei, and the image is predicted again at the scale that
    brings them to ``options.size_target`` (:func:`size_adapted_options`).

    Args:
        models: Fold models (see :func:`nucleiseg.inference.predictor.load_fold_models`).
        image: RGB uint8 (H, W, 3).
        params: Family name -> its raw output -> instances thresholds (by modality: the
            image's are used).
        device: Where the models run.
        options: Test-time views, tiling, merge rules and size adaptation.
        progress: Called after each forward pass with the tiles done and the
            tiles to do in all (every model, view and tile; with size
            adaptation the second pass is added once the first has measured).

    Returns:
        int32 label image, 0 = background.
    """
    options = options or InferenceOptions()
    params = image_thresholds(params, image)
    counter = _TileCounter(progress)
    if options.size_adaptive:
        first = dataclasses.replace(options, size_adaptive=False, tta="none", scales=(1.0,))
        counter.plan(models, image.shape[:2], first)
        first_labels = _segment_once(models, image, params, device, first, counter)
        options = size_adapted_options(first_labels, options)
        if options.scales == (1.0,) and options.tta == "none":
            return first_labels
    counter.plan(models, image.shape[:2], options)
    return _segment_once(models, image, params, device, options, counter)


class _TileCounter:
    """Tiles done and to do for one image, passed on to a progress callback."""

    def __init__(self, progress: Callable[[int, int], None] | None) -> None:
        self.progress = progress
        self.done = self.total = 0

    def plan(
        self, models: Sequence[FoldModel], shape: tuple[int, int], options: InferenceOptions
    ) -> None:
        for member in models:
            family = get_family(member.config.model)
            self.total += family.tile_count(shape, member.config, options)

    def __call__(self, tiles: int) -> None:
        self.done += tiles
        if self.progress is not None:
            self.progress(self.done, self.total)


def size_adapted_options(first_labels: np.ndarray, options: InferenceOptions) -> InferenceOptions:
    """The options of the second pass: every scale times the first pass's rescale factor.

    Args:
        first_labels: Label image of the first pass.
        options: Options with ``size_adaptive`` set.

    Returns:
        Options without ``size_adaptive``, scales multiplied by
        :func:`nucleiseg.data.sizing.rescale_factor`.
    """
    factor = rescale_factor(first_labels, options.size_target, options.size_tolerance)
    scales = tuple(scale * factor for scale in options.scales)
    return dataclasses.replace(options, size_adaptive=False, scales=scales)


def _segment_once(
    models: Sequence[FoldModel],
    image: np.ndarray,
    params: Mapping[str, Params],
    device: torch.device,
    options: InferenceOptions,
    progress: Callable[[int], None],
) -> np.ndarray:
    by_family: dict[str, list[FoldModel]] = {}
    for member in models:
        by_family.setdefault(member.config.model, []).append(member)

    def outputs(family: str) -> Iterator:
        for member in by_family[family]:
            yield get_family(family).predict(
                member.model, image, member.config, device, options, progress
            )

    return labels_from_raws({name: outputs(name) for name in by_family}, params, options)


def segment_each(
    models: Sequence[FoldModel],
    items: Iterable[tuple[str, np.ndarray, InferenceOptions]],
    params: Mapping[str, Thresholds],
    device: torch.device,
    total: int | None = None,
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Label image of each image as it comes (see :func:`segment_image`), with a progress bar.

    The bar counts images and moves with the tiles of the image being segmented.

    Args:
        models: Fold models.
        items: (id, RGB uint8 image, options) of each image, made as they are needed.
        params: Family name -> thresholds.
        device: Where the models run.
        total: Number of images, for the bar (None: unknown).

    Yields:
        (id, RGB image, int32 label image) of each image, in order.
    """
    with tqdm(total=total, desc="predict", unit="image") as bar:
        for done, (image_id, image, options) in enumerate(items):

            def progress(tiles: int, tiles_total: int, done=done) -> None:
                # A fraction of the image per tile, so a long image moves the bar.
                bar.n = round(done + tiles / tiles_total, 2)
                bar.set_postfix_str(f"tiles {tiles}/{tiles_total}", refresh=False)
                bar.refresh()

            labels = segment_image(models, image, params, device, options, progress)
            bar.n = done + 1
            bar.refresh()
            yield image_id, image, labels


def segment_images(
    models: Sequence[FoldModel],
    images: Mapping[str, Path],
    params: Mapping[str, Thresholds],
    device: torch.device,
    options: InferenceOptions | None = None,
    on_labels: Callable[[str, np.ndarray, np.ndarray], None] | None = None,
) -> dict[str, np.ndarray]:
    """Label images of image files (see :func:`segment_each`), with a progress bar.

    Args:
        models: Fold models.
        images: Image id -> image file (see :func:`nucleiseg.data.reading.find_images`).
        params: Family name -> thresholds.
        device: Where the models run.
        options: Test-time views, tiling and merge rules.
        on_labels: Called as each image is done, with its id, the RGB image
            and its label image (to write them as they come).

    Returns:
        Image id -> int32 label image.
    """
    items = ((image_id, read_image(path), options) for image_id, path in images.items())
    labels = {}
    for image_id, image, found in segment_each(models, items, params, device, len(images)):
        labels[image_id] = found
        if on_labels is not None:
            on_labels(image_id, image, found)
    return labels


def write_out_of_fold(
    models: Sequence[FoldModel],
    images: Mapping[str, Path],
    fold_of: Mapping[str, int],
    params: Mapping[str, Thresholds],
    device: torch.device,
    out_dir: Path,
    data_dir: Path,
    options: InferenceOptions | None = None,
    on_labels: Callable[[str, np.ndarray, np.ndarray], None] | None = None,
) -> dict[int, tuple[dict[str, np.ndarray], float]]:
    """Each training image segmented by the models of its own fold only, written as a run folder.

    ``out_dir/fold<K>/`` gets a ``run.yaml`` and ``oof/labels/``, the layout
    :func:`nucleiseg.evaluation.summary.evaluate_run` scores, and a
    ``split.csv`` when every model of the fold recorded its own: the images
    they trained on, and those predicted here as held out.

    Args:
        models: Fold models of one or more runs (several per fold for an ensemble).
        images: Image id -> image file.
        fold_of: Image id -> the fold it is held out in.
        params: Family name -> thresholds.
        device: Where the models run.
        out_dir: The run folder to write.
        data_dir: The dataset the images come from (recorded in ``run.yaml``).
        options: Test-time views, tiling and merge rules.
        on_labels: As for :func:`segment_images`, after the label image is saved.

    Returns:
        Fold -> (image id -> label image, seconds the fold's images took).

    Raises:
        ValueError: If an image's fold has no model.
    """
    by_fold: dict[int, list[FoldModel]] = {}
    for member in models:
        by_fold.setdefault(member.fold, []).append(member)
    orphans = sorted({fold_of[i] for i in images} - set(by_fold))
    if orphans:
        raise ValueError(f"no model was held out of folds {orphans}; they cannot be scored")
    families = {m.config.model for m in models}

    def save(image_id: str, image: np.ndarray, labels: np.ndarray) -> None:
        oof.save_prediction(out_dir / f"fold{fold_of[image_id]}", image_id, None, labels)
        if on_labels is not None:
            on_labels(image_id, image, labels)

    results = {}
    for fold, members in sorted(by_fold.items()):
        fold_images = {i: p for i, p in images.items() if fold_of[i] == fold}
        if not fold_images:
            continue
        if {m.config.model for m in members} != families:
            log.warning("fold %d lacks some families' models; its images use the others", fold)
        amp = any(m.config.amp for m in members)
        write_run_info(out_dir / f"fold{fold}", fold, data_dir, device, amp)
        if all(m.split is not None for m in members):
            trained = {i for m in members for i in m.split.training}
            write_split(out_dir / f"fold{fold}", trained, fold_images)
        started = time.perf_counter()
        labels = segment_images(members, fold_images, params, device, options, save)
        results[fold] = (labels, time.perf_counter() - started)
    return results
