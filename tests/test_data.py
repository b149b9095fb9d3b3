"""Reading images, masks and label CSVs, and the errors bad input gets."""

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from helpers import write_item
from skimage.draw import disk

from nucleiseg.competition import rle
from nucleiseg.competition.truth import load_truth, read_labels_csv
from nucleiseg.data import reading
from nucleiseg.data.modality import BRIGHTFIELD, FLUORESCENCE, TISSUE, classify_modality


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def _disc_mask(shape, center, radius) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[disk(center, radius, shape=shape)] = 255
    return mask


def test_read_image_rgba_drops_alpha_and_returns_rgb(tmp_path):
    bgra = np.zeros((5, 7, 4), dtype=np.uint8)
    bgra[..., 0], bgra[..., 1], bgra[..., 2], bgra[..., 3] = 10, 20, 30, 255
    image = reading.read_image(_write(tmp_path / "a.png", bgra))
    assert image.shape == (5, 7, 3) and image.dtype == np.uint8
    assert image[0, 0].tolist() == [30, 20, 10]


def test_read_image_grey_becomes_three_equal_channels(tmp_path):
    grey = np.arange(35, dtype=np.uint8).reshape(5, 7)
    image = reading.read_image(_write(tmp_path / "g.png", grey))
    assert image.shape == (5, 7, 3)
    for c in range(3):
        np.testing.assert_array_equal(image[..., c], grey)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_read_image_16_bit_is_stretched_to_its_range(tmp_path, suffix):
    grey16 = np.array([[1000, 2000], [3000, 1000]], dtype=np.uint16)
    image = reading.read_image(_write(tmp_path / f"deep{suffix}", grey16))
    np.testing.assert_array_equal(image[..., 0], [[0, 128], [255, 0]])


def test_read_image_tiff_colour(tmp_path):
    bgr = np.zeros((4, 4, 3), dtype=np.uint8)
    bgr[..., 2] = 200
    image = reading.read_image(_write(tmp_path / "c.tiff", bgr))
    assert image[..., 0].min() == 200 and image[..., 1:].max() == 0


def test_read_image_errors_name_the_file(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(reading.DataError, match="junk.png: unreadable or truncated"):
        reading.read_image(junk)
    whole = _write(tmp_path / "whole.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3)))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(reading.DataError, match="truncated.png: unreadable or truncated"):
        reading.read_image(truncated)
    with pytest.raises(reading.DataError, match="missing.png: no such file"):
        reading.read_image(tmp_path / "missing.png")


def test_image_size_reads_png_header_and_tiff(tmp_path):
    assert reading.image_size(_write(tmp_path / "a.png", np.zeros((13, 21), np.uint8))) == (13, 21)
    assert reading.image_size(_write(tmp_path / "a.tif", np.zeros((9, 4, 3), np.uint8))) == (9, 4)


def test_read_mask_rejects_wrong_size_non_binary_and_colour(tmp_path):
    with pytest.raises(reading.DataError, match=r"small.png: mask is 4x4 but its image is 5x5"):
        reading.read_mask(_write(tmp_path / "small.png", np.zeros((4, 4), np.uint8)), (5, 5))
    grey = np.zeros((5, 5), np.uint8)
    grey[0, 0], grey[1, 1] = 128, 255
    with pytest.raises(reading.DataError, match="grey.png: mask is not binary"):
        reading.read_mask(_write(tmp_path / "grey.png", grey), (5, 5))
    colour = np.zeros((5, 5, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    with pytest.raises(reading.DataError, match="colour.png: mask is in colour"):
        reading.read_mask(_write(tmp_path / "colour.png", colour), (5, 5))
    ones = np.zeros((5, 5), np.uint8)
    ones[2, 2] = 1
    assert reading.read_mask(_write(tmp_path / "ones.png", ones), (5, 5)).sum() == 1


def test_read_labels_resolves_overlap_first_mask_wins_and_warns(tmp_path):
    shape = (40, 40)
    first, second = _disc_mask(shape, (20, 14), 8), _disc_mask(shape, (20, 24), 8)
    overlap = int(((first > 0) & (second > 0)).sum())
    empty = np.zeros(shape, np.uint8)
    image_path = write_item(tmp_path, "x", np.zeros((*shape, 3), np.uint8), [first, second, empty])
    with pytest.warns(reading.OverlapWarning, match=f"{overlap} pixels claimed.*1 empty mask"):
        labels = reading.read_labels(reading.masks_dir_of(image_path), shape)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels == 1, first > 0)
    np.testing.assert_array_equal(labels == 2, (second > 0) & (first == 0))


def test_read_labels_without_overlap_is_silent(tmp_path, recwarn):
    shape = (30, 30)
    masks = [_disc_mask(shape, (8, 8), 4), _disc_mask(shape, (20, 20), 5)]
    image_path = write_item(tmp_path, "y", np.zeros((*shape, 3), np.uint8), masks)
    labels = reading.read_labels(reading.masks_dir_of(image_path), shape)
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2]
    assert not [w for w in recwarn if issubclass(w.category, reading.OverlapWarning)]


def test_find_images_competition_layout_plain_folder_and_errors(tmp_path):
    comp = tmp_path / "comp"
    write_item(comp, "b", np.zeros((4, 4, 3), np.uint8), [])
    write_item(comp, "a", np.zeros((4, 4, 3), np.uint8), [])
    assert list(reading.find_images(comp)) == ["a", "b"]
    assert reading.find_images(comp)["a"] == comp / "a" / "images" / "a.png"

    plain = tmp_path / "plain"
    _write(plain / "one.png", np.zeros((4, 4), np.uint8))
    _write(plain / "two.tif", np.zeros((4, 4), np.uint8))
    (plain / "notes.txt").write_text("not an image")
    assert list(reading.find_images(plain)) == ["one", "two"]

    (comp / "c" / "images").mkdir(parents=True)
    with pytest.raises(reading.DataError, match="image folder with no image"):
        reading.find_images(comp)
    (tmp_path / "empty").mkdir()
    with pytest.raises(reading.DataError, match="no images found"):
        reading.find_images(tmp_path / "empty")


def test_load_sample_and_truth_from_folder(tmp_path):
    shape = (24, 32)
    masks = [_disc_mask(shape, (6, 6), 4), _disc_mask(shape, (16, 22), 5)]
    image_path = write_item(tmp_path, "img", np.full((*shape, 3), 7, np.uint8), masks)
    sample = reading.load_sample("img", image_path)
    assert sample.image.shape == (*shape, 3)
    assert sample.labels.max() == 2
    truth = load_truth(tmp_path)
    np.testing.assert_array_equal(truth["img"], sample.labels)


def test_read_labels_csv_both_competition_forms(tmp_path):
    labels = np.zeros((10, 12), np.int32)
    labels[1:4, 1:5] = 3
    labels[6:9, 7:12] = 8
    encoded = [code for _, code in rle.encode_labels(labels)]
    train_csv = tmp_path / "stage1_train_labels.csv"
    pd.DataFrame({"ImageId": ["a", "a", "empty"], "EncodedPixels": [*encoded, ""]}).to_csv(
        train_csv, index=False
    )
    with pytest.raises(reading.DataError, match="image sizes must be given"):
        read_labels_csv(train_csv)
    decoded = read_labels_csv(train_csv, sizes={"a": (10, 12), "empty": (5, 5)})
    np.testing.assert_array_equal(decoded["a"] > 0, labels > 0)
    assert decoded["a"].max() == 2 and not decoded["empty"].any()

    solution_csv = tmp_path / "stage1_solution.csv"
    pd.DataFrame(
        {
            "ImageId": ["a", "a", "gone"],
            "EncodedPixels": [*encoded, "1 3"],
            "Height": [10, 10, 5],
            "Width": [12, 12, 5],
            "Usage": ["Public", "Public", "Ignored"],
        }
    ).to_csv(solution_csv, index=False)
    assert list(read_labels_csv(solution_csv)) == ["a"]


def test_read_labels_csv_reports_bad_rle_with_image_id(tmp_path):
    csv = tmp_path / "bad.csv"
    pd.DataFrame({"ImageId": ["z"], "EncodedPixels": ["1 2 3"]}).to_csv(csv, index=False)
    with pytest.raises(reading.DataError, match="image z"):
        read_labels_csv(csv, sizes={"z": (4, 4)})


def _synthetic(background, nucleus, shape=(64, 64)) -> np.ndarray:
    image = np.empty((*shape, 3), np.uint8)
    image[:] = background
    for center in [(16, 16), (40, 44), (20, 48)]:
        image[disk(center, 7, shape=shape)] = nucleus
    return image


def test_classify_modality_on_synthetic_images():
    assert classify_modality(_synthetic((8, 8, 8), (200, 200, 200))) == FLUORESCENCE
    assert classify_modality(_synthetic((210, 210, 210), (60, 60, 60))) == BRIGHTFIELD
    assert classify_modality(_synthetic((230, 180, 210), (90, 40, 140))) == TISSUE
    assert classify_modality(_synthetic((5, 10, 5), (20, 220, 40))) == FLUORESCENCE


def test_bundled_sample_covers_every_modality(repo_root):
    sample = repo_root / reading.SAMPLE_DIR
    train = reading.find_images(sample / reading.TRAIN_STAGE)
    found = {classify_modality(reading.read_image(path)) for path in train.values()}
    assert found == {FLUORESCENCE, BRIGHTFIELD, TISSUE}
    assert len(reading.find_images(sample / reading.TEST_STAGE)) >= 8
