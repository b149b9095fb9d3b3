"""The Mask R-CNN family: targets, model, mask pasting, soft instances and their OOF files."""

import numpy as np
import pytest
import torch
from helpers import tiny_maskrcnn_config
from skimage.draw import disk
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead

from nucleiseg.competition.metric import average_precision
from nucleiseg.data.dataset import to_tensor
from nucleiseg.data.reading import Sample
from nucleiseg.inference import oof
from nucleiseg.inference.family import get_family
from nucleiseg.models.build import build_model, load_weights
from nucleiseg.models.maskrcnn import (
    MaskRCNNParams,
    detection_targets,
    input_scale,
    paste_masks,
    rescale_sample,
)
from nucleiseg.postprocessing.instances import InstanceParams, SoftInstances, instances_to_labels


def _discs(centers, radius=7, shape=(64, 64)):
    labels = np.zeros(shape, np.int32)
    for label, center in enumerate(centers, start=1):
        labels[disk(center, radius, shape=shape)] = label
    return labels


def _image(labels):
    return np.dstack([np.where(labels > 0, 200, 20).astype(np.uint8)] * 3)


def test_targets_are_one_box_and_mask_per_visible_nucleus():
    # The third disc is cut by the crop's right edge: its visible part is the target.
    labels = _discs([(15, 15), (40, 30), (30, 62)])
    targets = detection_targets(labels)
    # skimage discs of radius 7 span 13 pixels (centre +- 6).
    assert targets["boxes"].tolist() == [[9, 9, 22, 22], [24, 34, 37, 47], [56, 24, 64, 37]]
    assert targets["labels"].tolist() == [1, 1, 1]
    assert targets["masks"].dtype == torch.uint8 and targets["masks"].shape == (3, 64, 64)
    for k in range(3):
        np.testing.assert_array_equal(targets["masks"][k].numpy(), labels == k + 1)
    empty = detection_targets(np.zeros((64, 64), np.int32))
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 64, 64)


def test_model_trains_on_crops_with_and_without_nuclei_and_backpropagates():
    config = tiny_maskrcnn_config()
    family = get_family("maskrcnn")
    model = build_model(config).train()
    labels = _discs([(15, 15), (40, 40)])
    batch = family.collate(
        [
            (to_tensor(_image(labels)), detection_targets(labels)),
            (to_tensor(_image(labels * 0)), detection_targets(labels * 0)),
        ]
    )
    losses = model(list(batch[0]), batch[1])
    assert set(losses) == {
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
        "loss_objectness",
        "loss_rpn_box_reg",
    }
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    backbone_grad = model.backbone.body.conv1.weight.grad
    assert backbone_grad is not None and backbone_grad.abs().sum() > 0
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0


def test_training_steps_lower_the_loss():
    config = tiny_maskrcnn_config()
    family = get_family("maskrcnn")
    torch.manual_seed(0)
    model = build_model(config).train()
    labels = _discs([(15, 15), (40, 40), (20, 45)])
    images, targets = family.collate([(to_tensor(_image(labels)), detection_targets(labels))] * 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = family.training_loss(model, images, targets, config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_eval_output_is_instances_in_the_original_image():
    config = tiny_maskrcnn_config()
    family = get_family("maskrcnn")
    model = build_model(config)
    image = _image(_discs([(15, 15)], shape=(40, 56)))
    instances = family.predict(model, image, config, torch.device("cpu"))
    assert isinstance(instances, SoftInstances) and instances.shape == (40, 56)
    assert len(instances) > 0  # an untrained model scores its proposals about 0.5
    for (y0, x0, y1, x1), mask in zip(instances.boxes, instances.masks, strict=True):
        assert 0 <= y0 < y1 <= 40 and 0 <= x0 < x1 <= 56 and mask.shape == (y1 - y0, x1 - x0)
        assert mask.min() >= 0 and mask.max() <= 1
    labels = family.to_labels(instances, InstanceParams(score_threshold=0.0))
    assert labels.shape == (40, 56) and labels.dtype == np.int32


def test_boxes_scores_and_masks_are_float32_under_bfloat16_autocast():
    # bfloat16 boxes would put a box edge near x = 300 on a multiple of 2 px.
    model = build_model(tiny_maskrcnn_config()).eval()
    image = to_tensor(_image(_discs([(15, 15), (40, 40)])))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.backbone(image[None])
        objectness, deltas = model.rpn.head(list(features.values()))
        output = model([image])[0]
    assert features["0"].dtype == torch.bfloat16  # the layers do run in bfloat16
    assert {t.dtype for t in objectness + deltas} == {torch.float32}
    assert len(output["boxes"]) > 0
    assert {output[k].dtype for k in ("boxes", "scores", "masks")} == {torch.float32}


def test_float32_heads_keep_torchvision_parameter_names():
    # Weights saved from torchvision's own heads load unchanged.
    model = build_model(tiny_maskrcnn_config())
    mask_width = model.roi_heads.mask_head[-1][0].out_channels
    for module, plain in [
        (model.rpn.head, RPNHead(model.backbone.out_channels, 3)),
        (
            model.roi_heads.box_predictor,
            FastRCNNPredictor(model.roi_heads.box_head.fc7.out_features, 2),
        ),
        (model.roi_heads.mask_predictor, MaskRCNNPredictor(mask_width, mask_width, 2)),
    ]:
        assert {k: v.shape for k, v in module.state_dict().items()} == {
            k: v.shape for k, v in plain.state_dict().items()
        }


def test_pasted_masks_land_where_the_head_put_them():
    # Left half of the head's mask on: the left half of the box, in the image.
    head = np.zeros((1, 28, 28), np.float32)
    head[:, :, :14] = 1
    boxes = np.array([[10.0, 20.0, 30.0, 36.0]])  # x0, y0, x1, y1
    int_boxes, (crop,) = paste_masks(boxes, head, (64, 64))
    assert int_boxes.tolist() == [[20, 10, 36, 30]]
    assert crop.shape == (16, 20)
    np.testing.assert_allclose(crop[:, :9], 1.0)
    np.testing.assert_allclose(crop[:, 11:], 0.0)
    # At input scale 2 the same network box is a box half the size in the image.
    int_boxes, (crop,) = paste_masks(boxes, head, (64, 64), scale=2.0)
    assert int_boxes.tolist() == [[10, 5, 18, 15]]
    np.testing.assert_allclose(crop[:, :4], 1.0)
    np.testing.assert_allclose(crop[:, 6:], 0.0)
    # A box outside the image leaves nothing.
    int_boxes, (crop,) = paste_masks(np.array([[70.0, 5, 80, 9]]), head, (64, 64))
    assert crop.size == 0


def test_small_images_are_upsampled_and_large_ones_kept():
    params = MaskRCNNParams(input_side=512, max_upscale=2.0)
    assert input_scale((256, 256), params) == 2.0
    assert input_scale((256, 320), params) == 2.0
    assert input_scale((360, 360), params) == pytest.approx(512 / 360)
    assert input_scale((520, 696), params) == 1.0
    assert input_scale((1024, 1024), params) == 1.0
    labels = _discs([(15, 15), (40, 40)])
    scaled = rescale_sample(Sample("a", _image(labels), labels), MaskRCNNParams(input_side=128))
    assert scaled.image.shape == (128, 128, 3) and scaled.labels.shape == (128, 128)
    assert np.unique(scaled.labels).tolist() == [0, 1, 2]
    assert np.count_nonzero(scaled.labels == 1) == pytest.approx(4 * (labels == 1).sum(), rel=0.1)


def test_soft_instances_binarize_to_the_right_labels():
    labels = _discs([(15, 15), (40, 40), (15, 45)])
    # Probabilities: 0.9 inside each disc, 0.3 on a ring around it.
    masks, boxes = [], []
    for label in (1, 2, 3):
        ring = _discs([np.argwhere(labels == label).mean(0).round().astype(int)], radius=9)
        prob = np.where(labels == label, 0.9, np.where(ring > 0, 0.3, 0.0)).astype(np.float32)
        rows, cols = np.flatnonzero(prob.any(1)), np.flatnonzero(prob.any(0))
        boxes.append((rows[0], cols[0], rows[-1] + 1, cols[-1] + 1))
        masks.append(prob[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    soft = SoftInstances((64, 64), np.array([0.9, 0.8, 0.7]), np.array(boxes), tuple(masks))
    predicted = instances_to_labels(soft, InstanceParams(mask_threshold=0.5))
    assert average_precision(labels, predicted).score == 1.0
    wide = instances_to_labels(soft, InstanceParams(mask_threshold=0.2))
    assert np.count_nonzero(wide) > np.count_nonzero(labels)
    assert not instances_to_labels(soft, InstanceParams(score_threshold=0.95)).any()


def test_oof_instances_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    boxes = np.array([[2, 3, 10, 7], [20, 20, 21, 30]])
    masks = tuple(rng.uniform(0, 1, (b[2] - b[0], b[3] - b[1])).astype(np.float32) for b in boxes)
    soft = SoftInstances((32, 40), np.array([0.9, 0.4], np.float32), boxes, masks)
    oof.save_instances(tmp_path, "img", soft)
    back = oof.read_instances(tmp_path / oof.OOF_DIR / oof.INSTANCES_DIR / "img.npz")
    assert back.shape == (32, 40)
    np.testing.assert_array_equal(back.boxes, boxes)
    np.testing.assert_allclose(back.scores, soft.scores)
    for a, b in zip(masks, back.masks, strict=True):
        np.testing.assert_allclose(a, b, atol=0.5 / 255 + 1e-6)
    oof.save_instances(tmp_path, "none", SoftInstances.empty((8, 8)))
    assert len(oof.load_instances(tmp_path)["none"]) == 0


def test_local_backbone_weights_and_init_from(tmp_path):
    from torchvision.models import resnet18

    backbone = resnet18()
    torch.save(backbone.state_dict(), tmp_path / "resnet18_imagenet.pth")
    model = build_model(
        tiny_maskrcnn_config(encoder_weights=str(tmp_path / "resnet18_imagenet.pth"))
    )
    assert torch.equal(model.backbone.body.conv1.weight, backbone.conv1.weight)
    torch.save({"model": model.state_dict()}, tmp_path / "run.ckpt")
    started = build_model(tiny_maskrcnn_config(init_from=str(tmp_path / "run.ckpt")))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, started.state_dict()[name]), name
    load_weights(started, tmp_path / "run.ckpt")
    with pytest.raises(KeyError, match="unknown Mask R-CNN backbone 'vgg16'"):
        build_model(tiny_maskrcnn_config(encoder="vgg16"))
