"""Mask R-CNN inference: input scaling, tiles, test-time views, and their merging.

Each view of an image (a scale times a D4 transform) is resized to the
network's input scale, transformed, and detected whole or tile by tile. Its
boxes and 28 x 28 masks are brought back to the image exactly (D4 moves
pixels, the scale is undone when the masks are pasted), and the views'
instances are merged by vote (:func:`nucleiseg.postprocessing.instances.merge_views`).

Detection counts follow the area: the proposal and detection counts of
:class:`nucleiseg.models.maskrcnn.MaskRCNNParams` hold for a view of up to
:data:`CAP_PIXELS` pixels, a larger view gets them in proportion to its area,
and a tile gets its view's counts in proportion to its share of the view's
area, so that a tiled view is searched as densely as the whole view.

Tiles: the backbone, the region proposals and the box head run on every tile,
but the mask head, the costliest part for dense nuclei, runs only on the
detections a tile answers for: those whose box centre lies in the tile's core
(:class:`nucleiseg.inference.tiling.Tile`, widened by :data:`CORE_MARGIN`) and that no
inner tile edge cuts. A nucleus is therefore masked by one tile, whole when
the overlap exceeds it; the few found by two tiles near a core's edge are
reduced to one by mask-IoU non-maximum suppression, once per view.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from nucleiseg.data.dataset import to_tensor
from nucleiseg.data.sizing import resize_image
from nucleiseg.inference import tta
from nucleiseg.inference.predictor import InferenceOptions
from nucleiseg.inference.tiling import Tile, batches, count_tiles, tiles
from nucleiseg.models.maskrcnn import MaskRCNNParams, detections_to_instances, input_scale
from nucleiseg.models.precision import autocast
from nucleiseg.postprocessing.instances import SoftInstances, merge_views, nms_indices

# A box within this many pixels of an inner tile edge belongs to a cut nucleus.
CUT_MARGIN = 2
# A tile answers for the boxes centred up to this many pixels outside its core, so
# that a nucleus on the line between two cores, whose centre the two tiles place a
# pixel apart, is kept by at least one of them (and by both at worst).
CORE_MARGIN = 4
# Mask IoU above which two tiles' instances are the same nucleus.
TILE_DUPLICATE_IOU = 0.5
# The largest view (pixels) searched with the model's own proposal and detection
# counts: every training image (the largest, 1040 x 1388, has 1.44 million) and a
# 1000 x 1000 tissue tile keep the counts they were tuned with.
CAP_PIXELS = 1_500_000
# Peak memory of a Mask R-CNN (ResNet-18 FPN) forward pass per input pixel, float32:
# measured 820 B on a whole 1 MP H&E image (the heads on 1500 proposals weigh most)
# and 250 B on 4 MP with the counts of 1 MP; with the counts growing with the area
# above CAP_PIXELS, about 600 B.
MASKRCNN_BYTES_PER_PIXEL = 600


def _outputs(output: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        output["boxes"].float().cpu().numpy().reshape(-1, 4),
        output["scores"].float().cpu().numpy(),
        output["masks"][:, 0].float().cpu().numpy(),
    )


def count_share(view_pixels: int, tile_pixels: int) -> float:
    """Factor on the model's proposal and detection counts for a tile of a view.

    Args:
        view_pixels: Pixels of the whole view.
        tile_pixels: Pixels of the tile (the view's, for a whole-view pass).

    Returns:
        ``max(1, view_pixels / CAP_PIXELS) x tile_pixels / view_pixels``: 1 for
        a whole view up to :data:`CAP_PIXELS`.
    """
    return max(1.0, view_pixels / CAP_PIXELS) * tile_pixels / view_pixels


def _answered_for(t: Tile, view_shape: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Which of a tile's boxes (x0, y0, x1, y1 in tile pixels) the tile answers for."""
    height, width = view_shape
    y0, x0, y1, x1 = t.core

    def answered(boxes: torch.Tensor) -> torch.Tensor:
        cut = torch.zeros(len(boxes), dtype=torch.bool)
        if t.x > 0:
            cut |= boxes[:, 0] < CUT_MARGIN
        if t.y > 0:
            cut |= boxes[:, 1] < CUT_MARGIN
        if t.x + t.width < width:
            cut |= boxes[:, 2] > t.width - CUT_MARGIN
        if t.y + t.height < height:
            cut |= boxes[:, 3] > t.height - CUT_MARGIN
        centre_x = (boxes[:, 0] + boxes[:, 2]) / 2 + t.x
        centre_y = (boxes[:, 1] + boxes[:, 3]) / 2 + t.y
        inside = (
            (centre_x >= x0 - CORE_MARGIN)
            & (centre_x < x1 + CORE_MARGIN)
            & (centre_y >= y0 - CORE_MARGIN)
            & (centre_y < y1 + CORE_MARGIN)
        )
        return ~cut & inside

    return answered


@torch.no_grad()
def detect_view(
    model: nn.Module,
    view: np.ndarray,
    device: torch.device,
    amp: bool,
    tile: int | None = None,
    overlap: int = 128,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Raw detections of one view, whole or tile by tile.

    Args:
        model: Mask R-CNN in eval mode (see :class:`nucleiseg.models.maskrcnn.NucleusMaskRCNN`).
        view: RGB uint8 (H, W, 3), already at the network's input scale.
        device: Where to run.
        amp: Use mixed precision.
        tile: Tile side, or None for the whole view.
        overlap: Pixels shared by neighbouring tiles.
        batch_size: Tiles per forward pass.
        progress: Called with the number of tiles each forward pass covered
            (1 for the whole view).

    Returns:
        boxes (N, 4) x0, y0, x1, y1 in view pixels, scores (N,), masks
        (N, M, M), and whether tiles were used.
    """
    height, width = view.shape[:2]
    if tile is None or (height <= tile and width <= tile):
        share = count_share(height * width, height * width)
        with autocast(device, amp):
            found = model.detect([to_tensor(view).to(device)], count_scale=share)[0]
        if progress is not None:
            progress(1)
        return (*_outputs(found), False)
    layout = tiles((height, width), tile, overlap)
    share = count_share(height * width, layout[0].height * layout[0].width)
    found = []
    for group in batches(layout, batch_size):
        batch = [to_tensor(view[t.window()]).to(device) for t in group]
        answered = [_answered_for(t, (height, width)) for t in group]
        with autocast(device, amp):
            outputs = model.detect(batch, answered, share)
        for t, output in zip(group, outputs, strict=True):
            boxes, scores, masks = _outputs(output)
            found.append((boxes + [t.x, t.y, t.x, t.y], scores, masks))
        if progress is not None:
            progress(len(group))
    boxes, scores, masks = (np.concatenate(parts) for parts in zip(*found, strict=True))
    return boxes, scores, masks, True


def remove_tile_duplicates(instances: SoftInstances) -> SoftInstances:
    """One instance per nucleus found whole by two overlapping tiles (mask IoU NMS)."""
    binary, index = instances.binarize_indexed(0.5)
    keep = nms_indices(binary, box_iou_threshold=1.0, mask_iou_threshold=TILE_DUPLICATE_IOU)
    return instances.subset(np.sort(index[keep]))


def _view_tiling(
    image_shape: tuple[int, int], params: MaskRCNNParams, options: InferenceOptions
) -> Iterator[tuple[float, tta.Transform, tuple[int, int], int | None, int]]:
    """Each view's scale, transform, shape at the network's input scale, tile and batch."""
    base = input_scale(image_shape, params)
    for scale, transform in options.views():
        shape = tta.view_shape(image_shape, base * scale, transform)
        yield (scale, transform, shape, *options.tiling(shape, MASKRCNN_BYTES_PER_PIXEL))


def tile_count(
    image_shape: tuple[int, int], params: MaskRCNNParams, options: InferenceOptions | None = None
) -> int:
    """Forward passes :func:`detect` makes for an image of this (H, W)."""
    options = options or InferenceOptions()
    return sum(
        count_tiles(shape, tile, options.overlap)
        for _, _, shape, tile, _ in _view_tiling(image_shape, params, options)
    )


def detect(
    model: nn.Module,
    image: np.ndarray,
    params: MaskRCNNParams,
    device: torch.device,
    amp: bool = False,
    options: InferenceOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> SoftInstances:
    """Scored soft instances of one RGB image, over every test-time view.

    Args:
        model: Mask R-CNN in eval mode.
        image: RGB uint8 (H, W, 3).
        params: The model's settings (its input scale rule).
        device: Where to run.
        amp: Use mixed precision.
        options: Views, tiling and vote; None is one whole-image view.
        progress: Called with the number of tiles each forward pass covered
            (see :func:`tile_count` for their total).

    Returns:
        Instances in the image's pixels; with several views, those found in
        at least ``ceil(vote_fraction x views)`` of them, merged.
    """
    options = options or InferenceOptions()
    model.eval()
    base = input_scale(image.shape[:2], params)
    views = []
    for scale, transform, _, tile, batch_size in _view_tiling(image.shape[:2], params, options):
        scaled = resize_image(image, base * scale)
        factors = (scaled.shape[0] / image.shape[0], scaled.shape[1] / image.shape[1])
        view = tta.apply(scaled, transform)
        boxes, scores, masks, tiled = detect_view(
            model, view, device, amp, tile, options.overlap, batch_size, progress
        )
        boxes = tta.invert_boxes(boxes, view.shape[:2], transform)
        masks = tta.invert_maps(masks, transform)
        found = detections_to_instances(boxes, scores, masks, image.shape[:2], factors)
        views.append(remove_tile_duplicates(found) if tiled else found)
    if len(views) == 1:
        return views[0]
    min_votes = max(1, math.ceil(options.vote_fraction * len(views)))
    return merge_views(views, options.vote_iou, min_votes)
