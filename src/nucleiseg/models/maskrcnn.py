"""Mask R-CNN for nuclei: the torchvision model set up for small dense objects, its
training targets, and its detections as scored instances.

torchvision's defaults are made for COCO photographs: images resized so that
the short side is 800 px, 100 detections per image, anchors from 32 px up.
Here an image keeps its pixel size unless it is small, in which case it is
upsampled (see :func:`input_scale`); large images are never shrunk, since
their nuclei are no bigger per pixel than those of small ones. The model's own
resizing and mask pasting are switched off: scaling happens outside, so the
same rule serves training crops, whole images and tiles, and masks are pasted
into their boxes only (memory follows the nuclei, not nuclei x image size).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from nucleiseg.data.reading import Sample
from nucleiseg.data.sizing import resize_image
from nucleiseg.postprocessing.instances import SoftInstances

BACKBONES = ("resnet18", "resnet34", "resnet50")
# Levels of the FPN: ResNet stages 1-4 (strides 4 to 32) and a max-pooled stride-64 level.
FPN_LEVELS = 5


@dataclass
class MaskRCNNParams:
    """Settings of the Mask R-CNN, chosen for nuclei rather than COCO objects.

    Attributes:
        anchor_sizes: One anchor side per FPN level, whose strides are 4, 8, 16,
            32 and 64 px. Nuclei are 4 to about 100 px across; after small
            images are upsampled (``input_side``) few are below 8 px, and an
            8 px anchor still matches a 4 px nucleus as its best anchor.
        aspect_ratios: Anchor height/width ratios at every level; nuclei are
            round to elongated.
        fpn_channels: Width of the FPN and of the heads' input. 128 rather than
            COCO's 256: on a CPU the heads, run on hundreds of regions per
            image, cost more than the backbone, and two classes need less width.
        box_head_dim: Width of the two fully connected box-head layers (COCO: 1024).
        mask_head_channels: Width of the four mask-head convolutions (COCO: 256).
        rpn_pre_nms_top_n_train: Proposals per FPN level kept before the RPN's NMS
            in training; with ``rpn_post_nms_top_n_train`` this is above the
            densest training image's 375 nuclei several times over, so that
            every nucleus has proposals.
        rpn_post_nms_top_n_train: Proposals kept after the RPN's NMS in training.
        rpn_pre_nms_top_n_test: As above, at inference.
        rpn_post_nms_top_n_test: As above, at inference.
        rpn_batch_size_per_image: Anchors sampled per image for the RPN loss.
        box_batch_size_per_image: Proposals sampled per image for the box and
            mask losses (COCO: 512; 256 halves the heads' cost, and a quarter
            of them, 64, may be nuclei).
        box_detections_per_img: Detections kept per image: the training set has
            up to 375 nuclei in one image, and an upsampled image or a tile
            stitched with its neighbours may hold more.
        box_score_thresh: Detections scoring below this are not returned; kept
            low so that the instance step (``InstanceParams``) decides.
        box_nms_thresh: Box IoU of the model's own per-class NMS. Touching
            nuclei rarely overlap this much as boxes.
        input_side: Images whose shorter side is below this many pixels are
            upsampled towards it (see :func:`input_scale`).
        max_upscale: Largest upsampling factor.
    """

    anchor_sizes: tuple[int, ...] = (8, 16, 32, 64, 128)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    fpn_channels: int = 128
    box_head_dim: int = 512
    mask_head_channels: int = 128
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 2000
    rpn_post_nms_top_n_test: int = 1500
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 256
    box_detections_per_img: int = 600
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    input_side: int = 512
    max_upscale: float = 2.0


class _BatchOnlyTransform(GeneralizedRCNNTransform):
    """Batches images padded to a multiple of 32 and does nothing else.

    Inputs are already normalized by :func:`nucleiseg.data.dataset.to_tensor` and
    already at the scale wanted; outputs keep the boxes in input pixels and the
    masks as the head's 28 x 28 probabilities, pasted later into their boxes
    (:func:`paste_masks`) rather than into full-image arrays.
    """

    def __init__(self) -> None:
        super().__init__(min_size=1, max_size=1, image_mean=[0.0] * 3, image_std=[1.0] * 3)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def resize(self, image, target=None):
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        return result


# Under autocast the heads' convolutions and linear layers give bfloat16 (CPU) or
# float16 (CUDA), and torchvision decodes proposals and boxes in the dtype of the
# regression output. bfloat16 keeps 8 significant bits: a box edge between 256
# and 512 px lands on a multiple of 2 px, beyond 512 on a multiple of 4, for
# nuclei 10 to 40 px across. So the heads hand float32 to everything after them:
# anchors are decoded, proposals ranked and boxes, scores and masks computed in
# float32; only the layers run in low precision. Parameter names are
# torchvision's, so weights load either way.


class _Float32RPNHead(RPNHead):
    def forward(self, x):
        objectness, deltas = super().forward(x)
        return [o.float() for o in objectness], [d.float() for d in deltas]


class _Float32BoxPredictor(FastRCNNPredictor):
    def forward(self, x):
        scores, deltas = super().forward(x)
        return scores.float(), deltas.float()


class _Float32MaskPredictor(MaskRCNNPredictor):
    def forward(self, x):
        return super().forward(x).float()


class NucleusMaskRCNN(MaskRCNN):
    """torchvision's Mask R-CNN, with an inference entry point for the tiles of a large image.

    :meth:`detect` runs torchvision's own stages (``GeneralizedRCNN.forward``
    and ``RoIHeads.forward`` in eval mode), in the same order, so that with its
    defaults the output is the model's; it can scale the proposal and
    detection counts to a tile's area and run the mask head, the costliest
    stage for dense nuclei, only on the detections a tile answers for.
    """

    @torch.no_grad()
    def detect(
        self,
        images: list[torch.Tensor],
        keep: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None = None,
        count_scale: float = 1.0,
    ) -> list[dict[str, torch.Tensor]]:
        """Detections of a batch in eval mode, the mask head run only on the boxes kept.

        Args:
            images: Network inputs (3, h, w) on the model's device.
            keep: One function per image: given its detected boxes (x0, y0,
                x1, y1, on the CPU), which of them to keep and mask; None keeps all.
            count_scale: Factor on the test-time proposal counts (before and
                after the RPN's NMS) and on the detections per image.

        Returns:
            Per image ``boxes``, ``scores`` and ``masks`` (N, 1, M, M) of the kept
            detections, as the model's own output.
        """
        with self._counts(count_scale):
            batch, _ = self.transform(images)
            features = self.backbone(batch.tensors)
            proposals, _ = self.rpn(batch, features)
            heads, sizes = self.roi_heads, batch.image_sizes
            box_features = heads.box_head(heads.box_roi_pool(features, proposals, sizes))
            class_logits, box_regression = heads.box_predictor(box_features)
            boxes, scores, labels = heads.postprocess_detections(
                class_logits, box_regression, proposals, sizes
            )
        if keep is not None:
            kept = [k(b.cpu()).to(b.device) for k, b in zip(keep, boxes, strict=True)]
            boxes = [b[k] for b, k in zip(boxes, kept, strict=True)]
            scores = [s[k] for s, k in zip(scores, kept, strict=True)]
            labels = [c[k] for c, k in zip(labels, kept, strict=True)]
        mask_features = heads.mask_head(heads.mask_roi_pool(features, boxes, sizes))
        masks = maskrcnn_inference(heads.mask_predictor(mask_features), labels)
        return [
            {"boxes": b, "scores": s, "masks": m}
            for b, s, m in zip(boxes, scores, masks, strict=True)
        ]

    @contextlib.contextmanager
    def _counts(self, scale: float) -> Iterator[None]:
        """The test-time proposal and detection counts times ``scale``, in the block."""
        rpn, heads = self.rpn, self.roi_heads
        pre, post, detections = rpn._pre_nms_top_n, rpn._post_nms_top_n, heads.detections_per_img
        if scale != 1.0:
            rpn._pre_nms_top_n = {**pre, "testing": math.ceil(pre["testing"] * scale)}
            rpn._post_nms_top_n = {**post, "testing": math.ceil(post["testing"] * scale)}
            heads.detections_per_img = math.ceil(detections * scale)
        try:
            yield
        finally:
            rpn._pre_nms_top_n, rpn._post_nms_top_n = pre, post
            heads.detections_per_img = detections


def _resnet_fpn(name: str, channels: int) -> BackboneWithFPN:
    """A ResNet with batch norm (trainable from scratch, unlike torchvision's frozen
    statistics for pretrained backbones) and an FPN over its four stages plus a pooled level."""
    if name not in BACKBONES:
        raise KeyError(f"unknown Mask R-CNN backbone {name!r}; choose from {', '.join(BACKBONES)}")
    body = getattr(resnet, name)(weights=None, norm_layer=nn.BatchNorm2d)
    expansion = 1 if name in ("resnet18", "resnet34") else 4
    stage_channels = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]
    return BackboneWithFPN(
        body,
        return_layers={f"layer{i}": str(i - 1) for i in range(1, 5)},
        in_channels_list=stage_channels,
        out_channels=channels,
        extra_blocks=LastLevelMaxPool(),
    )


def build_maskrcnn(backbone: str, params: MaskRCNNParams) -> NucleusMaskRCNN:
    """A two-class (background, nucleus) Mask R-CNN with a ResNet-FPN backbone.

    Args:
        backbone: ``resnet18``, ``resnet34`` or ``resnet50``.
        params: Anchors, head widths and detection counts.

    Returns:
        The model. In training mode it takes a list of (3, H, W) tensors and
        targets (see :func:`detection_targets`) and returns a dict of losses;
        in eval mode it returns per image ``boxes`` (x0, y0, x1, y1 in input
        pixels), ``scores`` and ``masks`` (N, 1, 28, 28) probabilities in the boxes;
        :meth:`NucleusMaskRCNN.detect` does the same for the tiles of a large image.
    """
    if len(params.anchor_sizes) != FPN_LEVELS:
        raise ValueError(f"anchor_sizes needs one size per FPN level ({FPN_LEVELS})")
    fpn = _resnet_fpn(backbone, params.fpn_channels)
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in params.anchor_sizes),
        aspect_ratios=(tuple(params.aspect_ratios),) * FPN_LEVELS,
    )
    box_head = TwoMLPHead(params.fpn_channels * 7 * 7, params.box_head_dim)
    width = params.mask_head_channels
    model = NucleusMaskRCNN(
        fpn,
        num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_head=_Float32RPNHead(params.fpn_channels, anchors.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_train=params.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=params.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=params.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=params.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=params.rpn_batch_size_per_image,
        box_head=box_head,
        box_predictor=_Float32BoxPredictor(params.box_head_dim, 2),
        box_batch_size_per_image=params.box_batch_size_per_image,
        box_detections_per_img=params.box_detections_per_img,
        box_score_thresh=params.box_score_thresh,
        box_nms_thresh=params.box_nms_thresh,
        mask_head=MaskRCNNHeads(params.fpn_channels, (width,) * 4, dilation=1),
        mask_predictor=_Float32MaskPredictor(width, width, 2),
    )
    model.transform = _BatchOnlyTransform()
    return model


def input_scale(shape: tuple[int, int], params: MaskRCNNParams) -> float:
    """The factor an image of this (H, W) is resized by before the network.

    Small images are upsampled so that the shorter side reaches ``input_side``
    (at most by ``max_upscale``); others keep their size. In this data small
    images are crops of high-magnification fields whose nuclei are small in
    pixels, and the finest FPN level (stride 4) resolves them better when
    they are larger.
    """
    return float(min(params.max_upscale, max(1.0, params.input_side / min(shape))))


def rescale_sample(sample: Sample, params: MaskRCNNParams) -> Sample:
    """The sample at its input scale: image bilinear, labels nearest (no label is invented)."""
    scale = input_scale(sample.image.shape[:2], params)
    if scale == 1.0:
        return sample
    image = resize_image(sample.image, scale)
    labels = None
    if sample.labels is not None:
        size = (image.shape[1], image.shape[0])
        labels = cv2.resize(sample.labels, size, interpolation=cv2.INTER_NEAREST_EXACT)
    return Sample(sample.image_id, image, labels)


def detection_targets(labels: np.ndarray) -> dict[str, torch.Tensor]:
    """Mask R-CNN targets of a label image (a training crop or a whole image).

    Every nucleus with at least one pixel in the crop is a target, with the box
    and mask of its visible part; a crop with no nucleus gives empty targets,
    which torchvision trains on as background only.

    Args:
        labels: int label image (H, W), 0 = background.

    Returns:
        ``boxes`` float32 (N, 4) as x0, y0, x1, y1 with exclusive ends,
        ``labels`` int64 (N,) all 1, ``masks`` uint8 (N, H, W).
    """
    labels = np.asarray(labels)
    slices = ndimage.find_objects(labels)
    ids = [i + 1 for i, s in enumerate(slices) if s is not None]
    boxes = np.array(
        [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in slices if s is not None],
        np.float32,
    ).reshape(-1, 4)
    masks = labels[None] == np.asarray(ids, labels.dtype)[:, None, None]
    return {
        "boxes": torch.from_numpy(boxes),
        "labels": torch.ones(len(ids), dtype=torch.int64),
        "masks": torch.from_numpy(masks.astype(np.uint8)),
    }


def paste_masks(
    boxes: np.ndarray,
    masks: np.ndarray,
    shape: tuple[int, int],
    scale: float | tuple[float, float] = 1.0,
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Sample each head mask at the pixels its box covers, in the original image.

    The head learns its M x M mask from targets cut by torchvision's RoIAlign
    (``aligned=False``), which samples bin ``i`` at ``x0 + (i + 0.5) (x1 - x0) / M``
    in coordinates where pixel ``j``'s centre is at ``j``. Image pixel ``x``
    (centre ``(x + 0.5) * scale - 0.5`` in those coordinates of the network
    input) therefore reads the mask at ``((x + 0.5) * scale - 0.5 - x0) * M /
    (x1 - x0) - 0.5``, bilinearly; the crop covers the box only.

    Args:
        boxes: float (N, 4) x0, y0, x1, y1 in network-input pixels.
        masks: float (N, M, M) probabilities.
        shape: (H, W) of the original image.
        scale: Network input / original image size, one factor or (rows, columns).

    Returns:
        Integer boxes (N, 4) as y0, x0, y1, x1 (exclusive ends) in the original
        image, and one float32 probability crop per box. Boxes that fall
        outside the image come out with zero size and an empty crop.
    """
    height, width = shape
    size = masks.shape[-1]
    scale_y, scale_x = (scale, scale) if np.isscalar(scale) else scale
    int_boxes = np.zeros((len(boxes), 4), np.int64)
    crops = []
    for k, ((x0, y0, x1, y1), mask) in enumerate(zip(boxes, masks, strict=True)):
        left, top = max(0, math.floor(x0 / scale_x)), max(0, math.floor(y0 / scale_y))
        right = min(width, math.ceil(x1 / scale_x))
        bottom = min(height, math.ceil(y1 / scale_y))
        right, bottom = max(right, left), max(bottom, top)
        int_boxes[k] = (top, left, bottom, right)
        if right == left or bottom == top:
            crops.append(np.zeros((bottom - top, right - left), np.float32))
            continue
        per_x, per_y = size / max(x1 - x0, 1e-6), size / max(y1 - y0, 1e-6)
        # Crop pixel (c, r) is image pixel (left + c, top + r).
        matrix = np.array(
            [
                [scale_x * per_x, 0.0, ((left + 0.5) * scale_x - 0.5 - x0) * per_x - 0.5],
                [0.0, scale_y * per_y, ((top + 0.5) * scale_y - 0.5 - y0) * per_y - 0.5],
            ]
        )
        crops.append(
            cv2.warpAffine(
                mask.astype(np.float32),
                matrix,
                (right - left, bottom - top),
                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                # Pixels within half a bin of the box edge take the edge bin's value.
                borderMode=cv2.BORDER_REPLICATE,
            )
        )
    return int_boxes, tuple(crops)


def detections_to_instances(
    boxes: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray,
    shape: tuple[int, int],
    scale: float | tuple[float, float] = 1.0,
) -> SoftInstances:
    """Detections (boxes x0, y0, x1, y1 and M x M masks in network-input pixels) as
    scored soft instances in the original image (see :func:`paste_masks`)."""
    int_boxes, crops = paste_masks(boxes, masks, shape, scale)
    keep = np.array([c.size > 0 for c in crops], bool)
    return SoftInstances(
        tuple(shape),
        np.asarray(scores, np.float32)[keep],
        int_boxes[keep],
        tuple(c for c, k in zip(crops, keep, strict=True) if k),
    )
