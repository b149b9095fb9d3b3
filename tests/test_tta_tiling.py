"""Tiles and test-time views: exact inversion, seamless blending, Mask R-CNN stitching."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.draw import disk, polygon
from torch import nn
from torchvision.ops import roi_align

from nucleiseg.competition.metric import average_precision
from nucleiseg.data.dataset import to_tensor
from nucleiseg.inference import tta
from nucleiseg.inference.detection import detect
from nucleiseg.inference.predictor import InferenceOptions, predict_probabilities
from nucleiseg.inference.tiling import blend_weights, predict_dense_tiled, tile_starts
from nucleiseg.models.maskrcnn import MaskRCNNParams
from nucleiseg.postprocessing.instances import InstanceParams, instances_to_labels

CPU = torch.device("cpu")


def _random_image(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


@pytest.mark.parametrize("length,tile,overlap", [(100, 32, 8), (64, 64, 16), (257, 96, 40)])
def test_tiles_cover_the_image_with_at_least_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == max(length, tile)
    covered = np.zeros(length, int)
    for s in starts:
        covered[s : s + tile] += 1
    assert covered.min() >= 1
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(length, tile, tile)


def test_blend_weights_are_positive_and_fall_towards_edges():
    weights = blend_weights(32, 48, 8)
    assert weights.min() == pytest.approx(1 / 81) and weights.max() == 1.0
    assert weights[0, 0] < weights[4, 4] < weights[16, 24]


@pytest.mark.parametrize("shape", [(70, 45), (100, 130), (33, 200), (64, 64)])
@pytest.mark.parametrize("tile,overlap", [(None, 0), (32, 0), (32, 8), (64, 16), (96, 40)])
def test_tiling_an_identity_model_returns_its_input(shape, tile, overlap):
    image = _random_image(shape)
    out = predict_dense_tiled(lambda batch: batch, image, tile, overlap, batch_size=3)
    assert out.shape == (3, *shape)
    np.testing.assert_allclose(out, to_tensor(image).numpy(), rtol=0, atol=1e-5)


def _small_convnet() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Conv2d(8, 2, 3, padding=1), nn.Sigmoid()).eval()


@torch.no_grad()
def test_tiled_output_of_a_real_convnet_matches_the_whole_image_output():
    # Receptive field 7 px: with 32 px of overlap, only a seam's few pixels see
    # different context, and the blend gives them little weight.
    model = _small_convnet()
    image = _random_image((150, 210), seed=1)
    whole = predict_dense_tiled(model, image, None, 0)
    tiled = predict_dense_tiled(model, image, 64, 32, batch_size=4)
    inner = (slice(None), slice(4, -4), slice(4, -4))
    assert np.abs(tiled[inner] - whole[inner]).max() < 0.02
    assert np.abs(tiled[inner] - whole[inner]).mean() < 1e-3
    # Without overlap the seams show: the blend is what hides them.
    hard = predict_dense_tiled(model, image, 64, 0)
    assert np.abs(hard[inner] - whole[inner]).max() > np.abs(tiled[inner] - whole[inner]).max()


def test_views_are_inverted_exactly_for_maps_and_points():
    image = np.arange(5 * 7 * 3).reshape(5, 7, 3)
    for transform in tta.TTA_SETS["d4"]:
        view = tta.apply(image, transform)
        back = tta.invert_maps(view.transpose(2, 0, 1), transform).transpose(1, 2, 0)
        np.testing.assert_array_equal(back, image)
        rows, cols = np.indices(view.shape[:2])
        ys, xs = tta.invert_points(rows, cols, view.shape[:2], transform)
        np.testing.assert_array_equal(image[ys.astype(int), xs.astype(int)], view)


class _AsymmetricLinear(nn.Module):
    """Logits whose sigmoid is 0.5 + 0.1 * (first channel correlated with kernel K)."""

    def __init__(self, kernel: np.ndarray):
        super().__init__()
        self.kernel = torch.from_numpy(kernel.astype(np.float32))[None, None]

    def forward(self, batch):
        value = 0.5 + 0.1 * F.conv2d(batch[:, :1], self.kernel, padding=1)
        return torch.logit(value)


def test_tta_of_an_asymmetric_model_averages_its_inverted_views():
    kernel = np.array([[0.0, 0.3, 0.0], [0.0, 0.0, -0.2], [0.1, 0.0, 0.05]])
    model = _AsymmetricLinear(kernel)
    image = _random_image((64, 96), seed=2)  # sides multiples of 32: no stride padding
    x = to_tensor(image)[0].numpy().astype(np.float64)

    def expected(k):
        return 0.5 + 0.1 * ndimage.correlate(x, k, mode="constant")

    plain = predict_probabilities(model, image, CPU, options=InferenceOptions(tta="none"))
    np.testing.assert_allclose(plain[0], expected(kernel), atol=1e-5)
    # A view's output, inverted, is the original image correlated with the inversely
    # transformed kernel; over a group of views, the mean of those kernels.
    for name in ("flip", "d4"):
        kernels = [tta.invert_maps(kernel[None], t)[0] for t in tta.TTA_SETS[name]]
        assert not np.allclose(kernels[1], kernel)  # the model is not symmetric
        out = predict_probabilities(model, image, CPU, options=InferenceOptions(tta=name))
        np.testing.assert_allclose(out[0], expected(np.mean(kernels, axis=0)), atol=1e-5)


def test_tta_of_an_identity_model_returns_its_input():
    class Identity(nn.Module):
        def forward(self, batch):
            return torch.logit(0.5 + 0.1 * batch)

    image = _random_image((50, 70), seed=3)
    smooth = np.stack([ndimage.gaussian_filter(c.astype(float), 3) for c in image.T]).T
    smooth = smooth.astype(np.uint8)
    expected = 0.5 + 0.1 * to_tensor(smooth).numpy()
    for options in (InferenceOptions(tta="d4"), InferenceOptions(tta="flip", tile=32, overlap=8)):
        out = predict_probabilities(Identity(), smooth, CPU, options=options)
        np.testing.assert_allclose(out, expected, atol=1e-5)
    # Rescaling is bilinear both ways: close, not exact, on a smooth image.
    scaled = InferenceOptions(scales=(1.0, 1.5))
    out = predict_probabilities(Identity(), smooth, CPU, options=scaled)
    assert np.abs(out - expected)[:, 2:-2, 2:-2].max() < 0.01


class _ThresholdDetector(nn.Module):
    """A stand-in Mask R-CNN: one detection per bright component, masks cut as the
    real mask head's targets are (RoIAlign of the binary mask over the box), with
    the tile entry point of the real one."""

    def forward(self, images):
        outputs = []
        for image in images:
            binary = (image[0] > 0).numpy()
            components, n = ndimage.label(binary)
            boxes = [
                (s[1].start, s[0].start, s[1].stop, s[0].stop)
                for s in ndimage.find_objects(components)
            ]
            boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            masks = (
                torch.stack(
                    [
                        roi_align(
                            torch.from_numpy(components == k + 1).float()[None, None],
                            [boxes[k : k + 1]],
                            28,
                            sampling_ratio=2,
                            aligned=False,
                        )[0]
                        for k in range(n)
                    ]
                )
                if n
                else torch.zeros(0, 1, 28, 28)
            )
            scores = torch.linspace(0.9, 0.8, n)
            outputs.append({"boxes": boxes, "scores": scores, "masks": masks})
        return outputs

    def detect(self, images, keep=None, count_scale=1.0):
        """As :meth:`nucleiseg.models.maskrcnn.NucleusMaskRCNN.detect`: only the kept detections."""
        outputs = self(images)
        if keep is not None:
            for output, kept in zip(outputs, keep, strict=True):
                mask = kept(output["boxes"])
                output.update({key: value[mask] for key, value in output.items()})
        return outputs


def _l_shapes(shape=(96, 128)):
    labels = np.zeros(shape, np.int32)
    for label, (y, x) in enumerate([(10, 10), (55, 60), (10, 90)], start=1):
        rows = np.array([y, y, y + 12, y + 12, y + 30, y + 30])
        cols = np.array([x, x + 25, x + 25, x + 9, x + 9, x])
        labels[polygon(rows, cols, shape)] = label
    return labels


def _bright(labels):
    return np.dstack([np.where(labels > 0, 200, 20).astype(np.uint8)] * 3)


@pytest.mark.parametrize("tta_kind", ["none", "flip", "d4"])
def test_detections_of_every_view_come_back_to_the_asymmetric_nuclei(tta_kind):
    labels = _l_shapes()
    params = MaskRCNNParams(input_side=96)  # no upsampling
    # Every view must find every nucleus where it is (vote of all views).
    options = InferenceOptions(tta=tta_kind, vote_fraction=1.0, vote_iou=0.8)
    found = detect(_ThresholdDetector(), _bright(labels), params, CPU, options=options)
    assert len(found) == 3
    predicted = instances_to_labels(found, InstanceParams(score_threshold=0.0))
    # All three found, in place and the right way round, even at IoU 0.95.
    assert average_precision(labels, predicted).score == 1.0


def test_upsampled_detections_are_pasted_back_at_the_image_scale():
    labels = _l_shapes((64, 96))
    params = MaskRCNNParams(input_side=128, max_upscale=2.0)  # 2x the image
    found = detect(_ThresholdDetector(), _bright(labels), params, CPU)
    predicted = instances_to_labels(found, InstanceParams(score_threshold=0.0))
    assert predicted.shape == labels.shape
    assert average_precision(labels, predicted).score >= 0.9


def test_tiled_detection_stitches_nuclei_cut_by_tile_edges():
    rng = np.random.default_rng(4)
    labels = np.zeros((200, 260), np.int32)
    for label in range(1, 41):
        center = tuple(rng.integers(6, [194, 254]))
        labels[disk(center, 5, shape=labels.shape)] = label
    labels, _ = ndimage.label(labels > 0)  # merged discs become one nucleus
    params = MaskRCNNParams(input_side=64)
    whole = detect(_ThresholdDetector(), _bright(labels), params, CPU)
    options = InferenceOptions(tile=64, overlap=32)
    tiled = detect(_ThresholdDetector(), _bright(labels), params, CPU, options=options)
    assert len(tiled) == len(whole) == labels.max()
    for found in (whole, tiled):
        predicted = instances_to_labels(found, InstanceParams(score_threshold=0.0))
        assert average_precision(labels, predicted).score == 1.0
