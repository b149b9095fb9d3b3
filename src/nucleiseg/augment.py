"""Training augmentation: one pipeline moves an image and its label image together.

The label image goes through albumentations as its ``mask`` and the training
targets are computed afterwards from the augmented labels (see
:mod:`nucleiseg.dataset`). Labels are only ever moved (cropped, padded with 0,
resized nearest-neighbour, flipped, rotated), never blended, so they stay a
valid int32 label image.

The steps of :func:`train_transform`, in order, with their probabilities:

====================================  ======  ======================================
step                                  p       range
====================================  ======  ======================================
:class:`ScaledRandomCrop`             1       scale log-uniform in ``scale_range``
``D4`` (flips, 90-degree rotations)   1       one of the 8 symmetries, uniformly
``InvertImg``                         0.2     fluorescence <-> brightfield look
``ChannelShuffle``                    0.2
``ToGray``                            0.1
``HueSaturationValue``                0.3     hue +-15, saturation +-25, value +-10
``RandomBrightnessContrast``          0.5     brightness and contrast +-0.2
``RandomGamma``                       0.3     gamma 0.8 .. 1.25
one of blur / noise                   0.2     Gaussian blur sigma 0.3 .. 1.0, or
                                              Gaussian noise std 1 % .. 4 % of 255
====================================  ======  ======================================

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
from typing import Any

import albumentations as A
import cv2
import numpy as np


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
    crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0), colour: bool = True
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

    Returns:
        The albumentations pipeline; seed it per item with ``set_random_state``.
    """
    geometric = [ScaledRandomCrop(crop_size, scale_range), A.D4(p=1.0)]
    if not colour:
        return A.Compose(geometric)
    return A.Compose(
        [
            *geometric,
            A.InvertImg(p=0.2),
            A.ChannelShuffle(p=0.2),
            A.ToGray(num_output_channels=3, p=0.1),
            A.HueSaturationValue(hue_shift_limit=15, sat_shift_limit=25, val_shift_limit=10, p=0.3),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
            A.RandomGamma(gamma_limit=(80, 125), p=0.3),
            A.OneOf(
                [
                    A.GaussianBlur(blur_limit=0, sigma_limit=(0.3, 1.0)),
                    A.GaussNoise(std_range=(0.01, 0.04)),
                ],
                p=0.2,
            ),
        ]
    )
