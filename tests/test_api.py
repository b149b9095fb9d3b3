"""The Python API on the shipped bundle and the bundled sample: ``nucleiseg.load`` and
``Segmenter.segment``, and the scripts that segment through it.

The fast preset (one U-Net++ fold, one view) keeps every test to seconds.
"""

import logging
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
import roifile
import tifffile
import torch
import yaml
from conftest import REPO_ROOT
from helpers import refused, run_script

import nucleiseg
from nucleiseg import api, cli
from nucleiseg.atomic import WriteError
from nucleiseg.data import reading, side_outputs
from nucleiseg.data.label_files import label_files, read_label_file
from nucleiseg.inference.family import as_dict
from nucleiseg.training.reference import MANIFEST

WEIGHTS = REPO_ROOT / "weights"
SAMPLE_TEST = REPO_ROOT / reading.SAMPLE_DIR / reading.TEST_STAGE
# Two small images of the sample (256x256 and 260x347).
IDS = [
    "1ef68e93964c2d9230100c1347c328f6385a7bc027879dc3d4c055e6fe80cb3c",
    "52b267e20519174e3ce1e1994b5d677804b16bc670aa5f6ffb6344a0fdf63fde",
]


@pytest.fixture(scope="module")
def model():
    return nucleiseg.load(WEIGHTS, device="cpu", fast=True)


@pytest.fixture(scope="module")
def images():
    """The two sample images as RGB uint8, with a black and a white pixel so that every
    pixel type below stretches back to the same values."""
    loaded = {}
    for image_id in IDS:
        image = reading.read_image(SAMPLE_TEST / image_id / "images" / f"{image_id}.png")
        image[0, 0], image[0, 1] = 0, 255
        loaded[image_id] = image
    return loaded


@pytest.fixture
def folder(tmp_path, images):
    """The two images as a plain folder of PNGs."""
    (tmp_path / "in").mkdir()
    for image_id, image in images.items():
        assert cv2.imwrite(str(tmp_path / "in" / f"{image_id}.png"), image[..., ::-1])
    return tmp_path / "in"


def test_import_stays_light_and_load_comes_at_first_use():
    code = "import sys, nucleiseg; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]
    assert nucleiseg.load is api.load and nucleiseg.Segmenter is api.Segmenter


@pytest.mark.slow
def test_every_pixel_type_and_layout_gives_the_same_int32_labels(model, images):
    image = images[IDS[0]][:128, :160]
    labels = model.segment(image)
    assert labels.dtype == np.int32 and labels.shape == image.shape[:2]
    assert len(np.unique(labels)) > 10  # the sample image has dozens of nuclei
    variants = {
        "RGBA": np.dstack([image, np.full(image.shape[:2], 255, np.uint8)]),
        "uint16": image.astype(np.uint16) * 257,
        "float32": image.astype(np.float32) / 255,
    }
    for name, variant in variants.items():
        np.testing.assert_array_equal(model.segment(variant), labels, err_msg=name)
    grey = model.segment(image[..., 0])
    assert grey.dtype == np.int32 and grey.max() > 10
    for name, variant in {"HxWx1": image[..., :1], "float64": image[..., 0] / 255.0}.items():
        np.testing.assert_array_equal(model.segment(variant), grey, err_msg=name)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((2, 16, 16, 3), np.uint8), "expected a grey, RGB or RGBA image, got shape"),
        ("cells.png", "expected a numpy array, got str; read a file first"),
        (np.zeros((0, 16), np.uint8), "empty image"),
        (np.full((16, 16), np.nan, np.float32), "no pixel has a finite value"),
        (np.zeros((16, 16), bool), "unsupported pixel type bool"),
    ],
    ids=["4-D", "string", "empty", "all NaN", "bool"],
)
def test_bad_images_are_a_clear_value_error(model, image, message):
    with pytest.raises(ValueError, match=message):
        model.segment(image)


def test_bad_options_are_named(model):
    image = np.zeros((16, 16), np.uint8)
    with pytest.raises(TypeError, match="unknown option.*tiles; the options are tta"):
        model.segment(image, tiles=256)
    with pytest.raises(ValueError, match="fast has no test-time views: leave out tta and scales"):
        model.segment(image, tta="d4")  # fast was given to load
    with pytest.raises(ValueError, match="unknown family merge 'best'"):
        model.segment(image, merge="best")
    with pytest.raises(ValueError, match="pixel_size and size_adaptive both set the scale"):
        model.segment(image, pixel_size=0.5, size_adaptive=True)
    with pytest.raises(ValueError, match="pixel size must be a positive number"):
        model.segment(image, pixel_size=-1)


def test_load_refuses_missing_and_broken_folders_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such bundle, run or fold folder"):
        nucleiseg.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no fold<K> folder with"):
        nucleiseg.load(tmp_path)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / MANIFEST).write_text(
        yaml.safe_dump(
            {
                "files": {"run/fold0/config.yaml": {"bytes": 1, "sha256": "0"}},
                "members": [{"run": "run"}],
            }
        )
    )
    with pytest.raises(ValueError, match="missing: .*run/fold0/config.yaml"):
        nucleiseg.load(bundle)
    with pytest.raises(TypeError, match="unknown option"):
        nucleiseg.load(WEIGHTS, speed="fast")


@pytest.mark.slow
def test_a_fold_folder_is_the_fast_presets_model_with_default_options(model, images):
    fold = nucleiseg.load(WEIGHTS / "unetpp_effb0_generalized_ft_bitdepth" / "fold0", device="cpu")
    assert len(fold.members()) == 1 and len(model.members()) == 1
    image = images[IDS[1]]
    np.testing.assert_array_equal(fold.segment(image), model.segment(image))


@pytest.mark.slow
def test_segment_many_is_segment_in_order_with_a_progress_bar(model, images, capsys):
    arrays = list(images.values())
    expected = [model.segment(image) for image in arrays]
    found = model.segment_many(image for image in arrays)  # a generator: read as needed
    for got, want in zip(found, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert "predict: " in capsys.readouterr().err
    with pytest.raises(ValueError, match="image 1: expected a grey, RGB or RGBA"):
        list(model.segment_many([arrays[0][:64, :64], np.zeros((2, 2, 2, 2), np.uint8)]))


def test_a_pixel_size_multiplies_the_scales(model):
    assert model.settings().options.scales == (1.0,)
    assert model.settings(pixel_size=0.5).options.scales == (2.0,)
    assert model.settings(pixel_size=0.125).options.scales == (0.5,)


@pytest.mark.slow
def test_the_readme_example_runs():
    readme = (REPO_ROOT / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    dtype, count = out.stdout.split()
    assert dtype == "int32" and int(count) > 10


# The scripts segment through the API.


@pytest.mark.slow
def test_predict_gives_what_the_api_gives_with_rois_and_a_record(model, images, folder, tmp_path):
    out = tmp_path / "sub.csv"
    argv = ["--weights", WEIGHTS, "--images", folder, "--out", out, "--fast", "--device", "cpu"]
    side = ["--save-labels", tmp_path / "labels", "--save-rois", tmp_path / "rois"]
    labels = run_script("predict", argv + side + ["--label-format", "tif"])
    for image_id, image in images.items():
        np.testing.assert_array_equal(labels[image_id], model.segment(image))
        saved = label_files(tmp_path / "labels")[image_id]
        assert saved.suffix == ".tif"
        np.testing.assert_array_equal(read_label_file(saved), labels[image_id])
        rois = roifile.roiread(tmp_path / "rois" / f"{image_id}.zip")
        assert len(rois) == len(np.unique(labels[image_id])) - 1
    assert set(pd.read_csv(out)["ImageId"]) == set(IDS)
    record = yaml.safe_load(out.with_suffix(".yaml").read_text())
    assert record["weights"] == str(WEIGHTS) and record["fast"] is True
    assert record["inference"]["tta"] == "none" and "pixel_size" not in record
    assert record["thresholds"] == {name: as_dict(p) for name, p in model.params.items()}


@pytest.mark.slow
def test_predict_reads_each_ome_tiffs_pixel_size_and_records_it(model, images, tmp_path):
    folder = tmp_path / "ome"
    folder.mkdir()
    for (image_id, image), microns in zip(images.items(), (0.5, 0.25), strict=True):
        metadata = {"axes": "YXS", "PhysicalSizeX": microns, "PhysicalSizeY": microns}
        tifffile.imwrite(
            folder / f"{image_id}.ome.tif", image, ome=True, photometric="rgb", metadata=metadata
        )
    out = tmp_path / "sub.csv"
    argv = ["--weights", WEIGHTS, "--images", folder, "--out", out, "--fast", "--device", "cpu"]
    labels = run_script("predict", argv + ["--pixel-size", "auto"])
    record = yaml.safe_load(out.with_suffix(".yaml").read_text())
    assert record["pixel_size"] == {
        "training": 0.25,
        "images": {f"{IDS[0]}.ome": 0.5, f"{IDS[1]}.ome": 0.25},
    }
    first = images[IDS[0]]
    np.testing.assert_array_equal(labels[f"{IDS[0]}.ome"], model.segment(first, pixel_size=0.5))
    assert labels[f"{IDS[0]}.ome"].shape == first.shape[:2]  # mapped back to the image's pixels
    np.testing.assert_array_equal(labels[f"{IDS[1]}.ome"], model.segment(images[IDS[1]]))


def test_predict_auto_pixel_size_refuses_images_without_one(folder, tmp_path, no_model_loads):
    argv = ["--weights", WEIGHTS, "--images", folder, "--out", tmp_path / "s.csv", "--fast"]
    problems = refused("predict", argv + ["--pixel-size", "auto"])
    assert len(problems) == 2
    assert all("records no pixel size" in p and "--pixel-size MICRONS" in p for p in problems)
    problems = refused("predict", argv + ["--pixel-size", "0.5", "--size-adaptive"])
    assert problems == ["--pixel-size and --size-adaptive both set the scale; choose one"]
    with pytest.raises(SystemExit):
        run_script("predict", argv + ["--pixel-size", "-2"])


@pytest.mark.slow
def test_a_failed_side_output_keeps_the_submission(folder, tmp_path, monkeypatch, caplog):
    def full_disk(path, image, labels):
        raise WriteError(path, "No space left on device")

    monkeypatch.setattr(side_outputs, "write_overlay", full_disk)
    out, labels, overlays = tmp_path / "sub.csv", tmp_path / "labels", tmp_path / "overlays"
    argv = ["--weights", WEIGHTS, "--images", folder, "--out", out, "--fast", "--device", "cpu"]
    with caplog.at_level(logging.WARNING):
        problems = refused(
            "predict",
            argv + ["--save-labels", labels, "--save-overlays", overlays],
            status=cli.FAILURE_STATUS,
        )
    assert problems == [f"{overlays / (IDS[0] + '.png')}: could not write: No space left on device"]
    assert any("no more labels, overlays" in r.getMessage() for r in caplog.records)
    # Every image is in the submission; the side outputs stopped at the first failure.
    assert set(pd.read_csv(out)["ImageId"]) == set(IDS)
    assert out.with_suffix(".yaml").is_file()
    assert list(label_files(labels)) == [IDS[0]]


def test_predict_adapt_bn_predicts_with_statistics_of_the_images_and_records_it(
    images, folder, tmp_path
):
    adapted = nucleiseg.load(WEIGHTS, device="cpu", fast=True)
    (member,) = adapted.members()
    layer = next(m for m in member.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = layer.running_mean.clone()
    weights_before = {
        k: v.clone()
        for k, v in member.model.state_dict().items()
        if "running" not in k and "num_batches" not in k
    }
    assert adapted.adapt_batchnorm({i: folder / f"{i}.png" for i in IDS}) > 0
    assert not torch.equal(layer.running_mean, before)
    assert all(torch.equal(member.model.state_dict()[k], v) for k, v in weights_before.items())

    out = tmp_path / "sub.csv"
    argv = ["--weights", WEIGHTS, "--images", folder, "--out", out, "--fast", "--device", "cpu"]
    labels = run_script("predict", argv + ["--adapt-bn"])
    for image_id, image in images.items():
        np.testing.assert_array_equal(labels[image_id], adapted.segment(image))
    assert yaml.safe_load(out.with_suffix(".yaml").read_text())["adapt_bn"] is True


def test_predict_adapt_bn_only_with_images(tmp_path, no_model_loads):
    argv = ["--weights", WEIGHTS, "--oof", "--out-dir", tmp_path / "oof", "--adapt-bn"]
    assert "--adapt-bn: only with --images (not with --oof or --whole-slide)" in refused(
        "predict", argv
    )
