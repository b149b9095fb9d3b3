"""Training augmentation keeps label images valid; the dataset's crops are reproducible."""

import random

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from skimage.draw import disk

from nucleiseg.data.augment import ScaledRandomCrop, train_transform
from nucleiseg.data.dataset import (
    IMAGE_MEAN,
    IMAGE_STD,
    NucleiDataset,
    load_samples,
    sample_weights,
    to_tensor,
)
from nucleiseg.data.reading import DataError, Sample
from nucleiseg.data.targets import make_targets

LABEL_VALUES = (3, 7, 1000)


def _discs(shape, centers, radius) -> np.ndarray:
    labels = np.zeros(shape, np.int32)
    for label, center in zip(LABEL_VALUES, centers, strict=False):
        labels[disk(center, radius, shape=shape)] = label
    return labels


def _image(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A colour image: noisy background, nuclei brighter in a label-dependent tint."""
    rng = np.random.default_rng(seed)
    image = rng.integers(10, 40, labels.shape + (3,)).astype(np.uint8)
    image[labels > 0] = (200, 120, 60)
    return image


def _areas(labels: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    return dict(zip(values.tolist(), counts.tolist(), strict=True))


def _run(transform, image, labels, seed):
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return transform(image=image, mask=labels)


def test_labels_are_only_moved_never_blended():
    labels = _discs((128, 128), [(30, 30), (40, 90), (95, 60)], radius=14)
    image = _image(labels)
    transform = train_transform(64)
    for seed in range(30):
        out = _run(transform, image, labels, seed)
        assert out["image"].shape == (64, 64, 3) and out["image"].dtype == np.uint8
        assert out["mask"].shape == (64, 64) and out["mask"].dtype == np.int32
        assert set(np.unique(out["mask"]).tolist()) <= {0, *LABEL_VALUES}


def test_small_image_at_scale_one_is_padded_not_stretched():
    labels = _discs((40, 50), [(12, 12), (20, 36), (31, 16)], radius=7)
    image = _image(labels)
    transform = train_transform(64, scale_range=(1.0, 1.0))
    for seed in range(10):
        out = _run(transform, image, labels, seed)
        assert _areas(out["mask"]) == _areas(labels)

    crop = ScaledRandomCrop(64, scale_range=(1.0, 1.0))
    crop.set_random_seed(0)
    out = crop(image=image, mask=labels)
    # The image sits intact somewhere in the crop, on its median colour.
    found = cv2.matchTemplate(out["image"], image, cv2.TM_SQDIFF)
    top, left = np.unravel_index(np.argmin(found), found.shape)
    np.testing.assert_array_equal(out["image"][top : top + 40, left : left + 50], image)
    np.testing.assert_array_equal(out["mask"][top : top + 40, left : left + 50], labels)
    padding = np.ones((64, 64), bool)
    padding[top : top + 40, left : left + 50] = False
    median = np.median(image.reshape(-1, 3), axis=0).astype(np.uint8)
    assert (out["image"][padding] == median).all()
    assert (out["mask"][padding] == 0).all()


@pytest.mark.parametrize(("size", "crop", "scale"), [(64, 128, 2.0), (128, 64, 0.5)])
def test_areas_follow_the_scale_factor(size, crop, scale):
    # The window is the whole image here, so every nucleus stays in the crop.
    labels = _discs((size, size), [(size // 4, size // 4), (size // 2, 3 * size // 4)], size // 8)
    out = _run(train_transform(crop, scale_range=(scale, scale)), _image(labels), labels, 0)
    before, after = _areas(labels), _areas(out["mask"])
    assert set(after) == set(before)
    for label, area in before.items():
        assert after[label] == pytest.approx(area * scale**2, rel=0.1)


def _steps(transforms):
    for t in transforms:
        if isinstance(t, A.BaseCompose):
            yield from _steps(t.transforms)
        else:
            yield t


def test_every_step_keeps_image_type_and_labels():
    labels = _discs((64, 64), [(16, 16), (40, 44)], radius=9)
    image = _image(labels)
    for step in _steps(train_transform(64, scale_range=(1.0, 1.0)).transforms):
        step.set_random_seed(0)
        out = step(image=image, mask=labels, force_apply=True)
        assert out["image"].dtype == np.uint8 and out["image"].shape == image.shape, step
        if isinstance(step, A.ImageOnlyTransform):
            np.testing.assert_array_equal(out["mask"], labels)
        else:
            assert _areas(out["mask"]) == _areas(labels), step
    inverted = A.InvertImg(p=1.0)(image=image)["image"]
    np.testing.assert_array_equal(inverted, 255 - image)


def _samples():
    big = _discs((96, 120), [(20, 20), (50, 70), (75, 30)], radius=10)
    small = _discs((40, 50), [(12, 12), (26, 34)], radius=6)
    return [Sample("big", _image(big, 1), big), Sample("small", _image(small, 2), small)]


def test_items_are_the_targets_of_the_augmented_labels():
    samples = _samples()
    dataset = NucleiDataset(samples, train_transform(64), samples_per_epoch=6, seed=3)
    # Same seed, labels as the "targets": the very crops the first dataset saw.
    as_labels = NucleiDataset(
        samples, train_transform(64), samples_per_epoch=6, target_fn=lambda x: x[None], seed=3
    )
    for index in range(len(dataset)):
        image, targets = dataset[index]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert targets.shape == (3, 64, 64) and targets.dtype == torch.float32
        labels = as_labels[index][1][0].numpy().astype(np.int32)
        np.testing.assert_array_equal(targets.numpy(), make_targets(labels))
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch[0].shape == (4, 3, 64, 64) and batch[1].shape == (4, 3, 64, 64)


def test_item_depends_only_on_seed_epoch_and_index():
    first = NucleiDataset(_samples(), train_transform(64), samples_per_epoch=8, seed=5)
    second = NucleiDataset(_samples(), train_transform(64), samples_per_epoch=8, seed=5)
    first.set_epoch(2)
    second.set_epoch(2)
    reference = [first[i] for i in range(8)]
    for i in reversed(range(8)):  # another order, another instance
        image, targets = second[i]
        assert torch.equal(image, reference[i][0]) and torch.equal(targets, reference[i][1])
    second.set_epoch(3)
    assert not torch.equal(second[0][0], reference[0][0])
    assert not torch.equal(first[1][0], reference[0][0])


def test_probabilities_choose_the_images():
    samples = _samples()
    # Only the small image (40x50) can be drawn; at scale 1 its nuclei stay whole.
    dataset = NucleiDataset(
        samples,
        train_transform(64, scale_range=(1.0, 1.0)),
        samples_per_epoch=5,
        target_fn=lambda x: x[None],
        probabilities=np.array([0.0, 1.0]),
    )
    for index in range(len(dataset)):
        labels = dataset[index][1][0].numpy().astype(np.int32)
        assert _areas(labels) == _areas(samples[1].labels)


def test_sample_weights():
    probabilities = sample_weights(["fluorescence", "fluorescence", "tissue"], {"tissue": 2.0})
    np.testing.assert_allclose(probabilities, [0.25, 0.25, 0.5])
    np.testing.assert_allclose(sample_weights(["brightfield"] * 4), [0.25] * 4)
    with pytest.raises(ValueError, match="tisue"):
        sample_weights(["tissue"], {"tisue": 2.0})


def test_to_tensor_normalization_round_trips():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    tensor = to_tensor(image)
    assert tensor.shape == (3, 5, 7) and tensor.dtype == torch.float32
    restored = (tensor.numpy().transpose(1, 2, 0) * IMAGE_STD + IMAGE_MEAN) * 255
    np.testing.assert_allclose(restored, image, atol=1e-3)
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(image.astype(np.float32))


def _write_competition_image(root, image_id, labels):
    (root / image_id / "images").mkdir(parents=True)
    (root / image_id / "masks").mkdir()
    cv2.imwrite(str(root / image_id / "images" / f"{image_id}.png"), _image(labels))
    for label in np.unique(labels[labels > 0]):
        mask = (labels == label).astype(np.uint8) * 255
        cv2.imwrite(str(root / image_id / "masks" / f"{label:04d}.png"), mask)


def test_load_samples(tmp_path):
    labels = _discs((32, 40), [(10, 10), (20, 28)], radius=5)
    for image_id in ("a", "b"):
        _write_competition_image(tmp_path, image_id, labels)
    samples = load_samples(tmp_path, ["b"])
    assert [s.image_id for s in samples] == ["b"]
    assert samples[0].image.shape == (32, 40, 3)
    assert _areas(samples[0].labels) == {1: _areas(labels)[3], 2: _areas(labels)[7]}
    assert [s.image_id for s in load_samples(tmp_path)] == ["a", "b"]
    with pytest.raises(DataError, match="missing"):
        load_samples(tmp_path, ["a", "missing"])


def test_without_colour_steps_pixels_are_only_moved():
    labels = _discs((96, 96), [(30, 30), (60, 62)], radius=12)
    image = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    views = [np.rot90(v, k) for v in (image, image[:, ::-1]) for k in range(4)]

    def moved(crop):  # a crop of one of the 8 flipped or rotated copies, pixel for pixel
        # Squared differences summed in float32: an exact match leaves rounding
        # error in the tens, any other placement ~1e8 on this random image.
        return any(cv2.matchTemplate(v, crop, cv2.TM_SQDIFF).min() < 1000 for v in views)

    geometric = train_transform(64, scale_range=(1.0, 1.0), colour=False)
    coloured = train_transform(64, scale_range=(1.0, 1.0))
    assert all(moved(_run(geometric, image, labels, seed)["image"]) for seed in range(20))
    assert not all(moved(_run(coloured, image, labels, seed)["image"]) for seed in range(20))
