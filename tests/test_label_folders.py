"""The ``images/`` + ``labels/`` layout, external training sources, and the errors bad pairs get."""

from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage.draw import disk

from nucleiseg.competition.truth import load_truth
from nucleiseg.data import reading
from nucleiseg.data.dataset import load_samples
from nucleiseg.data.reading import DataError, Sample
from nucleiseg.data.sources import (
    ExtraSource,
    LoadedSource,
    mix_probabilities,
    parse_sources,
    tile_sample,
)
from nucleiseg.models.config import load_config
from nucleiseg.training.checks import training_problems


def _labels(shape=(40, 50), centers=((10, 10), (25, 30)), radius=5) -> np.ndarray:
    labels = np.zeros(shape, np.int32)
    for value, center in zip((3, 700), centers, strict=False):
        labels[disk(center, radius, shape=shape)] = value
    return labels


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def _pair(root: Path, name: str, labels: np.ndarray, suffix: str = ".png") -> None:
    image = np.where(labels > 0, 60, 230).astype(np.uint8)
    _write(root / "images" / f"{name}.png", np.dstack([image, image + 10, image + 20]))
    _write(root / "labels" / f"{name}{suffix}", labels.astype(np.uint16))


def test_a_folder_pair_reads_as_images_with_their_label_images(tmp_path):
    _pair(tmp_path, "b", _labels())
    _pair(tmp_path, "a", _labels(centers=((30, 40),)), suffix=".tif")
    images = reading.find_images(tmp_path)
    assert list(images) == ["a", "b"]
    sample = reading.load_sample("b", images["b"])
    assert sample.image.shape == (40, 50, 3) and sample.labels.dtype == np.int32
    np.testing.assert_array_equal(sample.labels, _labels())  # 16-bit values kept (700)
    assert sorted(np.unique(reading.labels_of(images["a"]))) == [0, 3]
    truth = load_truth(tmp_path)
    assert list(truth) == ["a", "b"]
    assert [s.image_id for s in load_samples(tmp_path)] == ["a", "b"]
    reading.check_labelled(images)
    # A dataset root whose training folder is a folder pair (no stage1_train/).
    assert reading.labelled_root(tmp_path) == tmp_path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.unlink(), "no label image"),
        (lambda p: _write(p, np.zeros((40, 50, 3), np.uint8)), "3 channels"),
        (lambda p: _write(p, np.zeros((41, 50), np.uint16)), "41x50 but its image is 40x50"),
        (lambda p: p.write_bytes(b""), "unreadable or truncated"),
    ],
    ids=["missing", "rgb", "size", "empty"],
)
def test_bad_label_images_are_named(tmp_path, make, message):
    _pair(tmp_path, "ok", _labels())
    _pair(tmp_path, "bad", _labels())
    make(tmp_path / "labels" / "bad.png")
    images = reading.find_images(tmp_path)
    with pytest.raises(DataError, match=message) as caught:
        reading.load_sample("bad", images["bad"])
    assert "bad" in str(caught.value)
    reading.load_sample("ok", images["ok"])


def test_float_labels_must_be_whole_numbers(tmp_path):
    shape = (40, 50)
    whole = _labels(shape).astype(np.float32)
    path = tmp_path / "labels" / "w.tif"
    _write(path, whole)
    np.testing.assert_array_equal(reading.read_label_image(path, shape), _labels(shape))
    _write(path, whole + 0.5)
    with pytest.raises(DataError, match="non-integer"):
        reading.read_label_image(path, shape)


def test_check_labelled_lists_every_image_without_labels(tmp_path):
    for name in ("a", "b", "c"):
        _pair(tmp_path, name, _labels())
    (tmp_path / "labels" / "a.png").unlink()
    (tmp_path / "labels" / "c.png").unlink()
    with pytest.raises(DataError, match="2 of 3 images have no labels") as caught:
        reading.check_labelled(reading.find_images(tmp_path))
    assert "a.png" in str(caught.value) and "c.png" in str(caught.value)


def test_tiles_cover_the_image_and_keep_their_labels():
    labels = np.arange(100 * 70, dtype=np.int32).reshape(100, 70)
    image = np.zeros((100, 70, 3), np.uint8)
    tiles = tile_sample(Sample("x", image, labels), 40)
    # ceil(100/40) = 3 rows at 0, 30, 60; ceil(70/40) = 2 columns at 0, 30.
    assert [t.image_id for t in tiles] == [
        f"x@{top},{left}" for top in (0, 30, 60) for left in (0, 30)
    ]
    covered = np.zeros(labels.shape, bool)
    for tile in tiles:
        top, left = (int(v) for v in tile.image_id.split("@")[1].split(","))
        assert tile.labels.shape == (40, 40) and tile.image.shape == (40, 40, 3)
        np.testing.assert_array_equal(tile.labels, labels[top : top + 40, left : left + 40])
        covered[top : top + 40, left : left + 40] = True
    assert covered.all()
    (whole,) = tile_sample(Sample("y", image, labels), 100)
    assert whole.image_id == "y" and whole.labels is labels


def test_sources_are_parsed_and_mixed_by_weight():
    (source,) = parse_sources([{"path": "ext/train", "weight": 0.25, "tile": 500}])
    assert source == ExtraSource("train", "ext/train", 0.25, 500)
    base = np.array([0.5, 0.25, 0.25])
    extra = LoadedSource(source, [Sample(f"t{i}", np.zeros((1, 1, 3), np.uint8)) for i in range(4)])
    mixed = mix_probabilities(base, [extra])
    assert mixed.sum() == pytest.approx(1.0)
    # The source draws 0.25 / 1.25 = one crop in five, evenly over its tiles.
    assert mixed[3:].sum() == pytest.approx(0.2) and np.ptp(mixed[3:]) == 0
    np.testing.assert_allclose(mixed[:3], base * 0.8)
    for bad, message in [
        ([{"weight": 1}], "no path"),
        ([{"path": "a", "wieght": 1}], "unknown key"),
        ([{"path": "a", "weight": -1}], "negative"),
        ([{"path": "a", "tile": 8}], "at least 32"),
        ([{"path": "x/a"}, {"path": "y/a"}], "unique"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_sources(bad)


def test_training_checks_external_sources_before_reading_any_image(tmp_path):
    own, extra = tmp_path / "own", tmp_path / "extra"
    _pair(own, "a", _labels())
    _pair(own, "b", _labels())
    _pair(extra, "x", _labels())
    _pair(extra, "y", _labels())
    (extra / "labels" / "y.png").unlink()
    folds_csv = tmp_path / "folds.csv"
    folds_csv.write_text("image_id,fold,modality,group\na,0,tissue,0\nb,1,tissue,1\n")
    config = load_config(overrides={"extra_data": [{"path": str(extra), "weight": 0.5}]})
    problems = training_problems(config, own, folds_csv, "0", tmp_path / "run", resume=False)
    assert len(problems) == 1 and "y.png" in problems[0] and "1 of 2 images" in problems[0]
