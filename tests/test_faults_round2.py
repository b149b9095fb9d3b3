"""Bad input and faults, second round (issue 40): leaks, late refusals, tracebacks, small things.

5. A run records each fold's training and held-out images (``split.csv``), and a
   folds file that disagrees is refused before any score or model.
7. A float TIFF without one finite pixel is refused by the input check.
8. One ``error:`` line, not a traceback, for an empty run folder and for a
   resume with other settings.
9. The smaller ones: duplicate fold ids, ambiguous label images, truncated
   PNGs, images of one id in two formats.
"""

import logging
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import yaml
from helpers import disc_labels, refused, run_script, tiny_config, write_labelled

from nucleiseg.competition.folds import read_folds
from nucleiseg.data import reading
from nucleiseg.data.reading import TRAIN_STAGE
from nucleiseg.evaluation.ablation import (
    CACHE_DIR,
    TIMING,
    load_ablation,
    missing_weights,
    views_key,
)
from nucleiseg.inference import oof
from nucleiseg.models import runs
from nucleiseg.models.build import build_model
from nucleiseg.models.compact import compact_state
from nucleiseg.models.config import TrainConfig, config_changes, load_config, save_config
from nucleiseg.training import engine

IDS = ("img0", "img1", "img2", "img3")
FOLD_OF = {"img0": 0, "img1": 0, "img2": 1, "img3": 1}


def _folds_csv(path, fold_of):
    frame = pd.DataFrame(
        {
            "image_id": list(fold_of),
            "fold": list(fold_of.values()),
            "modality": "fluorescence",
            "group": range(len(fold_of)),
        }
    )
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """Four labelled images in two folds, the folds file and the one with folds 0 and 1 swapped,
    and an untrained tiny run whose folds record their splits and hold the true labels as OOF."""
    root = tmp_path_factory.mktemp("split")
    labels = {image_id: disc_labels(n) for n, image_id in enumerate(IDS)}
    write_labelled(root / "data" / TRAIN_STAGE, labels)
    folds = _folds_csv(root / "folds.csv", FOLD_OF)
    swapped = _folds_csv(root / "swapped.csv", {i: 1 - k for i, k in FOLD_OF.items()})
    config = tiny_config()
    torch.manual_seed(0)
    weights = compact_state(build_model(config).state_dict())
    run_dir = root / "run"
    for fold in (0, 1):
        fold_dir = run_dir / f"fold{fold}"
        save_config(config, fold_dir / runs.CONFIG)
        runs.save_weights(weights, fold_dir / runs.WEIGHTS)
        runs.write_run_info(fold_dir, fold, root / "data", torch.device("cpu"), amp=False)
        held_out = [i for i in IDS if FOLD_OF[i] == fold]
        runs.write_split(fold_dir, [i for i in IDS if i not in held_out], held_out)
        for image_id in held_out:
            oof.save_prediction(fold_dir, image_id, None, labels[image_id])
    return run_dir, root / "data", folds, swapped


def _swapped_message(run_dir, swapped):
    return (
        f"{run_dir / 'fold0'}: fold 0 trained on img2, which {swapped} holds out in fold 0 "
        f"(4 images disagree with its {runs.SPLIT_CSV}); give the folds file it was trained with"
    )


# 5. Each fold records its split; a folds file that disagrees with it is refused.


def test_training_records_each_folds_training_and_held_out_images(
    recorded_run, tmp_path, monkeypatch
):
    # Training and validation stubbed out: what is under test is the record.
    monkeypatch.setattr(engine.Trainer, "train_one_epoch", lambda self, loader, epoch: 0.5)
    monkeypatch.setattr(
        engine, "validate", lambda model, config, samples, device, save=None: (0.2, 0.7)
    )
    _, data_dir, folds, _ = recorded_run
    config = tiny_config(epochs=1)
    engine.train_folds(config, data_dir, folds, "all", tmp_path / "run", torch.device("cpu"))
    assert (tmp_path / "run" / "fold1" / runs.SPLIT_CSV).read_text() == (
        "image_id,role\nimg0,train\nimg1,train\nimg2,validation\nimg3,validation\n"
    )
    assert runs.read_split(tmp_path / "run" / "fold0") == runs.Split(
        frozenset({"img2", "img3"}), frozenset({"img0", "img1"})
    )


def test_evaluate_oof_refuses_a_folds_file_the_run_did_not_train_with(recorded_run, capsys):
    run_dir, data_dir, folds, swapped = recorded_run
    argv = [run_dir, "--data-dir", data_dir]
    assert run_script("evaluate_oof", argv + ["--folds-csv", folds]) == 1.0
    assert capsys.readouterr().out.splitlines()[-1] == "cv: 1.0000"
    assert refused("evaluate_oof", argv + ["--folds-csv", swapped]) == [
        _swapped_message(run_dir, swapped)
    ]
    assert "cv:" not in capsys.readouterr().out


def test_a_run_without_a_record_is_scored_as_before_with_one_info_line(
    recorded_run, tmp_path, caplog
):
    run_dir, data_dir, _, swapped = recorded_run
    old = shutil.copytree(run_dir, tmp_path / "old")
    for fold_dir in runs.fold_dirs(old).values():
        (fold_dir / runs.SPLIT_CSV).unlink()
    with caplog.at_level(logging.INFO):
        cv = run_script("evaluate_oof", [old, "--data-dir", data_dir, "--folds-csv", swapped])
    assert cv == 1.0
    assert [r.getMessage() for r in caplog.records if runs.SPLIT_CSV in r.getMessage()] == [
        f"{old}: fold(s) 0, 1 keep no record of the images they trained on (no "
        f"{runs.SPLIT_CSV}: trained before it was written); {swapped} is taken on trust"
    ]


def test_predict_oof_refuses_another_folds_file_before_any_model_loads(
    recorded_run, tmp_path, no_model_loads
):
    run_dir, _, _, swapped = recorded_run
    argv = ["--oof", "--runs", run_dir, "--out-dir", tmp_path / "oof", "--device", "cpu"]
    assert refused("predict", argv + ["--folds-csv", swapped]) == [
        _swapped_message(run_dir, swapped)
    ]
    assert not (tmp_path / "oof").exists()


@pytest.mark.slow
def test_predict_oof_records_the_split_of_the_folds_it_writes(recorded_run, tmp_path):
    run_dir, _, folds, swapped = recorded_run
    out_dir = tmp_path / "oof"
    argv = ["--oof", "--runs", run_dir, "--out-dir", out_dir, "--folds-csv", folds]
    run_script("predict", argv + ["--device", "cpu", "--fast"])
    for fold_dir in runs.fold_dirs(run_dir).values():
        assert runs.read_split(out_dir / fold_dir.name) == runs.read_split(fold_dir)
    assert refused("evaluate_oof", [out_dir, "--folds-csv", swapped]) == [
        _swapped_message(out_dir, swapped)
    ]


@pytest.fixture
def started_run(recorded_run, tmp_path, monkeypatch):
    """A run whose fold 0 has a checkpoint, started with train.py's defaults on the folds file.

    No model may be built: resuming is refused before.
    """

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the resume was checked")

    monkeypatch.setattr(engine.Trainer, "create", no_model)
    _, data_dir, _, _ = recorded_run
    fold_dir = tmp_path / "run" / "fold0"
    save_config(load_config(), fold_dir / runs.CONFIG)
    (fold_dir / runs.LAST).write_bytes(b"checkpoint")
    runs.write_split(fold_dir, ["img2", "img3"], ["img0", "img1"])
    return ["--data-dir", data_dir, "--out-dir", fold_dir.parent, "--resume", "--device", "cpu"]


def test_resume_refuses_another_folds_file(recorded_run, started_run):
    *_, swapped = recorded_run
    run_dir = started_run[3]
    assert refused("train", started_run + ["--folds-csv", swapped]) == [
        _swapped_message(run_dir, swapped)
    ]


# 8. One error line instead of a traceback.


def test_resume_with_other_settings_names_each_before_any_model_is_built(recorded_run, started_run):
    folds = recorded_run[2]
    argv = started_run + ["--folds-csv", folds, "--epochs", "3"]
    saved = started_run[3] / "fold0" / runs.CONFIG
    assert refused("train", argv + ["--encoder", "resnet18"]) == [
        f"--resume: fold 0 was started with other settings ({saved}): "
        "encoder: 'tu-efficientnet_b0' -> 'resnet18'"
    ]
    assert refused("train", argv + ["--seed", "2", "--encoder", "resnet34"]) == [
        f"--resume: fold 0 was started with other settings ({saved}): "
        "encoder: 'tu-efficientnet_b0' -> 'resnet34', seed: 0 -> 2"
    ]


def test_config_changes_name_nested_settings_and_skip_the_ignored():
    after = load_config(overrides={"epochs": 3, "num_workers": 4, "targets": {"border_max": 9}})
    assert config_changes(TrainConfig(), after, ignored=("epochs",)) == [
        "num_workers: 1 -> 4",
        f"targets.border_max: {TrainConfig().targets.border_max!r} -> 9",
    ]


def test_tune_postprocess_on_a_folder_without_oof_outputs_is_one_error_line(tmp_path):
    assert refused("tune_postprocess", [tmp_path, "--device", "cpu"]) == [
        f"{tmp_path}: no fold<K>/{oof.OOF_DIR}/{oof.LABELS_DIR} folders"
    ]
    assert refused("tune_postprocess", [tmp_path / "nowhere", "--device", "cpu"]) == [
        f"{tmp_path / 'nowhere'}: no fold<K>/{oof.OOF_DIR}/{oof.LABELS_DIR} folders"
    ]


def test_a_run_kept_without_weights_is_one_error_line_where_its_models_must_run(tmp_path):
    """A run kept for its OOF labels and records (issue #39): scoring those needs no model,
    but ablate.py and tune_postprocess.py, which must predict again, name its folds."""
    data = tmp_path / "data"
    labels = disc_labels(0)
    write_labelled(data / TRAIN_STAGE, {"im0": labels})
    run = tmp_path / "kept"
    fold_dir = run / "fold0"
    save_config(tiny_config(), fold_dir / runs.CONFIG)
    oof.save_prediction(fold_dir, "im0", None, labels)
    config = tmp_path / "kept.yaml"
    config.write_text(
        yaml.safe_dump({"data_dir": str(data), "variants": [{"name": "plain", "runs": [str(run)]}]})
    )
    results = tmp_path / "results"
    argv = ["--config", config, "--out-dir", results, "--device", "cpu"]
    assert refused("ablate", argv) == [
        f"{run}: no {runs.WEIGHTS} or {runs.WEIGHTS_INT8} in fold(s) 0, "
        "whose models variant 'plain' runs"
    ]
    assert not results.exists()
    (problem,) = refused("tune_postprocess", [run, "--data-dir", data, "--device", "cpu"])
    assert problem.startswith(f"{fold_dir}: no {runs.WEIGHTS} or {runs.WEIGHTS_INT8} to predict")
    # Outputs cached under the run's views spare the model, unless an external folder is scored.
    ablation = load_ablation(config)
    cache = run / CACHE_DIR / views_key(ablation.variants[0].options) / "fold0"
    cache.mkdir(parents=True)
    (cache / TIMING).write_text('{"seconds": 1.0, "images": 1}')
    assert missing_weights(ablation.variants, None, external=False) == []
    assert len(missing_weights(ablation.variants, [0], external=True)) == 1
    assert missing_weights(ablation.variants, [1], external=True) == []


# 7. A float TIFF without one finite pixel is refused by the input check.


def test_a_float_tiff_without_a_finite_pixel_is_found_before_decoding_the_others(tmp_path):
    stripped = tmp_path / "strips.tif"
    assert cv2.imwrite(str(stripped), np.full((40, 30), np.nan, np.float32))
    infinite = tmp_path / "inf.tif"
    tifffile.imwrite(infinite, np.full((20, 20, 3), np.inf, np.float64), photometric="rgb")
    # Tiles padded past the image: the padding must not count as finite pixels.
    tiled = tmp_path / "tiled.tif"
    tifffile.imwrite(tiled, np.full((40, 40), np.nan, np.float32), tile=(16, 16))
    one_finite = np.full((40, 40), np.nan, np.float32)
    one_finite[39, 39] = 0.5
    last_pixel = tmp_path / "last_pixel.tif"
    tifffile.imwrite(last_pixel, one_finite, tile=(16, 16))
    integer = tmp_path / "integer.tif"
    tifffile.imwrite(integer, np.zeros((20, 20), np.uint16))
    paths = [stripped, infinite, tiled, last_pixel, integer]
    assert reading.check_image_files(paths) == [
        f"{path}: no pixel has a finite value (all NaN or infinite)"
        for path in (stripped, infinite, tiled)
    ]
    with pytest.warns(reading.NonFiniteWarning, match="1599 NaN or infinite pixels of 1600"):
        assert reading.read_image(last_pixel).shape == (40, 40, 3)


def test_predict_refuses_an_all_nan_tiff_before_any_model_loads(
    recorded_run, tmp_path, no_model_loads
):
    run_dir = recorded_run[0]
    images = tmp_path / "images"
    images.mkdir()
    assert cv2.imwrite(str(images / "a.png"), np.full((32, 32), 100, np.uint8))
    assert cv2.imwrite(str(images / "b.tif"), np.full((32, 32), np.nan, np.float32))
    argv = ["--runs", run_dir, "--images", images, "--out", tmp_path / "s.csv", "--device", "cpu"]
    assert refused("predict", argv) == [
        f"{images / 'b.tif'}: no pixel has a finite value (all NaN or infinite)"
    ]


# 9. The smaller ones.


def test_a_repeated_image_id_in_a_folds_file_is_named(tmp_path):
    path = _folds_csv(tmp_path / "folds.csv", FOLD_OF)
    path.write_text(path.read_text() + "img2,0,fluorescence,7\n")
    with pytest.raises(reading.DataError) as error:
        read_folds(path)
    assert str(error.value) == f"{path}: image ids must be present and unique; img2 is in 2 rows"


def test_two_label_images_of_one_image_are_not_called_missing(tmp_path):
    labels = disc_labels(0).astype(np.uint16)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name in ("images/a.png", "images/b.png", "images/c.png"):
        assert cv2.imwrite(str(tmp_path / name), (labels > 0).astype(np.uint8) * 200)
    for name in ("labels/a.png", "labels/a.tif", "labels/b.png"):
        assert cv2.imwrite(str(tmp_path / name), labels)
    images = reading.find_images(tmp_path)
    with pytest.raises(reading.DataError) as error:
        reading.check_labelled(images)
    a, c = tmp_path / "images" / "a.png", tmp_path / "images" / "c.png"
    assert str(error.value).splitlines() == [
        "1 of 3 images have no labels:",
        f"  {c}: no label image {tmp_path / 'labels' / 'c'}.png/.tif",
        "1 of 3 images have several label images; keep one each:",
        f"  {a}: several label images: {tmp_path / 'labels' / 'a.png'}, "
        f"{tmp_path / 'labels' / 'a.tif'}",
    ]


def test_a_truncated_png_is_refused_without_a_decoder_message(tmp_path, capfd):
    whole = cv2.imencode(".png", disc_labels(1).astype(np.uint8) * 40)[1].tobytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole[: len(whole) * 2 // 3])
    trailing = tmp_path / "trailing.png"
    trailing.write_bytes(whole + b"bytes after IEND")
    assert reading.check_image_files([truncated, trailing]) == [
        f"{truncated}: unreadable or truncated image"
    ]
    with pytest.raises(reading.DataError, match=f"^{truncated}: unreadable or truncated image$"):
        reading.read_raw(truncated)
    assert reading.read_image(trailing).shape == (64, 64, 3)
    assert capfd.readouterr().err == ""


def test_an_image_id_in_two_formats_is_refused_naming_both(tmp_path):
    write_labelled(tmp_path, {"a": disc_labels(0), "b": disc_labels(1)})
    images = tmp_path / "a" / "images"
    assert cv2.imwrite(str(images / "a.tif"), np.zeros((64, 64), np.uint8))
    with pytest.raises(reading.DataError) as error:
        reading.find_images(tmp_path)
    assert str(error.value) == f"{images}: several images named a: a.png, a.tif; keep one"
