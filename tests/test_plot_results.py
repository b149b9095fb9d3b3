"""The leaderboard and per-modality figures are drawn from the saved tables."""

import cv2
import pandas as pd
import pytest
from helpers import run_script

from scripts.plot_results import full_cv


def test_plots_are_written_from_leaderboards_and_reported_numbers(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    pd.DataFrame(
        {
            "variant": [
                "baseline, a name long enough to be wrapped on two lines",
                "better",
                "worse",
            ],
            "images": 10,
            "cv": [0.5, 0.55, 0.45],
            "delta": [0.0, 0.05, -0.05],
            "fluorescence": 0.6,
            "brightfield": float("nan"),
            "tissue": 0.3,
            "seconds_per_image": 1.0,
            "command": "",
        }
    ).to_csv(results / "tta.csv", index=False)
    pd.DataFrame(
        {
            "name": ["U-Net++", "Mask R-CNN"],
            "images": 10,
            "cv": [0.5, 0.45],
            "fluorescence": [0.6, 0.5],
            "brightfield": [0.3, 0.2],
            "tissue": [0.3, 0.25],
            "quoted": [0.5, 0.45],
        }
    ).to_csv(results / "reported.csv", index=False)
    pd.DataFrame(
        {
            "variant": ["default", "+ external data"],
            "images": 10,
            "cv": [0.5, 0.52],
            "delta": [0.0, 0.02],
            "fluorescence": 0.6,
            "brightfield": float("nan"),
            "tissue": [0.3, 0.35],
            "MoNuSeg test (held out)": [0.11, 0.31],
            "seconds_per_image": 1.0,
            "command": "",
        }
    ).to_csv(results / "generalization.csv", index=False)
    written = run_script("plot_results", ["--results", results])
    assert [p.name for p in written] == [
        "leaderboard.png",
        "generalization.png",
        "cv_by_modality.png",
    ]
    for path in written:
        image = cv2.imread(str(path))
        assert image is not None and image.shape[0] > 200 and image.shape[1] > 400
        # Not a blank canvas: bars and text are drawn.
        assert image.std() > 10


def test_nothing_to_draw_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no leaderboard CSV"):
        run_script("plot_results", ["--results", tmp_path])


def test_per_modality_plot_keeps_results_scored_on_all_images():
    reported = pd.DataFrame(
        {"name": ["all folds A", "fold 0 only", "all folds B"], "images": [664, 133, 664]}
    )
    assert full_cv(reported)["name"].tolist() == ["all folds A", "all folds B"]
