"""Summaries of per-image scores: folds, modalities and the README table."""

import math

import numpy as np
import pandas as pd
import pytest

from nucleiseg.competition.submission import score_submission
from nucleiseg.data import reading
from nucleiseg.evaluation.summary import (
    cv_summary,
    evaluate_run,
    fold_table,
    markdown_table,
    modality_table,
    pooled_area_ratio,
    threshold_table,
)
from nucleiseg.inference import oof
from nucleiseg.models.config import save_config
from nucleiseg.models.runs import CONFIG
from nucleiseg.postprocessing.instances import SoftInstances
from tests.helpers import tiny_maskrcnn_config, write_labelled


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


def test_threshold_table_separates_outline_errors_from_detection_errors():
    truth = np.zeros((40, 20), np.uint16)
    truth[0:10, 0:10] = 1
    truth[20:30, 0:10] = 2
    pred = np.zeros_like(truth)
    pred[0:10, 0:10] = 7  # exact
    pred[22:32, 0:10] = 3  # shifted 2 rows: IoU 80 / 120 = 0.667
    spurious = np.zeros_like(truth)
    spurious[5:9, 5:9] = 1  # nothing to find in this image
    per_image = score_submission(
        {"fluo": pred, "empty": spurious}, {"fluo": truth, "empty": np.zeros_like(truth)}
    ).per_image
    per_image["modality"] = ["fluorescence", "tissue"]

    table = threshold_table(per_image)

    fluo = table.loc["fluorescence"]
    assert fluo["0.50"] == fluo["0.65"] == 1.0  # both matched up to IoU 0.65
    assert fluo["0.70"] == fluo["0.95"] == pytest.approx(1 / 3)  # then 1 tp, 1 fp, 1 fn
    assert (table.loc["tissue", ["0.50", "0.95"]] == 0.0).all()
    assert table.loc["all", "0.70"] == pytest.approx(1 / 6)
    assert table.loc["all", ["images", "tp", "fp", "fn"]].tolist() == [2, 2, 1, 0]
    # Both matched nuclei keep their true area: outlines neither too large nor too small.
    assert table.loc["fluorescence", "area_ratio"] == 1.0
    assert np.isnan(table.loc["tissue", "area_ratio"])


def test_the_area_ratio_pools_every_matched_nucleus_over_images():
    per_image = pd.DataFrame(
        {"modality": ["fluorescence"] * 3, "tp": [2, 1, 0], "area_ratio": [1.21, 0.81, np.nan]}
    )
    expected = np.exp((2 * np.log(1.21) + np.log(0.81)) / 3)
    assert pooled_area_ratio(per_image) == pytest.approx(expected, rel=1e-12)
    assert np.isnan(pooled_area_ratio(per_image.iloc[2:]))


def test_evaluate_run_relabels_saved_instances_with_other_thresholds(tmp_path):
    truth = np.zeros((32, 32), np.uint16)
    truth[2:10, 2:10] = 1
    truth[20:28, 20:28] = 2
    write_labelled(tmp_path / "data" / reading.TRAIN_STAGE, {"img": truth, "other": truth})
    folds = {"image_id": ["img", "other"], "fold": [0, 1], "modality": "tissue", "group": [0, 1]}
    pd.DataFrame(folds).to_csv(tmp_path / "folds.csv", index=False)
    fold_dir = tmp_path / "run" / "fold0"
    fold_dir.mkdir(parents=True)
    save_config(tiny_maskrcnn_config(), fold_dir / CONFIG)
    # Both nuclei found, the second with a low score; the saved labels hold only the first.
    detections = SoftInstances(
        (32, 32),
        np.array([0.95, 0.6]),
        np.array([[2, 2, 10, 10], [20, 20, 28, 28]]),
        (np.ones((8, 8), np.float32), np.ones((8, 8), np.float32)),
    )
    oof.save_instances(fold_dir, "img", detections)
    oof.save_prediction(fold_dir, "img", None, np.where(truth == 1, 1, 0).astype(np.uint16))
    args = (tmp_path / "run", tmp_path / "data", tmp_path / "folds.csv")

    saved = evaluate_run(*args).iloc[0]
    assert (saved["tp"], saved["fp"], saved["fn"]) == (1, 0, 1)
    for threshold, found in ((0.9, 1), (0.5, 2)):
        params = tmp_path / f"score{threshold}.yaml"
        params.write_text(f"score_threshold: {threshold}\nmin_size: 4\n")
        row = evaluate_run(*args, params_file=params).iloc[0]
        assert (row["n_pred"], row["tp"], row["fp"], row["fn"]) == (found, found, 0, 2 - found)
    params.write_text("seed_threshold: 0.5\n")  # a U-Net++ setting
    with pytest.raises(ValueError, match="not maskrcnn settings: seed_threshold"):
        evaluate_run(*args, params_file=params)
