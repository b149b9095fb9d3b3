"""File formats in and out, each as a round trip: label images as PNG or TIFF (any nucleus
count), ImageJ ROI zips and QuPath GeoJSON outlines, OME-TIFF and ImageJ TIFF input with
their pixel size."""

import json

import cv2
import numpy as np
import pytest
import roifile
import tifffile
from skimage.draw import disk

from nucleiseg.data import reading
from nucleiseg.data.label_files import (
    label_file,
    label_files,
    read_label_file,
    write_label_image,
)
from nucleiseg.data.outlines import nucleus_rings, write_outlines, write_rois
from nucleiseg.data.side_outputs import SideOutputs
from nucleiseg.data.sizing import TRAIN_PIXEL_SIZE, pixel_size_scale, read_pixel_size
from nucleiseg.inference import oof


def _discs() -> np.ndarray:
    """Three separate discs labelled 3, 7 and 20 on a 48x64 image."""
    labels = np.zeros((48, 64), np.int32)
    for label, centre, radius in ((3, (12, 12), 7), (7, (30, 40), 9), (20, (10, 52), 5)):
        labels[disk(centre, radius, shape=labels.shape)] = label
    return labels


def _many_nuclei() -> np.ndarray:
    """100,000 one-pixel nuclei, labels 1..100,000 in a shuffled order, the rest background."""
    labels = np.zeros(320 * 320, np.int32)
    places = np.random.default_rng(0).permutation(labels.size)[:100_000]
    labels[places] = np.arange(1, 100_001)
    return labels.reshape(320, 320)


def _filled(ring, shape) -> np.ndarray:
    """The pixels whose centres a ring of pixel-corner coordinates (+0.5) runs around or through."""
    mask = np.zeros(shape, np.uint8)
    centres = np.rint(np.asarray(ring, float) - 0.5).astype(np.int32)
    cv2.fillPoly(mask, [centres], 1)
    return mask.astype(bool)


# Label images: PNG when the labels fit, TIFF beyond, and every reader takes both.


def test_label_images_are_png_when_they_fit_and_tiff_when_asked(tmp_path):
    labels = _discs()
    png = write_label_image(tmp_path, "a", labels)
    assert png.name == "a.png" and cv2.imread(str(png), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    np.testing.assert_array_equal(read_label_file(png), labels)
    tif = write_label_image(tmp_path, "a", labels, tiff=True)
    assert tif.name == "a.tif" and tifffile.imread(tif).dtype == np.uint16
    assert label_files(tmp_path) == {"a": tif}  # the PNG of the same id is gone
    np.testing.assert_array_equal(read_label_file(tif), labels)
    np.testing.assert_array_equal(reading.read_label_image(tif, labels.shape), labels)


@pytest.mark.slow
def test_a_100000_nucleus_label_image_round_trips_through_every_reader(tmp_path):
    many = _many_nuclei()
    assert len(np.unique(many)) == 100_001
    path = write_label_image(tmp_path, "crowded", many)
    assert path.name == "crowded.tif" and tifffile.imread(path).dtype == np.uint32
    np.testing.assert_array_equal(read_label_file(path), many)
    np.testing.assert_array_equal(reading.read_label_image(path, many.shape), many)
    assert label_file(tmp_path, "crowded") == path
    # Written again with few labels, the id is a PNG again and the TIFF is gone.
    write_label_image(tmp_path, "crowded", _discs())
    assert label_files(tmp_path) == {"crowded": tmp_path / "crowded.png"}
    # The out-of-fold writer and loader: any count, next to PNGs.
    fold_dir = tmp_path / "run" / "fold0"
    oof.save_prediction(fold_dir, "crowded", None, many)
    oof.save_prediction(fold_dir, "sparse", None, _discs())
    loaded = oof.load_oof_labels(tmp_path / "run")
    assert sorted(loaded) == ["crowded", "sparse"]
    np.testing.assert_array_equal(loaded["crowded"][1], many)
    np.testing.assert_array_equal(loaded["sparse"][1], _discs())
    # predict's side outputs write the same file.
    SideOutputs(labels=tmp_path / "side")("crowded", np.zeros((*many.shape, 3), np.uint8), many)
    assert label_files(tmp_path / "side") == {"crowded": tmp_path / "side" / "crowded.tif"}


def test_an_id_with_label_images_in_two_forms_is_refused(tmp_path):
    write_label_image(tmp_path, "a", _discs())
    tifffile.imwrite(tmp_path / "a.tif", _discs().astype(np.uint16))
    with pytest.raises(reading.DataError, match="a also has a.tif; keep one"):
        label_file(tmp_path, "a")
    with pytest.raises(reading.DataError, match="keep one"):
        label_files(tmp_path)


# Outlines: ImageJ ROI zips and QuPath GeoJSON, each filled back into the nuclei.


def test_imagej_roi_zip_round_trips_to_the_nuclei(tmp_path):
    labels = _discs()
    write_rois(tmp_path / "a.zip", labels)
    rois = roifile.roiread(tmp_path / "a.zip")
    assert [roi.name for roi in rois] == ["nucleus 3", "nucleus 7", "nucleus 20"]
    for roi in rois:
        assert roi.roitype == roifile.ROI_TYPE.POLYGON
        label = int(roi.name.split()[1])
        np.testing.assert_allclose(roi.coordinates(), nucleus_rings(labels)[label][0][:-1])
        np.testing.assert_array_equal(_filled(roi.coordinates(), labels.shape), labels == label)


def test_geojson_outlines_follow_qupaths_import_conventions(tmp_path):
    labels = _discs()
    labels[40:44, 2:6] = 3  # a second, smaller piece of nucleus 3
    write_outlines(tmp_path / "a.geojson", labels)
    collection = json.loads((tmp_path / "a.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert [f["properties"]["name"] for f in features] == ["nucleus 3", "nucleus 7", "nucleus 20"]
    for feature in features:
        assert feature["type"] == "Feature"
        assert feature["properties"]["objectType"] == "detection"
        assert feature["properties"]["classification"]["name"] == "Nucleus"
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon" and len(geometry["coordinates"]) == 1
        ring = geometry["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) >= 4
        label = int(feature["properties"]["name"].split()[1])
        largest = labels == label
        if label == 3:  # the larger piece is the one outlined
            largest[40:44, 2:6] = False
        np.testing.assert_array_equal(_filled(ring, labels.shape), largest)


# Input: OME-TIFF and ImageJ TIFF with their pixel size.


def test_ome_tiff_images_and_their_pixel_size_round_trip(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    path = tmp_path / "tissue.ome.tif"
    metadata = {"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}
    tifffile.imwrite(path, rgb, ome=True, photometric="rgb", metadata=metadata)
    np.testing.assert_array_equal(reading.read_image(path), rgb)
    assert read_pixel_size(path) == 0.5
    assert reading.find_images(tmp_path) == {"tissue.ome": path}
    in_nm = tmp_path / "nm.ome.tif"
    metadata |= {"PhysicalSizeX": 325.0, "PhysicalSizeXUnit": "nm"}
    tifffile.imwrite(in_nm, rgb, ome=True, photometric="rgb", metadata=metadata)
    assert read_pixel_size(in_nm) == pytest.approx(0.325)


def test_imagej_tiffs_give_their_calibration_and_plain_files_none(tmp_path):
    grey = np.zeros((8, 8), np.uint16)
    tifffile.imwrite(
        tmp_path / "fiji.tif", grey, imagej=True, resolution=(4.0, 4.0), metadata={"unit": "um"}
    )
    assert read_pixel_size(tmp_path / "fiji.tif") == 0.25
    tifffile.imwrite(tmp_path / "pixels.tif", grey, imagej=True)  # calibrated in pixels
    tifffile.imwrite(tmp_path / "plain.tif", grey)
    cv2.imwrite(str(tmp_path / "plain.png"), grey)
    for name in ("pixels.tif", "plain.tif", "plain.png"):
        assert read_pixel_size(tmp_path / name) is None
    tifffile.imwrite(
        tmp_path / "odd.tif", grey, imagej=True, resolution=(4.0, 4.0), metadata={"unit": "inch"}
    )
    with pytest.raises(reading.DataError, match="unknown unit 'inch'"):
        read_pixel_size(tmp_path / "odd.tif")


def test_a_pixel_size_scales_images_to_the_training_pixel_size():
    assert pixel_size_scale(TRAIN_PIXEL_SIZE) == 1.0
    assert pixel_size_scale(0.5) == 2.0  # 20x: nuclei half as many pixels across, enlarged
    assert pixel_size_scale(0.125) == 0.5
    for bad in (0, -1.0, float("nan"), float("inf"), "0.5", True):
        with pytest.raises(ValueError, match="pixel size must be"):
            pixel_size_scale(bad)
