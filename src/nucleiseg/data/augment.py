"""Training augmentation: one pipeline moves an image and its label image together.

The label image goes through albumentations as its ``mask`` and the training
targets are computed afterwards from the augmented labels (see
:mod:`nucleiseg.data.dataset`). Labels are only ever moved (cropped, padded with 0,
resized nearest-neighbour, flipped, rotated), never blended, so they stay a
valid int32 label image.

The steps of :func:`train_transform`, in order, with their probabilities:

====================================  ======  ======================================
step                                  p       range
====================================  ======  ======================================
:class:`ScaledRandomCrop`             1       scale log-uniform in ``scale_range``
``D4`` (flips, 90-degree rotations)   1       one of the 8 symmetries, uniformly
:class:`StainFluorescence`           0 *     fluorescence rendered as stained tissue
:class:`HaematoxylinOnly`             0 *     stained tissue as haematoxylin alone
:class:`StainJitter`                  0 *     H, E and DAB amounts x 0.7..1.3, +-0.02
:class:`DimSignal`                    0 *     fluorescence above background x 0.2..0.7
:class:`UnevenBackground`             0 *     fluorescence + smooth offset, 2..25 levels
:class:`ShotNoise`                    0 *     fluorescence as Poisson counts, 0.5..4
                                              photons per grey level
``InvertImg``                         0.2     fluorescence <-> brightfield look
``ChannelShuffle``                    0.2
``ToGray``                            0.1
``HueSaturationValue``                0.3     hue +-15, saturation +-25, value +-10
``RandomBrightnessContrast``          0.5     brightness and contrast +-0.2
``RandomGamma``                       0.3     gamma 0.8 .. 1.25
one of blur / noise                   0.2     Gaussian blur sigma 0.3 .. 1.0, or
                                              Gaussian noise std 1 % .. 4 % of 255
====================================  ======  ======================================

Probabilities are those of :class:`ColourParams`; the steps marked * are off
by default and switched on by a configuration (each was ablated on its own,
see ``ablations/generalization.yaml``), and any step is left out by a
probability of 0. The three stain steps work in the
haematoxylin-eosin-DAB space of colour deconvolution (Ruifrok and Johnston
2001; ``skimage.color.rgb2hed``), each on the images it makes sense for and
leaving others untouched: stain jitter and haematoxylin-only rendering on
light-background colour images (stained tissue), the fluorescence rendering on
dark-background ones. They exist because the stage-1 test holds stained tissue
of kinds the training set lacks (pink H&E, haematoxylin alone on pale yellow).
The three intensity steps act on dark-background (fluorescence) crops only and
imitate dim tissue-section fluorescence, which the stage-1 test and BitDepth
test hold and the training set lacks: a weaker signal over the same
background, an uneven background glow, and the photon noise of few counts.

The colour steps let one model learn fluorescence, brightfield and stained
tissue: an inverted fluorescence image looks like brightfield, an inverted
H&E image like coloured fluorescence, and shuffled, greyed or hue-shifted
channels keep the model from keying on one stain. Their probabilities are
moderate so that most crops still look like real data.

There is no evaluation transform: whole images go to the inference code
untouched, because the padding a network needs (a multiple of 32) must be
undone on its output, which only the tiling code can do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
from skimage.color import hed2rgb, rgb2hed

from nucleiseg.data.modality import FLUORESCENCE, TISSUE, classify_modality


@dataclass
class ColourParams:
    """Probability of each colour step of :func:`train_transform` (0 leaves it out).

    Attributes:
        stain_fluorescence: :class:`StainFluorescence` on fluorescence images.
        haematoxylin_only: :class:`HaematoxylinOnly` on stained tissue.
        stain_jitter: :class:`StainJitter` on light-background images.
        dim: :class:`DimSignal` on fluorescence images.
        uneven_background: :class:`UnevenBackground` on fluorescence images.
        shot_noise: :class:`ShotNoise` on fluorescence images.
        invert: Invert the image (fluorescence <-> brightfield look).
        channel_shuffle: Permute the colour channels.
        grey: Replace the image by its grey level.
        hue_saturation: Shift hue, saturation and value.
        brightness_contrast: Scale brightness and contrast.
        gamma: Change gamma.
        blur_noise: Gaussian blur or Gaussian noise (one of the two).
    """

    stain_fluorescence: float = 0.0
    haematoxylin_only: float = 0.0
    stain_jitter: float = 0.0
    dim: float = 0.0
    uneven_background: float = 0.0
    shot_noise: float = 0.0
    invert: float = 0.2
    channel_shuffle: float = 0.2
    grey: float = 0.1
    hue_saturation: float = 0.3
    brightness_contrast: float = 0.5
    gamma: float = 0.3
    blur_noise: float = 0.2


def _crop_modality(img: np.ndarray) -> str:
    """:func:`nucleiseg.data.modality.classify_modality` of a crop, on every 4th pixel (cheap)."""
    return classify_modality(img[::4, ::4])


def is_stained(img: np.ndarray) -> bool:
    """A light-background colour crop (stained tissue)."""
    return _crop_modality(img) == TISSUE


def is_dark(img: np.ndarray) -> bool:
    """A dark-background crop (fluorescence)."""
    return _crop_modality(img) == FLUORESCENCE


def _render(hed: np.ndarray, tint: np.ndarray | None = None) -> np.ndarray:
    """Stain amounts mixed back to RGB uint8, the ground optionally tinted (RGB factors)."""
    rgb = hed2rgb(hed) if tint is None else hed2rgb(hed) * tint
    return np.rint(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


class StainJitter(A.ImageOnlyTransform):
    """Random amounts of haematoxylin, eosin and DAB in a stained image.

    The image is unmixed into stain concentrations (``rgb2hed``), each
    concentration ``c`` becomes ``c * a + b`` with ``a`` uniform in
    ``1 +- scale`` and ``b`` uniform in ``+-shift``, and the result is mixed
    back (``hed2rgb``), as in Tellez et al., "Whole-slide mitosis detection in
    H&E breast histology using PHH3 as a reference to train distilled
    stain-invariant convolutional networks", IEEE TMI 2018. Images that are
    not stained tissue (dark background, or grey) are returned unchanged.

    Args:
        scale: Largest relative change of a stain's amount.
        shift: Largest added amount (concentrations of nuclei are about 0.05-0.15).
        p: Probability of applying the transform.
    """

    def __init__(self, scale: float = 0.3, shift: float = 0.02, p: float = 0.5):
        super().__init__(p=p)
        self.scale = scale
        self.shift = shift

    def get_params(self) -> dict[str, Any]:
        """Draw the three factors and the three offsets."""
        factors = [self.py_random.uniform(1 - self.scale, 1 + self.scale) for _ in range(3)]
        offsets = [self.py_random.uniform(-self.shift, self.shift) for _ in range(3)]
        return {"factors": np.array(factors), "offsets": np.array(offsets)}

    def apply(
        self, img: np.ndarray, factors: np.ndarray, offsets: np.ndarray, **params: Any
    ) -> np.ndarray:
        """Jitter the stain amounts of a stained image."""
        if not is_stained(img):
            return img
        hed = rgb2hed(img)
        return _render(np.maximum(hed * factors + offsets, 0.0))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Arguments shown by ``repr`` and used by serialization."""
        return ("scale", "shift")


class HaematoxylinOnly(A.ImageOnlyTransform):
    """Render stained tissue as haematoxylin alone: blue nuclei on a pale yellow ground.

    Eosin and DAB are dropped, the haematoxylin amount is scaled by a factor
    in ``amount``, and the white ground is tinted yellow (blue channel x
    0.72..0.92, green x 0.92..1), the look of the stage-1 test's
    haematoxylin-only tiles. Other images are returned unchanged.

    Args:
        amount: Range of the haematoxylin factor.
        p: Probability of applying the transform.
    """

    def __init__(self, amount: tuple[float, float] = (0.8, 1.6), p: float = 0.2):
        super().__init__(p=p)
        self.amount = amount

    def get_params(self) -> dict[str, Any]:
        """Draw the haematoxylin factor and the tint."""
        tint = (1.0, self.py_random.uniform(0.92, 1.0), self.py_random.uniform(0.72, 0.92))
        return {"factor": self.py_random.uniform(*self.amount), "tint": np.array(tint)}

    def apply(self, img: np.ndarray, factor: float, tint: np.ndarray, **params: Any) -> np.ndarray:
        """Keep the haematoxylin of a stained image, on a yellow ground."""
        if not is_stained(img):
            return img
        hed = rgb2hed(img)
        hed[..., 0] *= factor
        hed[..., 1:] = 0.0
        return _render(hed, tint)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Arguments shown by ``repr`` and used by serialization."""
        return ("amount",)


class StainFluorescence(A.ImageOnlyTransform):
    """Render a fluorescence image as stained tissue: dark nuclei on a light, tinted ground.

    The grey level, stretched from the background (median) to the brightest
    nuclei (99.5th percentile), becomes the haematoxylin amount (up to 0.08-0.2,
    plus a faint haze); half the time the ground gets eosin with a smooth random
    texture (pink H&E), otherwise none and a yellow tint (haematoxylin alone).
    Light-background images are returned unchanged.

    Args:
        p: Probability of applying the transform.
    """

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        """Draw the stain amounts, the ground's look and its texture."""
        height, width = params["shape"][:2]
        eosin = self.py_random.random() < 0.5
        texture = self.random_generator.standard_normal(
            (max(1, height // 16), max(1, width // 16))
        ).astype(np.float32)
        return {
            "haematoxylin": self.py_random.uniform(0.08, 0.2),
            "haze": self.py_random.uniform(0.0, 0.02),
            "eosin": self.py_random.uniform(0.01, 0.05) if eosin else 0.0,
            "tint": np.array(
                (1.0, 1.0, 1.0)
                if eosin
                else (1.0, self.py_random.uniform(0.92, 1.0), self.py_random.uniform(0.72, 0.92))
            ),
            "texture": texture,
        }

    def apply(
        self,
        img: np.ndarray,
        haematoxylin: float,
        haze: float,
        eosin: float,
        tint: np.ndarray,
        texture: np.ndarray,
        **params: Any,
    ) -> np.ndarray:
        """Stain a dark-background image."""
        if not is_dark(img):
            return img
        grey = img.astype(np.float32).mean(axis=2)
        low, high = np.median(grey), np.percentile(grey, 99.5)
        nucleus = np.clip((grey - low) / max(high - low, 1.0), 0.0, 1.0)
        smooth = cv2.resize(texture, grey.shape[::-1], interpolation=cv2.INTER_CUBIC)
        hed = np.zeros(img.shape, dtype=np.float64)
        hed[..., 0] = haematoxylin * nucleus + haze
        hed[..., 1] = eosin * np.clip(1.0 + 0.4 * smooth, 0.2, 2.0) * (1.0 - 0.5 * nucleus)
        return _render(hed, tint)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Arguments shown by ``repr`` and used by serialization."""
        return ()


class DimSignal(A.ImageOnlyTransform):
    """Dim a fluorescence image: its signal above the background scaled by a factor below 1.

    Each pixel ``v`` becomes ``b + (v - b) * f`` with ``b`` the image's median
    (its background level) and ``f`` uniform in ``factor``: the nuclei of a
    dim tissue section, 20-40 grey levels above a background of 5-15, instead
    of the bright ones of most DSB fluorescence. Light-background images are
    returned unchanged.

    Args:
        factor: Range of the signal factor.
        p: Probability of applying the transform.
    """

    def __init__(self, factor: tuple[float, float] = (0.2, 0.7), p: float = 0.3):
        super().__init__(p=p)
        self.factor = factor

    def get_params(self) -> dict[str, Any]:
        """Draw the signal factor."""
        return {"factor": self.py_random.uniform(*self.factor)}

    def apply(self, img: np.ndarray, factor: float, **params: Any) -> np.ndarray:
        """Scale the signal of a dark-background image."""
        if not is_dark(img):
            return img
        background = np.median(img.reshape(-1, img.shape[2]), axis=0).astype(np.float32)
        dimmed = background + (img.astype(np.float32) - background) * factor
        return np.rint(np.clip(dimmed, 0.0, 255.0)).astype(np.uint8)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Arguments shown by ``repr`` and used by serialization."""
        return ("factor",)


class UnevenBackground(A.ImageOnlyTransform):
    """Add a smooth, uneven glow to a fluorescence image's background.

    The added field is a 4x4 grid of random levels, upsampled with cubic
    interpolation and scaled to a peak drawn from ``amplitude`` grey levels:
    out-of-focus light and autofluorescence of a tissue section, brighter in
    some parts of the field than others. Light-background images are
    returned unchanged.

    Args:
        amplitude: Range of the field's peak, in grey levels.
        p: Probability of applying the transform.
    """

    def __init__(self, amplitude: tuple[float, float] = (2.0, 25.0), p: float = 0.3):
        super().__init__(p=p)
        self.amplitude = amplitude

    def get_params(self) -> dict[str, Any]:
        """Draw the peak level and the coarse grid of the field."""
        grid = self.random_generator.random((4, 4)).astype(np.float32)
        return {"peak": self.py_random.uniform(*self.amplitude), "grid": grid}

    def apply(self, img: np.ndarray, peak: float, grid: np.ndarray, **params: Any) -> np.ndarray:
        """Add the field to a dark-background image."""
        if not is_dark(img):
            return img
        field = np.clip(cv2.resize(grid, img.shape[1::-1], interpolation=cv2.INTER_CUBIC), 0, None)
        field *= peak / max(float(field.max()), 1e-6)
        lit = img.astype(np.float32) + field[..., None]
        return np.rint(np.clip(lit, 0.0, 255.0)).astype(np.uint8)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Arguments shown by ``repr`` and used by serialization."""
        return ("amplitude",)


class ShotNoise(A.ImageOnlyTransform):
    """Photon (Poisson) noise of a fluorescence image recorded with few counts.

    A grey level ``v`` becomes ``Poisson(v * g) / g`` with ``g`` photons per
    grey level drawn log-uniformly from ``gain``: the noise grows with the
    signal, as in a dim camera image, unlike the even Gaussian noise of the
    generic noise step. The draw is the same on the three channels, which a
    grey fluorescence image has equal. Light-background images are returned
    unchanged.

    Args:
        gain: Range of photons per grey level (fewer is noisier).
        p: Probability of applying the transform.
    """

    def __init__(self, gain: tuple[float, float] = (0.5, 4.0), p: float = 0.3):
        super().__init__(p=p)
        self.gain = gain

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        """Draw the gain and the seed of the counts."""
        low, high = self.gain
        gain = math.exp(self.py_random.uniform(math.log(low), math.log(high)))
        return {"gain": gain, "seed": int(self.random_generator.integers(2**31))}

    def apply(self, img: np.ndarray, gain: float, seed: int, **params: Any) -> np.ndarray:
        """Replace each grey level of a dark-background image by a photon count."""
        if not is_dark(img):
            return img
        grey = img.astype(np.float64).mean(axis=2)
        counts = np.random.default_rng(seed).poisson(grey * gain) / gain
        noisy = img.astype(np.float64) + (counts - grey)[..., None]
        return np.rint(np.clip(noisy, 0.0, 255.0)).astype(np.uint8)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Arguments shown by ``repr`` and used by serialization."""
        return ("gain",)


class ScaledRandomCrop(A.DualTransform):
    """Rescale by a random factor, then take a random square crop.

    The factor is drawn log-uniformly from ``scale_range`` (a factor and its
    inverse are equally likely; DSB nuclei span 4 to 100 pixels across). The
    window of side ``round(size / scale)`` is cut from the original image first
    and only the window is resized, which is much cheaper than rescaling the
    whole image. Where the window is larger than the image, the image lies at
    a random place in it and the rest is padding: small images are padded,
    never stretched to fit.

    Padding is label 0 and, in the image, the image's own per-channel median,
    i.e. its background colour in every modality. Reflecting the image instead
    would mirror nuclei into pixels labelled background.

    Args:
        size: Side of the output crop in pixels.
        scale_range: (low, high) range of the scale factor; low > 0.
        p: Probability of applying the transform.
    """

    def __init__(self, size: int, scale_range: tuple[float, float] = (0.5, 2.0), p: float = 1.0):
        super().__init__(p=p)
        low, high = scale_range
        if size < 1:
            raise ValueError(f"crop size must be positive, got {size}")
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.size = size
        self.scale_range = (float(low), float(high))

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        """Draw the scale and the window's top-left corner for this call."""
        height, width = params["shape"][:2]
        low, high = self.scale_range
        scale = math.exp(self.py_random.uniform(math.log(low), math.log(high)))
        window = max(1, round(self.size / scale))
        # A negative corner places the image inside a larger, padded window.
        top = self.py_random.randint(min(0, height - window), max(0, height - window))
        left = self.py_random.randint(min(0, width - window), max(0, width - window))
        return {"top": top, "left": left, "window": window}

    def apply(self, img: np.ndarray, top: int, left: int, window: int, **params: Any) -> np.ndarray:
        """Crop, pad with the median colour and resize the image."""
        fill = None
        if top < 0 or left < 0 or top + window > img.shape[0] or left + window > img.shape[1]:
            fill = np.median(img.reshape(-1, img.shape[2] if img.ndim == 3 else 1), axis=0)
        cut = _window(img, top, left, window, fill)
        if window == self.size:
            return cut
        # Area averaging when shrinking avoids aliasing thin structures away.
        interpolation = cv2.INTER_AREA if window > self.size else cv2.INTER_LINEAR
        resized = cv2.resize(cut, (self.size, self.size), interpolation=interpolation)
        return resized.reshape((self.size, self.size) + img.shape[2:])

    def apply_to_mask(
        self, mask: np.ndarray, top: int, left: int, window: int, **params: Any
    ) -> np.ndarray:
        """Crop, pad with 0 and resize the label image nearest-neighbour."""
        cut = _window(mask, top, left, window, None)
        if window == self.size:
            return cut
        # NEAREST_EXACT samples at pixel centres, as INTER_LINEAR does for the
        # image, so labels stay aligned with the nuclei they belong to.
        resized = cv2.resize(cut, (self.size, self.size), interpolation=cv2.INTER_NEAREST_EXACT)
        return resized.reshape((self.size, self.size) + mask.shape[2:])

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Arguments shown by ``repr`` and used by serialization."""
        return ("size", "scale_range")


def _window(
    array: np.ndarray, top: int, left: int, window: int, fill: np.ndarray | None
) -> np.ndarray:
    """The square ``window`` at (top, left), filled with ``fill`` (or 0) outside ``array``."""
    out = np.zeros((window, window) + array.shape[2:], dtype=array.dtype)
    if fill is not None:
        out[...] = fill.reshape(array.shape[2:]).astype(array.dtype)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + window, array.shape[0]), min(left + window, array.shape[1])
    out[y0 - top : y1 - top, x0 - left : x1 - left] = array[y0:y1, x0:x1]
    return out


def train_transform(
    crop_size: int,
    scale_range: tuple[float, float] = (0.5, 2.0),
    colour: bool = True,
    colour_params: ColourParams | None = None,
) -> A.Compose:
    """The training pipeline for an RGB uint8 image and its int32 label image.

    Call it as ``transform(image=image, mask=labels)``; the result's ``image``
    is RGB uint8 and its ``mask`` int32, both ``crop_size`` square. The steps
    and their probabilities are listed in the module docstring.

    Args:
        crop_size: Side of the output crops in pixels.
        scale_range: Range of the random rescaling before cropping.
        colour: Apply the colour, inversion, blur and noise steps; without
            them only the scaled crop and D4 remain (an ablation).
        colour_params: Probabilities of the colour steps (default
            :class:`ColourParams`); a step with probability 0 is left out of
            the pipeline, so that the random draws of the others do not
            depend on it.

    Returns:
        The albumentations pipeline; seed it per item with ``set_random_state``.
    """
    geometric = [ScaledRandomCrop(crop_size, scale_range), A.D4(p=1.0)]
    if not colour:
        return A.Compose(geometric)
    params = colour_params or ColourParams()
    steps = [
        StainFluorescence(p=params.stain_fluorescence),
        HaematoxylinOnly(p=params.haematoxylin_only),
        StainJitter(p=params.stain_jitter),
        DimSignal(p=params.dim),
        UnevenBackground(p=params.uneven_background),
        ShotNoise(p=params.shot_noise),
        A.InvertImg(p=params.invert),
        A.ChannelShuffle(p=params.channel_shuffle),
        A.ToGray(num_output_channels=3, p=params.grey),
        A.HueSaturationValue(
            hue_shift_limit=15, sat_shift_limit=25, val_shift_limit=10, p=params.hue_saturation
        ),
        A.RandomBrightnessContrast(
            brightness_limit=0.2, contrast_limit=0.2, p=params.brightness_contrast
        ),
        A.RandomGamma(gamma_limit=(80, 125), p=params.gamma),
        A.OneOf(
            [
                A.GaussianBlur(blur_limit=0, sigma_limit=(0.3, 1.0)),
                A.GaussNoise(std_range=(0.01, 0.04)),
            ],
            p=params.blur_noise,
        ),
    ]
    return A.Compose([*geometric, *(step for step in steps if step.p > 0)])
