"""Mask R-CNN inference: input scaling, tiles, test-time views, and their merging.

Each view of an image (a scale times a D4 transform) is resized to the
network's input scale, transformed, and detected whole or tile by tile. Its
boxes and 28 x 28 masks are brought back to the image exactly (D4 moves
pixels, the scale is undone when the masks are pasted), and the views'
instances are merged by vote (:func:`nucleiseg.instances.merge_views`).

Tiles: a nucleus cut by a tile edge that is not the image's edge is dropped
from that tile, since a neighbouring tile, overlapping it by more than a
nucleus, holds it whole; nuclei found whole by two tiles are then reduced to
one by mask-IoU non-maximum suppression.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from nucleiseg import tta
from nucleiseg.dataset import to_tensor
from nucleiseg.inference import InferenceOptions
from nucleiseg.instances import SoftInstances, merge_views, nms_indices
from nucleiseg.maskrcnn import MaskRCNNParams, detections_to_instances, input_scale
from nucleiseg.precision import autocast
from nucleiseg.tiling import batches, tiles

# A box within this many pixels of an inner tile edge belongs to a cut nucleus.
CUT_MARGIN = 2
# Mask IoU above which two tiles' instances are the same nucleus.
TILE_DUPLICATE_IOU = 0.5


def _outputs(output: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        output["boxes"].float().cpu().numpy().reshape(-1, 4),
        output["scores"].float().cpu().numpy(),
        output["masks"][:, 0].float().cpu().numpy(),
    )


@torch.no_grad()
def detect_view(
    model: nn.Module,
    view: np.ndarray,
    device: torch.device,
    amp: bool,
    tile: int | None = None,
    overlap: int = 128,
    batch_size: int = 4,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Raw detections of one view, whole or tile by tile.

    Args:
        model: Mask R-CNN in eval mode (see :func:`nucleiseg.maskrcnn.build_maskrcnn`).
        view: RGB uint8 (H, W, 3), already at the network's input scale.
        device: Where to run.
        amp: Use mixed precision.
        tile: Tile side, or None for the whole view.
        overlap: Pixels shared by neighbouring tiles.
        batch_size: Tiles per forward pass.

    Returns:
        boxes (N, 4) x0, y0, x1, y1 in view pixels, scores (N,), masks
        (N, M, M), and whether tiles were used.
    """
    height, width = view.shape[:2]
    image = to_tensor(view)
    if tile is None or (height <= tile and width <= tile):
        with autocast(device, amp):
            return (*_outputs(model([image.to(device)])[0]), False)
    layout = tiles((height, width), tile, overlap)
    found = []
    for group in batches(layout, batch_size):
        batch = [image[(slice(None), *t.window())].to(device) for t in group]
        with autocast(device, amp):
            outputs = model(batch)
        for t, output in zip(group, outputs, strict=True):
            boxes, scores, masks = _outputs(output)
            cut = np.zeros(len(boxes), bool)
            if t.x > 0:
                cut |= boxes[:, 0] < CUT_MARGIN
            if t.y > 0:
                cut |= boxes[:, 1] < CUT_MARGIN
            if t.x + t.width < width:
                cut |= boxes[:, 2] > t.width - CUT_MARGIN
            if t.y + t.height < height:
                cut |= boxes[:, 3] > t.height - CUT_MARGIN
            keep = ~cut
            found.append((boxes[keep] + [t.x, t.y, t.x, t.y], scores[keep], masks[keep]))
    boxes, scores, masks = (np.concatenate(parts) for parts in zip(*found, strict=True))
    return boxes, scores, masks, True


def remove_tile_duplicates(instances: SoftInstances) -> SoftInstances:
    """One instance per nucleus found whole by two overlapping tiles (mask IoU NMS)."""
    binary, index = instances.binarize_indexed(0.5)
    keep = nms_indices(binary, box_iou_threshold=1.0, mask_iou_threshold=TILE_DUPLICATE_IOU)
    return instances.subset(np.sort(index[keep]))


def detect(
    model: nn.Module,
    image: np.ndarray,
    params: MaskRCNNParams,
    device: torch.device,
    amp: bool = False,
    options: InferenceOptions | None = None,
) -> SoftInstances:
    """Scored soft instances of one RGB image, over every test-time view.

    Args:
        model: Mask R-CNN in eval mode.
        image: RGB uint8 (H, W, 3).
        params: The model's settings (its input scale rule).
        device: Where to run.
        amp: Use mixed precision.
        options: Views, tiling and vote; None is one whole-image view.

    Returns:
        Instances in the image's pixels; with several views, those found in
        at least ``ceil(vote_fraction x views)`` of them, merged.
    """
    options = options or InferenceOptions()
    model.eval()
    base = input_scale(image.shape[:2], params)
    views = []
    for scale, transform in options.views():
        scaled = tta.resize_image(image, base * scale)
        factors = (scaled.shape[0] / image.shape[0], scaled.shape[1] / image.shape[1])
        view = tta.apply(scaled, transform)
        boxes, scores, masks, tiled = detect_view(
            model, view, device, amp, options.tile, options.overlap, options.batch_size
        )
        boxes = tta.invert_boxes(boxes, view.shape[:2], transform)
        masks = tta.invert_maps(masks, transform)
        found = detections_to_instances(boxes, scores, masks, image.shape[:2], factors)
        views.append(remove_tile_duplicates(found) if tiled else found)
    if len(views) == 1:
        return views[0]
    min_votes = max(1, math.ceil(options.vote_fraction * len(views)))
    return merge_views(views, options.vote_iou, min_votes)
