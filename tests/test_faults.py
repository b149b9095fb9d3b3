"""Bad input and faults: every error names its file, before any work where it can be.

One test (or a few) per case of issue 19: failed writes, NaN pixels, output
paths, input checks, altered weights, fold folders, byte-reproducible weights
and the small things (``--help``, the epoch log line, the validator's images).
"""

import errno
import logging
import os
import subprocess
import sys
from collections import namedtuple

import cv2
import numpy as np
import pytest
import torch
from helpers import refused as _refused
from helpers import run_script, tiny_config
from skimage.draw import disk

from nucleiseg import atomic, cli
from nucleiseg.atomic import WriteError, output_problem, write_bytes, write_png
from nucleiseg.competition.submission import write_submission
from nucleiseg.data import reading
from nucleiseg.data.label_files import write_label_image
from nucleiseg.data.overlays import write_overlay
from nucleiseg.inference import family
from nucleiseg.models import runs
from nucleiseg.models.build import build_model, load_weights
from nucleiseg.models.compact import compact_state
from nucleiseg.models.config import save_config
from nucleiseg.postprocessing.watershed import PostprocessParams
from nucleiseg.training import engine, reference
from nucleiseg.training.checks import run_problems


class _Os:
    """``os`` as nucleiseg.atomic sees it, with some calls replaced (a disk that fills up)."""

    def __init__(self, **replaced):
        self.replaced = replaced

    def __getattr__(self, name):
        return self.replaced.get(name, getattr(os, name))


def _no_space(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _listing(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def _disc_image(seed, size=64):
    labels = np.zeros((size, size), np.uint8)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        labels[disk(tuple(rng.integers(10, size - 10, 2)), 6, shape=labels.shape)] = 1
    return np.where(labels > 0, 200, 20).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """An untrained tiny U-Net++ run (one fold, tuned thresholds) and two 64x64 images."""
    root = tmp_path_factory.mktemp("faults")
    config = tiny_config()
    torch.manual_seed(0)
    model = build_model(config)
    fold_dir = root / "run" / "fold0"
    save_config(config, fold_dir / runs.CONFIG)
    runs.save_weights(compact_state(model.state_dict()), fold_dir / runs.WEIGHTS)
    (root / "run" / runs.POSTPROCESS_YAML).write_text("min_size: 7\nseed_threshold: 0.6\n")
    for name in ("a", "b"):
        _write_png(root / "images" / f"{name}.png", _disc_image(ord(name)))
    return root / "run", root / "images"


# 1. A failed write is an error naming the file, and leaves no file at all.


def test_a_write_that_writes_nothing_is_an_error_naming_the_file(tmp_path, monkeypatch):
    target = tmp_path / "out" / "labels.bin"
    monkeypatch.setattr(atomic, "os", _Os(write=lambda descriptor, data: 0))
    with pytest.raises(WriteError, match=f"{target}: could not write: No space left") as error:
        write_bytes(target, b"0123456789")
    assert error.value.errno == errno.ENOSPC
    assert _listing(tmp_path) == []


def test_a_failed_sync_or_rename_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "labels.png"
    write_png(target, np.ones((4, 5), np.uint16))
    before = target.read_bytes()
    for call in ("fsync", "replace"):
        monkeypatch.setattr(atomic, "os", _Os(**{call: _no_space}))
        with pytest.raises(WriteError, match=f"^{target}: could not write: No space left"):
            write_png(target, np.zeros((4, 5), np.uint16))
        assert target.read_bytes() == before
        assert _listing(tmp_path) == ["labels.png"]


def test_label_pngs_overlays_and_submissions_on_a_full_disk(tmp_path, monkeypatch):
    labels = np.zeros((8, 8), np.int32)
    labels[2:5, 2:5] = 1
    monkeypatch.setattr(atomic, "os", _Os(fsync=_no_space))
    writers = {
        tmp_path / "labels" / "a.png": lambda path: write_label_image(path.parent, "a", labels),
        tmp_path / "overlays" / "a.png": lambda path: write_overlay(
            path, np.zeros((8, 8, 3), np.uint8), labels
        ),
        tmp_path / "sub.csv": lambda path: write_submission({"a": labels}, path),
        tmp_path / "fold0" / runs.WEIGHTS: lambda path: runs.save_weights(
            {"w": torch.ones(2)}, path
        ),
    }
    for path, write in writers.items():
        with pytest.raises(WriteError, match=f"^{path}: could not write: No space left"):
            write(path)
    assert _listing(tmp_path) == []


def test_an_image_that_cannot_be_encoded_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(WriteError, match=f"{tmp_path / 'x.png'}: could not write: cannot encode"):
        write_png(tmp_path / "x.png", np.zeros((4, 4, 7), np.float64))
    assert _listing(tmp_path) == []


@pytest.mark.slow
def test_predict_on_a_full_disk_stops_at_the_first_file_naming_it(tiny_run, tmp_path, monkeypatch):
    run_dir, images = tiny_run
    monkeypatch.setattr(atomic, "os", _Os(fsync=_no_space))
    out, labels = tmp_path / "sub.csv", tmp_path / "labels"
    argv = ["--runs", run_dir, "--images", images, "--out", out, "--save-labels", labels]
    problems = _refused("predict", argv + ["--device", "cpu"], status=cli.FAILURE_STATUS)
    # The side outputs stop at the first label image; the submission is still tried.
    assert problems == [
        f"{labels / 'a.png'}: could not write: No space left on device",
        f"{out}: could not write: No space left on device",
    ]
    assert _listing(tmp_path) == []  # no empty label image, no submission


# 2. A float image with NaN or inf pixels: the finite pixels set the range.


def test_nan_and_inf_pixels_do_not_blank_a_float_image(tmp_path):
    image = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(4, 4)
    image[0, 1], image[3, 2], image[2, 0] = np.nan, np.inf, -np.inf
    path = tmp_path / "float.tif"
    assert cv2.imwrite(str(path), image)
    with pytest.warns(reading.NonFiniteWarning, match="float.tif: 3 NaN or infinite pixels of 16"):
        read = reading.read_image(path)
    finite = np.isfinite(image)
    lo, hi = image[finite].min(), image[finite].max()
    expected = np.rint((image.astype(np.float64) - lo) * 255 / (hi - lo))
    expected[0, 1], expected[3, 2], expected[2, 0] = 0, 255, 0
    np.testing.assert_array_equal(read[..., 0], expected.astype(np.uint8))
    assert read.max() == 255 and np.count_nonzero(read[..., 0]) == 13


def test_a_float_image_without_one_finite_pixel_is_refused(tmp_path):
    path = tmp_path / "nan.tif"
    assert cv2.imwrite(str(path), np.full((3, 3), np.nan, np.float32))
    with pytest.raises(reading.DataError, match="nan.tif: no pixel has a finite value"):
        reading.read_image(path)


# 3. Output paths are checked before any model loads, and named as given.


def test_output_problems_name_the_path_given(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert output_problem(tmp_path / "new" / "sub.csv") is None
    assert output_problem(tmp_path / "labels", folder=True) is None
    assert output_problem(tmp_path) == f"{tmp_path}: is a folder; give a file name"
    assert (
        output_problem(tmp_path / "file", folder=True)
        == f"{tmp_path / 'file'}: is a file, not a folder"
    )
    under_file = tmp_path / "file" / "deeper" / "sub.csv"
    assert (
        output_problem(under_file)
        == f"{under_file}: cannot be created, {tmp_path / 'file'} is a file"
    )

    class ReadOnly:
        def TemporaryFile(self, **kwargs):  # noqa: N802 - tempfile's name
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(atomic, "tempfile", ReadOnly())
    assert output_problem(tmp_path / "new" / "sub.csv") == (
        f"{tmp_path / 'new' / 'sub.csv'}: cannot write in {tmp_path}: Read-only file system"
    )
    monkeypatch.undo()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: usage(100, 100, 0))
    assert output_problem(tmp_path / "sub.csv") == (
        f"{tmp_path / 'sub.csv'}: no space left on its file system (0 bytes free)"
    )
    assert _listing(tmp_path) == ["file"]


def test_predict_checks_every_output_before_any_model_loads(tiny_run, tmp_path, no_model_loads):
    run_dir, images = tiny_run
    (tmp_path / "file").write_text("x")
    argv = ["--runs", run_dir, "--images", images, "--device", "cpu"]
    problems = _refused(
        "predict",
        argv
        + ["--out", tmp_path, "--save-labels", tmp_path / "file" / "labels"]
        + ["--save-overlays", tmp_path / "file"],
    )
    assert problems == [
        f"{tmp_path}: is a folder; give a file name",
        f"{tmp_path / 'file' / 'labels'}: cannot be created, {tmp_path / 'file'} is a file",
        f"{tmp_path / 'file'}: is a file, not a folder",
    ]
    assert _refused("predict", argv) == ["--out is required (or --oof with --out-dir)"]
    assert _refused("predict", argv + ["--out", tmp_path / "s.csv", "--fast", "--tta", "d4"]) == [
        "--fast has no test-time views: leave out --tta and --scales"
    ]


# 4. Inputs are checked before any model loads: one line per problem, exit status 2.


def test_image_files_are_checked_from_their_headers(tmp_path):
    good = _write_png(tmp_path / "good.png", _disc_image(0))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    tiff = tmp_path / "t.tif"
    assert cv2.imwrite(str(tiff), np.zeros((3, 3), np.uint16))
    jpeg_named_png = tmp_path / "jpeg.png"
    jpeg_named_png.write_bytes(cv2.imencode(".jpg", _disc_image(1))[1].tobytes())
    paths = [good, truncated, empty, tiff, jpeg_named_png, tmp_path / "missing.png"]
    assert reading.check_image_files(paths) == [
        f"{truncated}: unreadable or truncated image",
        f"{empty}: empty file (0 bytes)",
        f"{tmp_path / 'missing.png'}: no such file",
    ]


def test_predict_names_a_truncated_image_before_any_model_loads(tiny_run, tmp_path, no_model_loads):
    run_dir, images = tiny_run
    folder = tmp_path / "images"
    for path in images.iterdir():
        _write_png(folder / path.name, cv2.imread(str(path), cv2.IMREAD_UNCHANGED))
    whole = (folder / "b.png").read_bytes()
    (folder / "c.png").write_bytes(whole[: len(whole) - 20])
    argv = ["--runs", run_dir, "--out", tmp_path / "sub.csv", "--device", "cpu"]
    problems = _refused("predict", argv + ["--images", folder])
    assert problems == [f"{folder / 'c.png'}: unreadable or truncated image"]
    problems = _refused("predict", argv + ["--images", tmp_path / "nowhere"])
    assert problems == [f"{tmp_path / 'nowhere'}: no such folder"]
    (tmp_path / "empty").mkdir()
    assert _refused("predict", argv + ["--images", tmp_path / "empty"])[0].startswith(
        f"{tmp_path / 'empty'}: no images found"
    )
    assert not (tmp_path / "sub.csv").exists()


def test_refusal_prints_one_error_line_per_problem_and_exits_2(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.refuse(["a.png: truncated", "b.png: no such file"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: a.png: truncated",
        "error: b.png: no such file",
    ]
    with pytest.raises(SystemExit) as stopped, cli.refusing(reading.DataError):
        raise reading.DataError("c.png: unreadable")
    assert stopped.value.code == 2 and "error: c.png: unreadable" in capsys.readouterr().err


def test_scripts_refuse_bad_folders_without_a_traceback(tmp_path):
    csv = tmp_path / "sub.csv"
    csv.write_text("ImageId,EncodedPixels\n")
    missing = tmp_path / "nowhere"
    assert _refused("validate_submission", [csv, "--images", missing]) == [
        f"{missing}: no such folder"
    ]
    assert _refused("score_submission", [csv, "--truth", missing])[0].startswith(f"{missing}")
    (tmp_path / "file").write_text("x")
    per_image = tmp_path / "file" / "scores.csv"
    assert _refused("evaluate_oof", [missing, "--per-image", per_image]) == [
        f"{per_image}: cannot be created, {tmp_path / 'file'} is a file"
    ]


def test_train_checks_its_inputs_before_reading_any_image(tmp_path):
    labelled = tmp_path / "data" / reading.TRAIN_STAGE
    good = _write_png(labelled / "a" / "images" / "a.png", _disc_image(0))
    (labelled / "a" / "masks").mkdir()
    _write_png(labelled / "b" / "images" / "b.png", _disc_image(1))  # no masks folder
    (labelled / "c" / "images").mkdir(parents=True)
    (labelled / "c" / "images" / "c.png").write_bytes(good.read_bytes()[:40])
    (labelled / "c" / "masks").mkdir()
    argv = ["--data-dir", tmp_path / "data", "--out-dir", tmp_path / "run", "--device", "cpu"]
    problems = _refused("train", argv + ["--folds-csv", tmp_path / "folds.csv"])
    assert problems[0] == f"{labelled / 'c' / 'images' / 'c.png'}: unreadable or truncated image"
    assert "1 of 3 images have no labels" in problems[1]
    assert f"{labelled / 'b' / 'masks'}" in problems[1]
    assert problems[2].startswith(f"{tmp_path / 'folds.csv'}: unreadable folds file")
    assert len(problems) == 3
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("epochs: [1\n")
    problems = _refused("train", argv + ["--config", bad_config])
    assert len(problems) == 1 and problems[0].startswith(f"{bad_config}: not a readable YAML")


# 5. Weights from --runs are checked against the checksum recorded when they were written.


def _copy_run(run_dir, to):
    for path in run_dir.rglob("*"):
        if path.is_file():
            (to / path.relative_to(run_dir)).parent.mkdir(parents=True, exist_ok=True)
            (to / path.relative_to(run_dir)).write_bytes(path.read_bytes())
    return to


def test_altered_weights_are_named_before_and_when_they_load(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run[0], tmp_path / "run")
    weights = run_dir / "fold0" / runs.WEIGHTS
    recorded = (run_dir / "fold0" / runs.WEIGHTS_SHA256).read_text()
    assert recorded == f"{reference.sha256(weights)}  {runs.WEIGHTS}\n"
    assert run_problems([run_dir]) == []
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    weights.write_bytes(bytes(blob))
    message = f"{weights}: corrupt: its sha256 differs from the one recorded"
    assert run_problems([run_dir])[0].startswith(message)
    with pytest.raises(reading.DataError, match=message):
        load_weights(build_model(tiny_config()), weights)
    # Without a recorded checksum the archive's own CRCs still catch a flipped byte.
    (run_dir / "fold0" / runs.WEIGHTS_SHA256).unlink()
    assert run_problems([run_dir])[0].startswith(f"{weights}: corrupt: ")
    weights.write_bytes(bytes(blob[: len(blob) // 3]))
    assert run_problems([run_dir])[0].startswith(f"{weights}: corrupt or truncated")
    with pytest.raises(reading.DataError, match=f"{weights}: corrupt or truncated"):
        load_weights(build_model(tiny_config()), weights)


def test_unreadable_yaml_is_named(tiny_run, tmp_path, no_model_loads):
    run_dir = _copy_run(tiny_run[0], tmp_path / "run")
    config = run_dir / "fold0" / runs.CONFIG
    saved = config.read_text()
    config.write_text("model: unetpp\nepochs: [2\n")
    (problem,) = run_problems([run_dir])
    assert problem.startswith(f"{config}: not a readable YAML file")
    config.write_text(saved)
    (run_dir / runs.POSTPROCESS_YAML).write_text("- 1\n")
    assert run_problems([run_dir]) == [
        f"{run_dir / runs.POSTPROCESS_YAML}: expected a YAML mapping, got list"
    ]
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / reference.MANIFEST).write_text("files: {a: [1\n")
    argv = ["--weights", bundle, "--images", tiny_run[1], "--out", tmp_path / "s.csv"]
    (problem,) = _refused("predict", argv)
    assert problem.startswith(f"{bundle / reference.MANIFEST}: not a readable YAML file")


# 6. A fold folder given as a run keeps its run's tuned thresholds.


def test_a_fold_folder_uses_the_thresholds_of_its_run(tiny_run):
    run_dir, _ = tiny_run
    tuned = PostprocessParams(min_size=7, seed_threshold=0.6)
    assert family.load_params(run_dir) == tuned
    assert family.load_params(run_dir / "fold0") == tuned
    assert family.params_by_family([run_dir / "fold0"]) == {"unetpp": tuned}


@pytest.mark.slow
def test_predict_with_a_fold_folder_logs_where_its_thresholds_come_from(tiny_run, tmp_path, caplog):
    run_dir, images = tiny_run
    argv = ["--runs", run_dir / "fold0", "--images", images, "--out", tmp_path / "s.csv"]
    with caplog.at_level(logging.INFO, logger="predict"):
        labels = run_script("predict", argv + ["--device", "cpu", "--tta", "flip"])
    assert sorted(labels) == ["a", "b"]
    messages = [r.getMessage() for r in caplog.records if r.name == "predict"]
    assert f"{run_dir / 'fold0'}: unetpp, thresholds from {run_dir / runs.POSTPROCESS_YAML}" in (
        messages
    )
    # 8. The INFO lines name what differs from the defaults, not whole dataclasses.
    assert "unetpp thresholds: seed_threshold=0.6, min_size=7" in messages
    assert "2 images; inference options: tta=flip" in messages
    assert not any("PostprocessParams(" in m or "InferenceOptions(" in m for m in messages)


# 7. Identical tensors give identical weight files.


def test_equal_weights_give_equal_bytes(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_config())
    engine.save_compact_weights(model, tmp_path / "a" / runs.WEIGHTS)
    engine.save_compact_weights(model, tmp_path / "b" / runs.WEIGHTS)
    first = (tmp_path / "a" / runs.WEIGHTS).read_bytes()
    assert first == (tmp_path / "b" / runs.WEIGHTS).read_bytes()
    reloaded = torch.load(tmp_path / "a" / runs.WEIGHTS, weights_only=True)
    assert runs.torch_bytes(reloaded) == first
    checkpoint = {"model": model.state_dict(), "epoch": 3}
    engine._save(checkpoint, tmp_path / "a" / runs.LAST)
    engine._save(checkpoint, tmp_path / "b" / runs.LAST)
    assert (tmp_path / "a" / runs.LAST).read_bytes() == (tmp_path / "b" / runs.LAST).read_bytes()
    # Only the compact weights get a recorded checksum; checkpoints are rewritten each epoch.
    assert runs.recorded_checksums(tmp_path / "a") == {
        runs.WEIGHTS: reference.sha256(tmp_path / "a" / runs.WEIGHTS)
    }


# 8. The small things.


def test_train_help_lists_the_model_families():
    from scripts import train

    assert tuple(family.FAMILIES) == cli.MODEL_FAMILIES
    assert "--model {unetpp,maskrcnn}" in train.get_args_parser().format_help()


def test_help_does_not_import_torch(repo_root):
    code = (
        "import sys\n"
        "for name in ('train', 'validate_submission', 'score_submission', 'evaluate_oof',\n"
        "             'predict', 'quickstart', 'evaluate_external', 'finetune',\n"
        "             'learning_curve'):\n"
        "    __import__(f'scripts.{name}', fromlist=['x']).get_args_parser().format_help()\n"
        "print(sorted(m for m in ('torch', 'segmentation_models_pytorch') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_validate_submission_needs_images(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_script("validate_submission", [tmp_path / "sub.csv"])
    assert stopped.value.code == 2
    assert "the following arguments are required: --images" in capsys.readouterr().err


def test_epochs_without_validation_log_no_nan_and_the_weights_get_a_checksum(
    tmp_path, caplog, monkeypatch
):
    # Training and validation stubbed out: what is under test is the log and the files.
    monkeypatch.setattr(engine.Trainer, "train_one_epoch", lambda self, loader, epoch: 0.5)
    monkeypatch.setattr(
        engine, "validate", lambda model, config, samples, device, save=None: (0.25, 0.75)
    )
    labels = np.zeros((64, 64), np.int32)
    labels[disk((30, 30), 8, shape=labels.shape)] = 1
    image = np.dstack([np.where(labels > 0, 200, 10).astype(np.uint8)] * 3)
    train, val = [reading.Sample("t0", image, labels)], [reading.Sample("v0", image, labels)]
    fold_dir = tmp_path / "fold0"
    with caplog.at_level(logging.INFO, logger="nucleiseg.training.engine"):
        engine.train_fold(
            tiny_config(val_every=5),
            train,
            val,
            {"t0": "fluorescence", "v0": "fluorescence"},
            fold_dir,
            torch.device("cpu"),
        )
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [m.rsplit(",", 1)[0] for m in epochs] == [
        "epoch 1: train loss 0.5000, validation not run",
        "epoch 2: train loss 0.5000, val loss 0.2500, val mAP 0.7500",
    ]
    assert runs.recorded_checksums(fold_dir) == {
        name: reference.sha256(fold_dir / name) for name in (runs.WEIGHTS, runs.WEIGHTS_INT8)
    }
    for name in (runs.WEIGHTS, runs.WEIGHTS_INT8):
        assert runs.weights_problem(fold_dir / name) is None
