"""Fine-tuning on a small labelled folder, its bad inputs, outlines and the learning curve."""

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import disc_labels, run_script, tiny_config
from skimage.draw import disk

from nucleiseg.data.label_files import read_label_file
from nucleiseg.data.outlines import nucleus_rings, outlines_geojson
from nucleiseg.data.reading import BinaryLabelsWarning, Sample
from nucleiseg.inference import oof
from nucleiseg.inference.family import params_by_family
from nucleiseg.models import runs
from nucleiseg.models.build import build_model
from nucleiseg.models.config import save_config
from nucleiseg.training import learning_curve, reference
from nucleiseg.training.engine import save_compact_weights
from nucleiseg.training.finetune import (
    FOLDS_CSV,
    load_finetune_config,
    load_labelled_set,
    split_folds,
)

# A few steps on 64 px crops: seconds on 2 CPU cores.
TINY = {
    "tile": 64,
    "train": {"epochs": 3, "samples_per_epoch": 8, "lr": 3e-3, "val_every": 3},
}


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def _folder(root: Path, count: int, size: int = 64, seed: int = 0) -> Path:
    """``images/`` + ``labels/`` of bright discs on a dark ground, 16-bit label PNGs."""
    for i in range(count):
        labels = disc_labels(seed + i, size, count=5)
        grey = np.where(labels > 0, 200, 20).astype(np.uint8)
        _write(root / "images" / f"im{seed + i}.png", np.dstack([grey] * 3))
        _write(root / "labels" / f"im{seed + i}.png", labels.astype(np.uint16))
    return root


@pytest.fixture(scope="module")
def start_run(tmp_path_factory) -> Path:
    """A run folder with one fold of a tiny U-Net++ of random weights, as training leaves it."""
    fold_dir = tmp_path_factory.mktemp("start") / "tiny" / "fold0"
    config = tiny_config()
    save_config(config, fold_dir / runs.CONFIG)
    save_compact_weights(build_model(config), fold_dir / runs.WEIGHTS)
    return fold_dir.parent


def _config(tmp_path: Path, settings: dict) -> Path:
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.mark.slow
def test_a_finetune_lowers_the_loss_and_exports_a_bundle_predict_uses(start_run, tmp_path):
    folder = _folder(tmp_path / "mine", 6, size=96)
    out_dir = tmp_path / "finetuned"
    result = run_script(
        "finetune",
        ["--images", folder, "--from", start_run, "--config", _config(tmp_path, TINY)]
        + ["--out-dir", out_dir, "--device", "cpu"],
    )
    # Six images: fold 0 of 5 (2 images) held out, the 4 others cut into 2x2 tiles of 64 px.
    folds = pd.read_csv(out_dir / FOLDS_CSV)
    held_out = sorted(folds.loc[folds["fold"] == 0, "image_id"])
    (fold,) = result.folds
    assert (fold.fold, fold.train_images, fold.train_tiles, fold.val_images) == (0, 4, 16, 2)
    assert fold.val_loss < fold.start_val_loss
    history = pd.read_csv(out_dir / "fold0" / runs.EPOCHS_CSV)
    assert len(history) == 3 and history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    # The validation images keep their labels and raw outputs, as after training.
    saved = sorted(p.stem for p in (out_dir / "fold0" / oof.OOF_DIR / oof.LABELS_DIR).iterdir())
    assert saved == held_out and len(oof.load_probabilities(out_dir / "fold0")) == 2
    trained = set(folds["image_id"]) - set(held_out)
    assert runs.read_split(out_dir / "fold0") == runs.Split(frozenset(trained), frozenset(held_out))
    config = yaml.safe_load((out_dir / "fold0" / runs.CONFIG).read_text())
    assert config["init_from"] == str(start_run / "fold0" / runs.WEIGHTS)
    assert config["lr"] == 3e-3 and set(config["modality_weights"].values()) == {1.0}
    assert config["encoder"] == tiny_config().encoder
    # The re-tuned thresholds score at least as well as the start's on those images.
    assert result.val_map_tuned >= result.val_map

    bundle = out_dir / "bundle"
    manifest = yaml.safe_load((bundle / reference.MANIFEST).read_text())
    (member,) = manifest["members"]
    assert member["run"] == out_dir.name and member["oof_images"] == 2
    assert member["data"] == f"{folder}, every image outside fold 0"
    (bundled_run,) = reference.verify(bundle)
    assert params_by_family([bundled_run])["unetpp"] == result.params

    labels = run_script(
        "predict",
        ["--weights", bundle, "--images", folder / "images", "--out", tmp_path / "sub.csv"]
        + ["--save-labels", tmp_path / "labels", "--save-outlines", tmp_path / "outlines"]
        + ["--device", "cpu"],
    )
    assert sorted(labels) == sorted(folds["image_id"])
    for image_id, predicted in labels.items():
        np.testing.assert_array_equal(
            read_label_file(tmp_path / "labels" / f"{image_id}.png"), predicted
        )
        outlines = json.loads((tmp_path / "outlines" / f"{image_id}.geojson").read_text())
        assert len(outlines["features"]) == len(np.unique(predicted[predicted > 0]))


def _binary(values: int) -> np.ndarray:
    """Two touching discs and a separate one, all with the same value."""
    mask = np.zeros((40, 50), bool)
    for center in ((12, 12), (12, 23), (30, 38)):
        mask[disk(center, 6, shape=mask.shape)] = True
    return (mask * values).astype(np.uint8)


@pytest.mark.parametrize("value", [1, 255], ids=["0-1", "0-255"])
def test_binary_mask_labels_become_regions_with_a_warning(tmp_path, value):
    folder = _folder(tmp_path / "mine", 2)
    _write(folder / "images" / "binary.png", np.full((40, 50, 3), 30, np.uint8))
    _write(folder / "labels" / "binary.png", _binary(value))
    with pytest.warns(BinaryLabelsWarning, match=r"binary\.png: a binary mask.*touching nuclei"):
        samples, problems = load_labelled_set(folder)
    assert problems == []
    (sample,) = [s for s in samples if s.image_id == "binary"]
    # The touching pair is one region, the separate disc another.
    assert sorted(np.unique(sample.labels)) == [0, 1, 2]


def _one_image(root: Path) -> Path:
    return _folder(root, 1)


def _unlabelled(root: Path) -> Path:
    _folder(root, 3)
    for name in ("im1.png", "im2.png"):
        (root / "labels" / name).unlink()
    return root


def _no_labels_folder(root: Path) -> Path:
    _folder(root, 3)
    for path in (root / "labels").iterdir():
        path.unlink()
    (root / "labels").rmdir()
    return root


def _wrong_size(root: Path) -> Path:
    _folder(root, 3)
    _write(root / "labels" / "im1.png", np.zeros((65, 64), np.uint16))
    return root


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_one_image, r"mine: 1 labelled image\(s\); fine-tuning needs at least 2"),
        (_unlabelled, r"2 of 3 images have no labels:\n.*im1\.png.*\n.*im2\.png"),
        (_no_labels_folder, r"mine: holds images/ but no labels/ folder"),
        (_wrong_size, r"labels/im1\.png: label image is 65x64 but its image is 64x64"),
    ],
    ids=["one image", "images without labels", "no labels folder", "wrong size"],
)
def test_bad_folders_are_refused_by_name_before_anything_is_written(
    start_run, tmp_path, capsys, make, message
):
    folder = make(tmp_path / "mine")
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as refused:
        run_script("finetune", ["--images", folder, "--from", start_run, "--out-dir", out_dir])
    assert refused.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out_dir.exists()


def test_outputs_start_model_and_settings_are_checked_first(start_run, tmp_path, capsys):
    folder = _folder(tmp_path / "mine", 3)
    used = tmp_path / "used"
    (used / "fold0").mkdir(parents=True)
    (used / "fold0" / "last.ckpt").write_bytes(b"x")
    other_bundle = tmp_path / "other"
    other_bundle.mkdir()
    (other_bundle / "keep.txt").write_text("not a bundle of this run")
    cases = [
        (["--out-dir", used], f"{used}: not empty; pass --resume"),
        (["--out-dir", tmp_path / "a", "--bundle", other_bundle], "is not this fine-tune's"),
        (["--out-dir", tmp_path / "b", "--family", "maskrcnn"], "no maskrcnn model"),
        (["--out-dir", tmp_path / "c", "--fold", "3"], "no finished unetpp fold 3"),
        (["--out-dir", tmp_path / "d", "--bundle", tmp_path], "would replace the run folder"),
        (["--out-dir", tmp_path / "e", "--bundle", tmp_path / "e" / "fold0"], "a fold folder"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as refused:
            run_script("finetune", ["--images", folder, "--from", start_run, *extra])
        assert refused.value.code == 2
        assert message in capsys.readouterr().err
    assert (other_bundle / "keep.txt").is_file() and not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="encoder cannot be set"):
        load_finetune_config(overrides={"train": {"encoder": "resnet34"}})
    with pytest.raises(ValueError, match="unknown setting.*epoch"):
        load_finetune_config(overrides={"train": {"epoch": 3}})


def test_small_sets_train_every_fold_and_larger_ones_hold_out_fold_0():
    def samples(count):
        return [Sample(f"im{i}", np.full((8, 8, 3), 20, np.uint8), None) for i in range(count)]

    settings = load_finetune_config()
    folds, trained = split_folds(samples(3), settings, seed=0)
    assert trained == [0, 1, 2] and sorted(folds["fold"]) == [0, 1, 2]
    folds, trained = split_folds(samples(10), settings, seed=0)
    assert trained == [0] and (folds["fold"].value_counts() == 2).all()
    again, _ = split_folds(samples(10), settings, seed=0)
    pd.testing.assert_frame_equal(folds, again)


def test_subsets_are_seeded_and_nested():
    ids = [f"tile{i:02d}" for i in range(30)]
    subsets = [learning_curve.draw_subset(ids, n, seed=0) for n in (2, 5, 10, 20, 30)]
    for smaller, larger in zip(subsets, subsets[1:], strict=False):
        assert set(smaller) < set(larger)
    assert subsets[1] == learning_curve.draw_subset(list(reversed(ids)), 5, seed=0)
    assert subsets[1] != learning_curve.draw_subset(ids, 5, seed=1)
    with pytest.raises(ValueError, match="cannot draw 31 images from 30"):
        learning_curve.draw_subset(ids, 31, seed=0)


def _ring_area(ring) -> float:
    x, y = np.asarray(ring, float).T
    return 0.5 * abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def test_outlines_trace_every_nucleus_and_its_pieces():
    labels = np.zeros((40, 60), np.int32)
    labels[disk((20, 15), 8)] = 4
    labels[5, 50] = 9  # one pixel
    labels[30:34, 40:44] = 12  # a nucleus in two pieces
    labels[30:34, 50:54] = 12
    rings = nucleus_rings(labels)
    assert sorted(rings) == [4, 9, 12] and len(rings[12]) == 2
    # A ring through the boundary pixels' centres: within a half-pixel band of the area.
    area, perimeter = np.count_nonzero(labels == 4), 2 * np.pi * 8
    assert area - perimeter / 2 - 1 < _ring_area(rings[4][0]) < area
    assert _ring_area(rings[9][0]) == 1.0 and rings[9][0][0] == rings[9][0][-1]
    geometry = {
        f["properties"]["name"]: f["geometry"] for f in outlines_geojson(labels)["features"]
    }
    # One Polygon per nucleus, as QuPath imports detections: the largest piece's.
    assert {g["type"] for g in geometry.values()} == {"Polygon"}
    assert geometry["nucleus 12"]["coordinates"] == [rings[12][0]]


@pytest.mark.slow
def test_learning_curve_writes_its_tables_and_plot_and_skips_finished_points(
    start_run, tmp_path, monkeypatch
):
    train = _folder(tmp_path / "train", 4)  # one more than the sizes run: see --tables-only
    test = _folder(tmp_path / "test", 2, seed=100)
    tiny = {
        "every_fold_below": 3,
        "tile": 64,
        "train": {"epochs": 1, "samples_per_epoch": 4, "val_every": 1},
    }
    curve = {
        "name": "tiny_curve",
        "train": str(train),
        "test": str(test),
        "start": str(start_run),
        "sizes": [2, 3],
        "work_dir": str(tmp_path / "points"),
        "finetune": tiny,
        "scratch": {"lr": 2e-3},
    }
    config = tmp_path / "curve.yaml"
    config.write_text(yaml.safe_dump(curve))
    results = tmp_path / "results"
    argv = ["--config", config, "--out-dir", results, "--device", "cpu"]
    run_script("learning_curve", argv)

    points = pd.read_csv(results / "tiny_curve.csv")
    trained = points[points["arm"] != learning_curve.START]
    assert sorted(zip(trained["images"], trained["arm"], strict=True)) == [
        (n, arm) for n in (2, 3) for arm in sorted(learning_curve.ARMS)
    ]
    # Two images: each validated by the model of the other; three: fold 0 of 3 held out.
    assert dict(zip(trained["images"], trained["folds"], strict=False)) == {2: 2, 3: 1}
    assert trained["test_map"].between(0, 1).all() and len(points) == 5
    assert trained.loc[trained["arm"] == learning_curve.SCRATCH, "start_val_map"].isna().all()
    markdown = (results / "tiny_curve.md").read_text()
    assert "| images | fine-tuned | from scratch | fine-tuned - scratch |" in markdown
    assert "One seed per point" in markdown
    assert (results / "tiny_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for arm in learning_curve.ARMS:
        point_dir = learning_curve.load_curve(config).point_dir(arm, 3, 0)
        lr = yaml.safe_load((point_dir / "fold0" / runs.CONFIG).read_text())["lr"]
        assert lr == (2e-3 if arm == learning_curve.SCRATCH else 5e-4)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished point was trained again")

    monkeypatch.setattr(learning_curve, "run_finetune", no_training)
    run_script("learning_curve", argv)
    pd.testing.assert_frame_equal(pd.read_csv(results / "tiny_curve.csv"), points)

    # --tables-only rewrites the tables from the finished points, a size not run included.
    config.write_text(yaml.safe_dump({**curve, "sizes": [2, 3, 4]}))
    tables = tmp_path / "tables"
    run_script("learning_curve", [*argv[:2], "--out-dir", tables, "--tables-only"])
    pd.testing.assert_frame_equal(pd.read_csv(tables / "tiny_curve.csv"), points)
    assert "| 4 | not run yet | not run yet |  |" in (tables / "tiny_curve.md").read_text()
    assert not learning_curve.load_curve(config).point_dir(learning_curve.SCRATCH, 4, 0).exists()


def test_learning_curve_needs_the_start_weights_to_run_points_but_not_to_write_tables(
    tmp_path, capsys
):
    # A start run kept for its records: a configuration, no weights.
    start = tmp_path / "start"
    save_config(tiny_config(), start / "fold0" / runs.CONFIG)
    work_dir = tmp_path / "points"
    config = tmp_path / "curve.yaml"
    curve = {
        "name": "kept_curve",
        "train": str(_folder(tmp_path / "train", 2)),
        "test": str(_folder(tmp_path / "test", 1, seed=100)),
        "start": str(start),
        "sizes": [2],
        "work_dir": str(work_dir),
    }
    config.write_text(yaml.safe_dump(curve))
    results = tmp_path / "results"
    problems = learning_curve.curve_problems(learning_curve.load_curve(config), results)
    assert len(problems) == 1 and problems[0].startswith(f"{start}: no fold<K> folder with")
    argv = ["--config", config, "--out-dir", results, "--device", "cpu"]
    with pytest.raises(SystemExit) as refused:
        run_script("learning_curve", argv)
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {problems[0]}"
    assert not work_dir.exists() and not results.exists()
    # --tables-only reads the finished points only: the start model's row here.
    work_dir.mkdir()
    start_row = {"arm": learning_curve.START, "images": 0, "test_map": 0.25}
    (work_dir / learning_curve.START_JSON).write_text(json.dumps(start_row))
    run_script("learning_curve", [*argv, "--tables-only"])
    written = pd.read_csv(results / "kept_curve.csv")
    assert written["arm"].tolist() == [learning_curve.START]
    assert written["test_map"].tolist() == [0.25]
