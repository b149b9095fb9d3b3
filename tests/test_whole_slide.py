"""Whole-slide images: windows read from tiles or strips, blocks segmented with nuclei
owned by one block, and the label image written tile by tile to a tiled TIFF.

A thresholding "model" (connected components of the bright pixels) makes the round
trip exact: a slide streamed block by block must give the whole image's labels,
up to their numbering. The shipped bundle's fast preset checks the same at nucleus
level through ``scripts/predict.py --whole-slide``.
"""

import numpy as np
import pytest
import tifffile
from conftest import REPO_ROOT
from helpers import refused, run_script, tiny_config
from skimage.draw import disk
from skimage.measure import label

import nucleiseg
from nucleiseg.competition.metric import average_precision
from nucleiseg.data.reading import DataError, read_image
from nucleiseg.data.slide_files import LABEL_TILE, SlideReader, slide_problem
from nucleiseg.inference import options, slide
from nucleiseg.inference.predictor import InferenceOptions

WEIGHTS = REPO_ROOT / "weights"


def disc_slide(shape=(600, 700), seed=0) -> np.ndarray:
    """Labels of discs of radius 6-13 px on a grid, and some centred on the 256 px seams."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    centres = [
        (y + rng.integers(-5, 6), x + rng.integers(-5, 6))
        for y in range(20, shape[0], 37)
        for x in range(15, shape[1], 41)
    ]
    centres += [(256, 100), (300, 512), (512, 512), (511, 256), (100, 255)]
    for value, centre in enumerate(centres, 1):
        labels[disk(centre, rng.integers(6, 14), shape=shape)] = value
    return labels


def threshold(image: np.ndarray) -> np.ndarray:
    return label(image[..., 0] > 100)


def same_up_to_numbering(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]).astype(np.int64), axis=1)
    return len(pairs[0]) == len(np.unique(a)) == len(np.unique(b))


@pytest.fixture
def grey_slide(tmp_path):
    labels = disc_slide()
    grey = np.where(labels > 0, 200, 20).astype(np.uint8)
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, grey, tile=(64, 64), compression="zlib")
    return path, grey


@pytest.mark.parametrize(
    "layout", [{"tile": (128, 96)}, {"rowsperstrip": 50}, {}], ids=["tiles", "strips", "one-strip"]
)
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_a_window_reads_as_the_whole_file_reads(tmp_path, layout, dtype):
    rng = np.random.default_rng(1)
    pixels = rng.integers(100, 50000, (300, 350, 3)).astype(dtype)
    if dtype == "uint8":
        pixels = rng.integers(0, 256, (300, 350, 3)).astype(dtype)
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, pixels, photometric="rgb", compression="zlib", **layout)
    whole = read_image(path)
    with SlideReader(path) as reader:
        assert reader.shape == (300, 350)
        np.testing.assert_array_equal(reader.window(37, 90, 300, 350), whole[37:300, 90:350])
        np.testing.assert_array_equal(reader.window(0, 0, 5, 7), whole[:5, :7])


def test_streamed_labels_are_the_whole_image_labels_up_to_numbering(grey_slide, tmp_path):
    path, grey = grey_slide
    result = slide.segment_slide(path, tmp_path / "labels.tif", threshold, block=256, margin=32)
    with tifffile.TiffFile(result.path) as written:
        page = written.pages.first
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (LABEL_TILE, LABEL_TILE)
        streamed = page.asarray()
    whole = threshold(np.dstack([grey] * 3))
    assert streamed.dtype == np.uint32 and streamed.shape == grey.shape
    assert (result.shape, result.blocks) == (grey.shape, 9)
    # One id per nucleus, the seam-crossing ones included, numbered 1..nuclei.
    assert same_up_to_numbering(streamed, whole)
    assert np.array_equal(np.unique(streamed), np.arange(result.nuclei + 1))
    assert result.nuclei == whole.max()


def test_a_nucleus_on_a_seam_is_kept_whole_by_one_block(grey_slide, tmp_path):
    path, grey = grey_slide
    streamed = tifffile.imread(
        slide.segment_slide(path, tmp_path / "labels.tif", threshold, block=256, margin=32).path
    )
    whole = label(grey > 100)
    for centre in [(256, 100), (512, 512), (100, 255)]:
        assert streamed[centre] and whole[centre]
        np.testing.assert_array_equal(streamed == streamed[centre], whole == whole[centre])


def test_a_failed_block_leaves_no_file(grey_slide, tmp_path):
    path, _ = grey_slide
    calls = []

    def failing(image):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("out of memory")
        return threshold(image)

    out = tmp_path / "out" / "labels.tif"
    with pytest.raises(RuntimeError, match="out of memory"):
        slide.segment_slide(path, out, failing, block=256, margin=32)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_slides_that_cannot_be_read_in_pieces_are_refused(tmp_path, monkeypatch):
    rgb = np.zeros((64, 64, 3), np.uint8)
    tifffile.imwrite(
        tmp_path / "planes.tif", np.moveaxis(rgb, 2, 0), photometric="rgb", planarconfig="separate"
    )
    tifffile.imwrite(tmp_path / "strip.tif", rgb, photometric="rgb")
    (tmp_path / "text.tif").write_text("not a tiff")
    assert "separately" in slide_problem(tmp_path / "planes.tif")
    assert "no such file" in slide_problem(tmp_path / "missing.tif")
    assert "cannot be read" in slide_problem(tmp_path / "text.tif")
    assert slide_problem(tmp_path / "strip.tif") is None
    monkeypatch.setattr("nucleiseg.data.slide_files.MAX_SEGMENT_PIXELS", 1000)
    assert "too large to read in pieces" in slide_problem(tmp_path / "strip.tif")
    with pytest.raises(DataError, match="too large"):
        SlideReader(tmp_path / "strip.tif")


def test_whole_image_options_and_bad_blocks_are_refused():
    stretched = tiny_config(input_norm={"mode": "percentile"})
    problems = slide.slide_problems(
        InferenceOptions(size_adaptive=True), [stretched, tiny_config()]
    )
    assert len(problems) == 2 and "size_adaptive" in problems[0] and "input_norm" in problems[1]
    assert slide.slide_problems(InferenceOptions(), [tiny_config()]) == []
    for block, margin in [(300, 32), (0, 32), (256, -1)]:
        with pytest.raises(ValueError):
            slide.check_blocks(block, margin)
    assert (options.DEFAULT_BLOCK % LABEL_TILE, options.DEFAULT_MARGIN) == (0, 128)


def test_predict_refuses_a_bad_whole_slide_run_before_a_model_loads(
    grey_slide, tmp_path, no_model_loads
):
    path, _ = grey_slide
    problems = refused(
        "predict",
        ["--whole-slide", tmp_path / "missing.tif", "--out", tmp_path / "labels.png"]
        + ["--block", 300, "--save-overlays", tmp_path / "o", "--size-adaptive"],
    )
    assert len(problems) == 5
    assert any("missing.tif: no such file" in p for p in problems)
    assert any("name a .tif" in p for p in problems)
    assert any("--block 300" in p for p in problems)
    assert any("--save-overlays" in p for p in problems)
    assert any("--size-adaptive" in p for p in problems)
    problems = refused("predict", ["--whole-slide", path, "--oof", "--out", path])
    assert any("choose one" in p for p in problems) and any("slide itself" in p for p in problems)


@pytest.mark.slow
def test_predict_whole_slide_gives_the_in_memory_nuclei(grey_slide, tmp_path):
    path, grey = grey_slide
    out = tmp_path / "labels.tif"
    argv = ["--whole-slide", path, "--out", out, "--fast", "--device", "cpu"]
    result = run_script("predict", argv + ["--block", 256, "--block-margin", 64])
    streamed = tifffile.imread(out)
    assert result.nuclei == len(np.unique(streamed)) - 1 > 200
    assert (tmp_path / "labels.yaml").is_file()
    model = nucleiseg.load(WEIGHTS, device="cpu", fast=True)
    whole = model.segment(np.dstack([grey] * 3))
    score = average_precision(whole, streamed.astype(np.int32))
    # At IoU 0.5 the streamed nuclei are the in-memory ones, a seam's worth of
    # block-edge differences aside.
    assert score.fp[0] + score.fn[0] <= 0.02 * score.n_true
