"""Input intensity scale (percentile normalization) and the fluorescence intensity steps."""

import random

import numpy as np
import pytest
import torch
from skimage.draw import disk

from nucleiseg.data.augment import (
    ColourParams,
    DimSignal,
    ShotNoise,
    UnevenBackground,
    train_transform,
)
from nucleiseg.data.intensity import InputNorm, normalize_input
from nucleiseg.data.reading import Sample
from nucleiseg.inference.family import get_family
from nucleiseg.models.build import build_model
from nucleiseg.models.config import load_config, save_config
from tests.helpers import tiny_config, tiny_maskrcnn_config

PERCENTILE = {"mode": "percentile", "low": 1.0, "high": 99.8}


def _dim_fluorescence(size=96, background=10, signal=40):
    labels = np.zeros((size, size), np.int32)
    for i, center in enumerate([(20, 20), (20, 70), (70, 20), (70, 70), (48, 48)], start=1):
        labels[disk(center, 10, shape=labels.shape)] = i
    image = np.full((size, size, 3), background, np.uint8)
    image[labels > 0] = signal
    return image, labels


def _apply(step, image, seed=0):
    step.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return step(image=image)["image"]


def test_fixed_scale_leaves_the_image_itself():
    image, _ = _dim_fluorescence()
    assert normalize_input(image, InputNorm()) is image


def test_percentiles_map_to_0_and_255_and_clip_beyond():
    ramp = np.repeat(np.arange(200, dtype=np.uint8)[None, :, None], 3, axis=2)  # 0..199
    out = normalize_input(ramp, InputNorm("percentile", low=10.0, high=90.0))
    lo, hi = np.percentile(ramp, (10.0, 90.0))
    assert out.dtype == np.uint8 and out.shape == ramp.shape
    assert (out[0, : int(lo)] == 0).all() and (out[0, int(np.ceil(hi)) :] == 255).all()
    middle = ramp[0, 100, 0]
    assert out[0, 100, 0] == round((middle - lo) * 255 / (hi - lo))


def test_dim_and_bright_copies_of_an_image_normalize_alike():
    dim, _ = _dim_fluorescence(background=10, signal=40)
    bright, _ = _dim_fluorescence(background=20, signal=200)
    norm = InputNorm("percentile")
    np.testing.assert_array_equal(normalize_input(dim, norm), normalize_input(bright, norm))


def test_a_blank_image_is_not_stretched_from_noise():
    blank = np.full((32, 32, 3), 7, np.uint8)
    np.testing.assert_array_equal(normalize_input(blank, InputNorm("percentile")), blank)


@pytest.mark.parametrize(
    "values", [{"mode": "zscore"}, {"mode": "percentile", "low": 99.0, "high": 1.0}]
)
def test_a_bad_input_norm_setting_is_refused_naming_it(values):
    with pytest.raises(ValueError, match="input_norm"):
        load_config(overrides={"input_norm": values})


def test_input_norm_is_written_with_the_run_and_read_back(tmp_path):
    config = tiny_config(input_norm=PERCENTILE)
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").input_norm == InputNorm("percentile", 1.0, 99.8)
    # A run written before the setting existed keeps the fixed scale it trained with.
    (tmp_path / "old.yaml").write_text("experiment: old\n")
    assert load_config(tmp_path / "old.yaml").input_norm == InputNorm()


@pytest.mark.parametrize("family_name", ["unetpp", "maskrcnn"])
def test_the_family_trains_and_predicts_on_the_normalized_image(family_name):
    make = tiny_config if family_name == "unetpp" else tiny_maskrcnn_config
    normalized, fixed = make(input_norm=PERCENTILE), make()
    family = get_family(family_name)
    image, labels = _dim_fluorescence()
    stretched = normalize_input(image, normalized.input_norm)

    prepared = family.prepare(Sample("a", image, labels), normalized)
    assert prepared.image.max() == 255 and prepared.image.min() == 0

    torch.manual_seed(0)
    model = build_model(normalized).eval()
    raw = family.predict(model, image, normalized, torch.device("cpu"))
    expected = family.predict(model, stretched, fixed, torch.device("cpu"))
    if family_name == "unetpp":
        np.testing.assert_array_equal(raw, expected)
        assert not np.array_equal(raw, family.predict(model, image, fixed, torch.device("cpu")))
    else:
        np.testing.assert_array_equal(raw.scores, expected.scores)


def test_dim_signal_scales_the_signal_above_the_background():
    image, labels = _dim_fluorescence(background=10, signal=90)
    step = DimSignal(factor=(0.5, 0.5), p=1.0)
    out = _apply(step, image)
    assert (out[labels == 0] == 10).all()
    assert (out[labels > 0] == 50).all()  # 10 + (90 - 10) x 0.5


def test_uneven_background_adds_a_smooth_field_up_to_its_peak():
    image, _ = _dim_fluorescence()
    out = _apply(UnevenBackground(amplitude=(20.0, 20.0), p=1.0), image).astype(int)
    added = out - image
    assert added.min() >= 0 and 18 <= added.max() <= 20
    assert (added[..., 0] == added[..., 1]).all()
    assert np.abs(np.diff(added[..., 0], axis=1)).max() <= 2  # smooth: no edges of its own


def test_shot_noise_grows_with_the_signal_and_keeps_the_mean():
    image = np.zeros((128, 128, 3), np.uint8)
    image[:, 64:] = 100
    image[:, :64] = 4
    image[0, 0] = 0  # a dark pixel or two keep the crop a fluorescence one
    out = _apply(ShotNoise(gain=(1.0, 1.0), p=1.0), image).astype(float)
    dim, bright = out[:, :64, 0], out[:, 64:, 0]
    assert abs(bright.mean() - 100) < 1.0 and abs(dim.mean() - 4) < 0.3
    assert bright.std() > 3 * dim.std()  # Poisson: std ~ sqrt(level)
    assert (out[..., 0] == out[..., 2]).all()


@pytest.mark.parametrize("step", [DimSignal(p=1.0), UnevenBackground(p=1.0), ShotNoise(p=1.0)])
def test_intensity_steps_leave_light_background_images_alone(step):
    light = np.full((64, 64, 3), 230, np.uint8)
    light[20:40, 20:40] = (120, 60, 160)
    np.testing.assert_array_equal(_apply(step, light), light)


def test_the_intensity_steps_are_out_of_the_default_pipeline():
    names = [type(t).__name__ for t in train_transform(64, colour_params=ColourParams())]
    assert not {"DimSignal", "UnevenBackground", "ShotNoise"} & set(names)
    switched = ColourParams(dim=0.3, uneven_background=0.3, shot_noise=0.3)
    names = [type(t).__name__ for t in train_transform(64, colour_params=switched)]
    assert {"DimSignal", "UnevenBackground", "ShotNoise"} <= set(names)
