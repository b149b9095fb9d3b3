"""Stain and colour augmentation steps, and the nucleus size behind size-adaptive inference."""

import random

import numpy as np
import pytest
from skimage.color import rgb2hed
from skimage.draw import disk

from nucleiseg.data import sizing
from nucleiseg.data.augment import (
    ColourParams,
    HaematoxylinOnly,
    StainFluorescence,
    StainJitter,
    train_transform,
)
from nucleiseg.data.modality import FLUORESCENCE, TISSUE, classify_modality
from nucleiseg.inference.ensemble import size_adapted_options
from nucleiseg.inference.predictor import InferenceOptions

# Every colour step but the three stain steps switched off.
GENERIC_COLOUR_OFF = dict.fromkeys(
    (
        "invert",
        "channel_shuffle",
        "grey",
        "hue_saturation",
        "brightness_contrast",
        "gamma",
        "blur_noise",
    ),
    0.0,
)


def _labels(size=96, radius=8):
    labels = np.zeros((size, size), np.int32)
    for i, center in enumerate([(20, 20), (20, 70), (70, 20), (70, 70), (48, 48)], start=1):
        labels[disk(center, radius, shape=labels.shape)] = i
    return labels


def _he(labels):
    """A pink H&E-like image: purple nuclei on a pink ground."""
    rng = np.random.default_rng(0)
    image = np.empty(labels.shape + (3,), np.uint8)
    image[...] = (235, 180, 215)
    image[labels > 0] = (110, 60, 160)
    return np.clip(image + rng.integers(-5, 6, image.shape), 0, 255).astype(np.uint8)


def _fluorescence(labels):
    image = np.full(labels.shape + (3,), 8, np.uint8)
    image[labels > 0] = 180
    return image


def _apply(step, image, seed=0):
    step.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return step(image=image)["image"]


def test_stain_steps_touch_only_the_images_they_are_for():
    labels = _labels()
    he, fluo = _he(labels), _fluorescence(labels)
    for step in (StainJitter(p=1.0), HaematoxylinOnly(p=1.0)):
        np.testing.assert_array_equal(_apply(step, fluo), fluo)
        assert not np.array_equal(_apply(step, he), he)
    np.testing.assert_array_equal(_apply(StainFluorescence(p=1.0), he), he)
    assert not np.array_equal(_apply(StainFluorescence(p=1.0), fluo), fluo)


def test_fluorescence_becomes_dark_nuclei_on_a_light_tinted_ground():
    labels = _labels()
    for seed in range(6):
        out = _apply(StainFluorescence(p=1.0), _fluorescence(labels), seed)
        grey = out.astype(float).mean(axis=2)
        assert grey[labels == 0].mean() > 180 and grey[labels > 0].mean() < 150
        assert classify_modality(out) == TISSUE
    assert classify_modality(_fluorescence(labels)) == FLUORESCENCE


def test_haematoxylin_only_drops_the_eosin_and_tints_the_ground_yellow():
    labels = _labels()
    he = _he(labels)
    out = _apply(HaematoxylinOnly(p=1.0), he)
    eosin_before = rgb2hed(he)[..., 1][labels == 0].mean()
    background = out[labels == 0].astype(float).mean(axis=0)
    nucleus = out[labels > 0].astype(float).mean(axis=0)
    assert eosin_before > 0.01  # the input is pink
    assert background[2] < background[0]  # yellow: less blue than red
    assert nucleus[2] > nucleus[0] and nucleus.mean() < background.mean() - 40  # blue, dark


def test_stain_jitter_keeps_the_nuclei_darker_than_the_ground():
    labels = _labels()
    for seed in range(8):
        out = _apply(StainJitter(p=1.0), _he(labels), seed).astype(float).mean(axis=2)
        assert out[labels > 0].mean() < out[labels == 0].mean() - 30


def test_steps_with_probability_zero_are_left_out_of_the_pipeline():
    default = train_transform(64, colour_params=ColourParams())
    names = [type(t).__name__ for t in default.transforms]
    assert not {"StainJitter", "HaematoxylinOnly", "StainFluorescence"} & set(names)
    everything = ColourParams(stain_fluorescence=0.2, haematoxylin_only=0.2, stain_jitter=0.5)
    names = [type(t).__name__ for t in train_transform(64, colour_params=everything).transforms]
    assert names[2:5] == ["StainFluorescence", "HaematoxylinOnly", "StainJitter"]
    none = ColourParams(invert=0.0, channel_shuffle=0.0, grey=0.0)
    names = [type(t).__name__ for t in train_transform(64, colour_params=none).transforms]
    assert not {"InvertImg", "ChannelShuffle", "ToGray"} & set(names)
    photometric = {"HueSaturationValue", "RandomBrightnessContrast", "RandomGamma", "OneOf"}
    assert photometric <= set(names)
    stain_only = ColourParams(stain_jitter=0.5, **GENERIC_COLOUR_OFF)
    names = [type(t).__name__ for t in train_transform(64, colour_params=stain_only).transforms]
    assert names == ["ScaledRandomCrop", "D4", "StainJitter"]


def test_a_stain_only_pipeline_leaves_fluorescence_crops_untouched():
    stain_only = ColourParams(stain_jitter=1.0, haematoxylin_only=1.0, **GENERIC_COLOUR_OFF)
    transform = train_transform(32, scale_range=(1.0, 1.0), colour_params=stain_only)
    labels = _labels()[:32, :32]
    image = np.where(labels[..., None] > 0, 200, 10).astype(np.uint8).repeat(3, axis=2)
    for seed in range(4):
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = transform(image=image, mask=labels)
        # Only the geometry moved: the same grey levels, each still on its own nucleus.
        assert set(np.unique(out["image"])) == {10, 200}
        assert ((out["image"][..., 0] == 200) == (out["mask"] > 0)).all()


def test_equivalent_diameters_of_drawn_discs():
    labels = _labels(radius=8)
    diameters = sizing.equivalent_diameters(labels)
    area = (labels == 1).sum()
    assert diameters.shape == (5,)
    np.testing.assert_allclose(diameters, np.sqrt(4 * area / np.pi))
    assert abs(sizing.median_diameter(labels) - 16) < 0.5
    assert np.isnan(sizing.median_diameter(np.zeros((4, 4), np.int32)))


def test_rescale_factor_brings_nuclei_to_the_target_outside_the_band():
    labels = _labels(radius=8)  # diameter ~16.1
    d = sizing.median_diameter(labels)
    assert sizing.rescale_factor(labels, 18.0, 1.25) == 1.0  # 16.1 within 14.4..22.5
    assert sizing.rescale_factor(labels, 32.0, 1.25) == pytest.approx(32.0 / d)
    assert sizing.rescale_factor(labels, 8.0, 1.0) == pytest.approx(8.0 / d)
    assert sizing.rescale_factor(labels, 1000.0, 1.0) == sizing.MAX_FACTOR
    too_few = labels * (labels <= 4)
    assert sizing.rescale_factor(too_few, 32.0, 1.0) == 1.0
    with pytest.raises(ValueError):
        sizing.rescale_factor(labels, 18.0, 0.5)


def test_the_second_pass_multiplies_every_scale_by_the_factor():
    labels = _labels(radius=8)
    options = InferenceOptions(scales=(1.0, 1.25), size_adaptive=True, size_target=32.0)
    second = size_adapted_options(labels, options)
    factor = 32.0 / sizing.median_diameter(labels)
    assert not second.size_adaptive
    assert second.scales == pytest.approx((factor, 1.25 * factor))
    with pytest.raises(ValueError, match="size_tolerance"):
        InferenceOptions(size_tolerance=0.9)
