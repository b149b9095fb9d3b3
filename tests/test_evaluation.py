"""Summaries of per-image scores: folds, modalities and the README table."""

import math

import pandas as pd
import pytest

from nucleiseg.evaluation import cv_summary, fold_table, markdown_table, modality_table


@pytest.fixture
def per_image():
    return pd.DataFrame(
        {
            "image_id": list("abcde"),
            "fold": [0, 0, 1, 1, 1],
            "modality": ["fluorescence", "tissue", "fluorescence", "fluorescence", "tissue"],
            "score": [0.5, 0.2, 0.9, 0.7, 0.4],
        }
    )


def test_tables_average_images_not_folds(per_image):
    folds = fold_table(per_image)
    assert folds.loc["0", "mean_ap"] == pytest.approx(0.35)
    assert folds.loc["1", "mean_ap"] == pytest.approx(2.0 / 3)
    # The CV is the mean over the five images, not over the two fold means.
    assert folds.loc["all", "mean_ap"] == pytest.approx(0.54)
    modalities = modality_table(per_image)
    assert modalities.loc["tissue", "images"] == 2
    assert modalities.loc["fluorescence", "mean_ap"] == pytest.approx(0.7)


def test_cv_summary_marks_an_absent_modality_as_nan(per_image):
    row = cv_summary(per_image)
    assert row["images"] == 5 and row["cv"] == pytest.approx(0.54)
    assert row["tissue"] == pytest.approx(0.3) and math.isnan(row["brightfield"])


def test_markdown_table_rows(per_image):
    lines = markdown_table(per_image).splitlines()
    assert lines[0] == "| folds | images | mean AP | fluorescence | brightfield | tissue |"
    assert lines[2] == "| fold 0 | 2 | 0.3500 | 0.5000 (1) |  | 0.2000 (1) |"
    assert lines[4] == "| all (CV) | 5 | 0.5400 | 0.7000 (3) |  | 0.3000 (2) |"
