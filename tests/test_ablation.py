"""Ablation files and variant scoring, on hand-made out-of-fold outputs."""

import numpy as np
import pandas as pd
import pytest
import yaml
from skimage.draw import disk

from nucleiseg.data.targets import make_targets
from nucleiseg.evaluation.ablation import (
    Variant,
    leaderboard_markdown,
    load_ablation,
    score_variant,
)
from nucleiseg.inference.predictor import InferenceOptions
from nucleiseg.models.config import TrainConfig, save_config


def _run(tmp_path, name):
    """A run folder with just a configuration: enough to name its family and thresholds."""
    run = tmp_path / name
    save_config(TrainConfig(), run / "fold0" / "config.yaml")
    return run


def _labels(seed):
    rng = np.random.default_rng(seed)
    labels = np.zeros((48, 48), np.int32)
    for label in range(1, 4):
        labels[disk(tuple(rng.integers(8, 40, 2)), 5, shape=labels.shape)] = label
    return labels


def test_variants_are_scored_with_their_thresholds(tmp_path):
    run = _run(tmp_path, "run")
    truth = {f"img{i}": _labels(i) for i in range(4)}
    perfect = {i: make_targets(labels).astype(np.float32) for i, labels in truth.items()}
    plain = Variant("plain", (run,))
    scores, seconds = score_variant(plain, {run: perfect}, truth, workers=2)
    assert scores["score"].tolist() == [1.0] * 4 and seconds > 0
    none_kept = Variant("none kept", (run,), overrides={"unetpp": {"min_size": 10_000}})
    scores, _ = score_variant(none_kept, {run: perfect}, truth, workers=1)
    assert scores["score"].tolist() == [0.0] * 4
    # Two runs of one family: their maps are averaged (a blank run halves the maps).
    blank = {i: np.zeros_like(m) for i, m in perfect.items()}
    two = Variant("two", (run, _run(tmp_path, "blank")))
    scores, _ = score_variant(two, {run: perfect, two.runs[1]: blank}, truth, workers=1)
    assert scores["score"].max() < 1.0
    with pytest.raises(ValueError, match="overrides for maskrcnn"):
        score_variant(
            Variant("bad", (run,), overrides={"maskrcnn": {"min_size": 1}}), {run: perfect}, truth
        )


def test_ablation_files_are_checked(tmp_path):
    path = tmp_path / "a.yaml"
    run = str(_run(tmp_path, "run"))
    good = {
        "data_dir": "data",
        "defaults": {"runs": [run]},
        "variants": [{"name": "a"}, {"name": "b", "tta": "d4", "scales": [1, 1.5]}],
    }
    path.write_text(yaml.safe_dump(good))
    ablation = load_ablation(path)
    assert ablation.name == "a" and ablation.baseline == "a"
    assert ablation.variants[1].options == InferenceOptions(tta="d4", scales=(1.0, 1.5))
    for bad, message in [
        ({**good, "variant": []}, "unknown key.*variant"),
        (
            {**good, "variants": [{"name": "a", "tile_size": 3}]},
            "variant 1: unknown key.*tile_size",
        ),
        ({**good, "variants": [{"name": "a"}, {"name": "a"}]}, "used twice: a"),
        ({**good, "baseline": "c"}, "baseline 'c'"),
        ({**good, "variants": [{"name": "a", "tta": "d8"}]}, "unknown TTA 'd8'"),
    ]:
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match=message):
            load_ablation(path)


def test_leaderboard_is_sorted_by_cv_and_names_commands():
    results = pd.DataFrame(
        {
            "variant": ["base", "better"],
            "images": [10, 10],
            "cv": [0.5, 0.6],
            "delta": [0.0, 0.1],
            "fluorescence": [0.55, 0.65],
            "brightfield": [float("nan"), 0.2],
            "tissue": [0.3, 0.4],
            "seconds_per_image": [0.5, 1.25],
            "command": ["", "python scripts/train.py --epochs 60"],
        }
    )
    command = "python scripts/ablate.py --config x.yaml"
    text = leaderboard_markdown(results, "t", command, machine="AMD EPYC, 2 CPU threads, float32")
    assert "Seconds per image measured on AMD EPYC, 2 CPU threads, float32." in text
    rows = [line for line in text.splitlines() if line.startswith("| b")]
    assert rows == [
        "| better | 10 | 0.6000 | +0.1000 | 0.6500 | 0.2000 | 0.4000 | 1.25 |",
        "| base | 10 | 0.5000 | +0.0000 | 0.5500 |  | 0.3000 | 0.50 |",
    ]
    assert "- better: `python scripts/train.py --epochs 60`" in text
