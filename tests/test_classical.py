"""The classical baseline finds drawn nuclei, bright or dark, separate or touching."""

import numpy as np
from skimage.draw import disk

from nucleiseg.competition.metric import average_precision
from nucleiseg.models.classical import classical_instances


def _draw(centers, radius=10, shape=(80, 96)) -> np.ndarray:
    labels = np.zeros(shape, np.int32)
    for label, center in enumerate(centers, start=1):
        labels[disk(center, radius, shape=shape)] = label
    return labels


def _render(labels: np.ndarray, background, nucleus) -> np.ndarray:
    image = np.empty((*labels.shape, 3), np.uint8)
    image[:] = background
    image[labels > 0] = nucleus
    return image


def test_separate_bright_nuclei_are_found_exactly():
    truth = _draw([(20, 20), (25, 70), (60, 45)])
    pred = classical_instances(_render(truth, (10, 10, 10), (200, 200, 200)))
    assert average_precision(truth, pred).score == 1.0


def test_dark_nuclei_on_light_tissue_are_found():
    truth = _draw([(20, 20), (25, 70), (60, 45)])
    pred = classical_instances(_render(truth, (230, 190, 215), (90, 40, 140)))
    assert average_precision(truth, pred).score == 1.0


def test_touching_nuclei_are_split():
    truth = _draw([(40, 30), (40, 48)])  # radius 10, centres 18 apart: they touch
    pred = classical_instances(_render(truth, (10, 10, 10), (200, 200, 200)))
    result = average_precision(truth, pred)
    assert result.n_pred == 2
    assert result.tp[0] == 2  # both matched at IoU > 0.5


def test_blank_image_gives_no_nuclei():
    assert not classical_instances(np.full((32, 32, 3), 7, np.uint8)).any()
