"""The training, evaluation, tuning and prediction scripts, end to end on a tiny dataset."""

import dataclasses
import os
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import TINY_MASKRCNN, run_script, write_labelled
from skimage.draw import disk

from nucleiseg.data import reading
from nucleiseg.data.label_files import read_label_file
from nucleiseg.data.targets import make_targets
from nucleiseg.evaluation import ablation
from nucleiseg.evaluation.ablation import CACHE_DIR, run_ablation, views_key
from nucleiseg.evaluation.summary import evaluate_run
from nucleiseg.inference import oof
from nucleiseg.inference.ensemble import segment_images
from nucleiseg.inference.family import ByModality, as_dict, get_family, load_params, run_config
from nucleiseg.inference.predictor import InferenceOptions
from nucleiseg.models import runs
from nucleiseg.postprocessing.tuning import coordinate_search, mean_score
from nucleiseg.postprocessing.watershed import PostprocessParams
from nucleiseg.training import reference

N_IMAGES = 6


def runs_family(run_dir):
    return run_config(run_dir).model


MASKRCNN = {"model": "maskrcnn", "maskrcnn": TINY_MASKRCNN}
# One epoch of two steps on 64 px crops, in float32 on the main process: seconds.
TINY_TRAINING = {
    "epochs": 1,
    "samples_per_epoch": 4,
    "batch_size": 2,
    "crop_size": 64,
    "num_workers": 0,
    "amp": False,
    "channels_last": False,
}


def _discs(seed, size=64):
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.int32)
    for label in range(1, 5):
        labels[disk(tuple(rng.integers(8, size - 8, 2)), 6, shape=labels.shape)] = label
    return labels


@pytest.fixture(scope="module", params=["unetpp", "maskrcnn"])
def trained_run(request, tmp_path_factory):
    """A two-fold run of a tiny model of each family on six synthetic images."""
    root = tmp_path_factory.mktemp(f"pipeline_{request.param}")
    data_dir = root / "data"
    ids = [f"img{i}" for i in range(N_IMAGES)]
    write_labelled(
        data_dir / reading.TRAIN_STAGE, {image_id: _discs(i) for i, image_id in enumerate(ids)}
    )
    write_labelled(
        data_dir / reading.TEST_STAGE, {f"test{i}": _discs(100 + i) for i in range(N_IMAGES)}
    )
    folds_csv = root / "folds.csv"
    pd.DataFrame(
        {"image_id": ids, "fold": [0, 1] * 3, "modality": "fluorescence", "group": range(6)}
    ).to_csv(folds_csv, index=False)
    config = root / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            TINY_TRAINING
            | (
                {"model": "maskrcnn", "maskrcnn": TINY_MASKRCNN}
                if request.param == "maskrcnn"
                else {}
            )
        )
    )
    run_dir = root / "run"
    run_script(
        "train",
        ["--config", config, "--fold", "all", "--data-dir", data_dir]
        + ["--folds-csv", folds_csv, "--out-dir", run_dir, "--device", "cpu"],
    )
    return run_dir, data_dir, folds_csv


@pytest.mark.slow
def test_train_writes_every_fold_output(trained_run):
    run_dir, _, _ = trained_run
    assert sorted(runs.fold_dirs(run_dir)) == [0, 1]
    for fold, fold_dir in runs.fold_dirs(run_dir).items():
        for name in (runs.CONFIG, runs.RUN_INFO, runs.EPOCHS_CSV, runs.LAST, runs.WEIGHTS):
            assert (fold_dir / name).is_file(), name
        assert runs.read_run_info(fold_dir)["fold"] == fold
        assert len(list((fold_dir / oof.OOF_DIR / oof.LABELS_DIR).glob("*.png"))) == 3


@pytest.mark.slow
def test_evaluate_oof_matches_per_image_scores(trained_run, capsys, tmp_path):
    run_dir, _, folds_csv = trained_run
    per_image = tmp_path / "per_image.csv"
    cv = run_script("evaluate_oof", [run_dir, "--folds-csv", folds_csv, "--per-image", per_image])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"cv: {cv:.4f}"
    scores = pd.read_csv(per_image)
    assert len(scores) == N_IMAGES and sorted(scores["fold"].unique()) == [0, 1]
    assert cv == pytest.approx(scores["score"].mean())

    # Other thresholds, applied to the saved raw outputs of every fold.
    params = tmp_path / "huge.yaml"
    params.write_text("min_size: 1000000\n")
    argv = [run_dir, "--folds-csv", folds_csv, "--params", params, "--per-image", per_image]
    run_script("evaluate_oof", argv)
    relabelled = pd.read_csv(per_image)
    assert len(relabelled) == N_IMAGES and (relabelled["n_pred"] == 0).all()


@pytest.mark.slow
def test_predict_writes_a_valid_submission_and_label_pngs(trained_run, tmp_path):
    run_dir, data_dir, _ = trained_run
    out = tmp_path / "sub.csv"
    labels = run_script(
        "predict",
        ["--runs", run_dir, "--images", data_dir / reading.TEST_STAGE, "--out", out]
        + ["--save-labels", tmp_path / "labels", "--device", "cpu"],
    )
    assert set(labels) == {f"test{i}" for i in range(N_IMAGES)}
    assert set(pd.read_csv(out, keep_default_na=False)["ImageId"]) == set(labels)
    saved = read_label_file(tmp_path / "labels" / "test0.png")
    np.testing.assert_array_equal(saved, labels["test0"])


@pytest.mark.slow
def test_predict_with_views_and_tiles_writes_overlays(trained_run, tmp_path, capsys):
    run_dir, data_dir, _ = trained_run
    out = tmp_path / "sub.csv"
    labels = run_script(
        "predict",
        ["--runs", run_dir, "--images", data_dir / reading.TEST_STAGE, "--out", out]
        + ["--tta", "flip", "--scales", "1.0,1.25", "--tile", "64", "--overlap", "16"]
        + ["--save-overlays", tmp_path / "overlays", "--device", "cpu"],
    )
    assert len(labels) == N_IMAGES
    summary = capsys.readouterr().out.strip().splitlines()
    assert summary[-2].startswith(f"{N_IMAGES} images (64x64), ") and "s per image" in summary[-2]
    overlay = reading.read_image(tmp_path / "overlays" / "test0.png")
    image = reading.read_image(data_dir / reading.TEST_STAGE / "test0" / "images" / "test0.png")
    assert overlay.shape == image.shape
    outline = np.all(overlay == (255, 255, 0), axis=-1)
    # Outlines are drawn inside the nuclei found, and only there.
    assert outline.any() == labels["test0"].any()
    assert not outline[labels["test0"] == 0].any()


@pytest.mark.slow
def test_predict_oof_reproduces_the_training_oof_score(trained_run, tmp_path, capsys):
    run_dir, _, folds_csv = trained_run
    trained_cv = run_script("evaluate_oof", [run_dir, "--folds-csv", folds_csv])
    out_dir = tmp_path / "oof_run"
    cv = run_script(
        "predict",
        ["--oof", "--runs", run_dir, "--out-dir", out_dir, "--folds-csv", folds_csv]
        + ["--device", "cpu"],
    )
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"cv: {cv:.4f}"
    # The same models, thresholds and whole-image pass as the training's OOF step.
    assert cv == pytest.approx(trained_cv, abs=1e-12)
    for image_id, (fold, labels) in oof.load_oof_labels(run_dir).items():
        again_fold, again = oof.load_oof_labels(out_dir)[image_id]
        assert again_fold == fold
        np.testing.assert_array_equal(again, labels)
    assert run_script("evaluate_oof", [out_dir, "--folds-csv", folds_csv]) == cv


@pytest.mark.slow
def test_ablation_leaderboard_scores_variants_from_cached_outputs(trained_run, tmp_path, capsys):
    run_dir, data_dir, folds_csv = trained_run
    family_key = "postprocess" if runs_family(run_dir) == "unetpp" else "instances"
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(data_dir),
                "folds_csv": str(folds_csv),
                "defaults": {"runs": [str(run_dir)]},
                "variants": [
                    {"name": "plain"},
                    {"name": "flip", "tta": "flip"},
                    {"name": "drop all", family_key: {"min_size": 100000}},
                ],
            }
        )
    )
    argv = ["--config", config, "--out-dir", tmp_path / "results", "--workers", 2]
    results = run_script("ablate", argv + ["--device", "cpu"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("best: ")
    trained_cv = run_script("evaluate_oof", [run_dir, "--folds-csv", folds_csv])
    plain, flip, dropped = (
        results.set_index("variant").loc[n] for n in ("plain", "flip", "drop all")
    )
    # The plain view reproduces the training's OOF labels; dropping every nucleus scores 0.
    assert plain["cv"] == pytest.approx(trained_cv, abs=1e-12) and plain["delta"] == 0
    assert plain["images"] == flip["images"] == N_IMAGES
    assert dropped["cv"] == 0 and dropped["delta"] == pytest.approx(-plain["cv"])
    assert (results["seconds_per_image"] > 0).all()
    saved = pd.read_csv(tmp_path / "results" / "tiny.csv")
    assert saved["variant"].tolist() == ["plain", "flip", "drop all"]
    assert "| plain | 6 |" in (tmp_path / "results" / "tiny.md").read_text()
    # A second run takes the model outputs from the cache instead of predicting again.
    timings = sorted((run_dir / "cache").glob("*/fold*/timing.json"))
    assert len(timings) == 4  # two views x two folds
    stamps = [t.stat().st_mtime_ns for t in timings]
    again = run_script("ablate", argv + ["--device", "cpu"])
    assert [t.stat().st_mtime_ns for t in timings] == stamps
    pd.testing.assert_series_equal(again["cv"], results["cv"])


@pytest.mark.slow
def test_ablation_rows_share_the_images_of_the_folds_every_run_finished(trained_run, tmp_path):
    run_dir, data_dir, folds_csv = trained_run
    partial = tmp_path / "partial"
    shutil.copytree(run_dir / "fold0", partial / "fold0")
    if (run_dir / runs.POSTPROCESS_YAML).is_file():
        shutil.copy(run_dir / runs.POSTPROCESS_YAML, partial)
    config = tmp_path / "partial.yaml"
    variants = [{"name": "all folds", "runs": [str(run_dir)]}, {"name": "fold 0 only"}]
    variants[1]["runs"] = [str(partial)]
    files = {"data_dir": str(data_dir), "folds_csv": str(folds_csv), "variants": variants}
    config.write_text(yaml.safe_dump(files))
    argv = ["--config", config, "--out-dir", tmp_path / "results", "--device", "cpu"]
    results = run_script("ablate", argv).set_index("variant")
    # The same model on the same three images of fold 0: the same score, delta 0.
    assert results["images"].tolist() == [3, 3]
    assert results.loc["fold 0 only", "cv"] == results.loc["all folds", "cv"]
    untrained = {"name": "untrained", "runs": [str(tmp_path / "untrained")], "command": "train it"}
    # Listed first, and the baseline named: the columns still come from a scored row.
    config.write_text(
        yaml.safe_dump(files | {"variants": [untrained, *variants], "baseline": "all folds"})
    )
    results = run_script("ablate", argv).set_index("variant")
    assert results.loc["untrained", "images"] == 0 and np.isnan(results.loc["untrained", "cv"])
    markdown = (tmp_path / "results" / "partial.md").read_text()
    assert "Waiting for their runs (no finished fold yet):\n\n- untrained: `train it`" in markdown
    assert "| untrained |" not in markdown
    config.write_text(yaml.safe_dump(files | {"folds": [1], "variants": variants[:1]}))
    assert run_script("ablate", argv)["images"].tolist() == [3]


@pytest.mark.slow
def test_tune_postprocess_writes_thresholds_no_worse_than_the_start(trained_run):
    run_dir, _, _ = trained_run
    run_script("tune_postprocess", [run_dir, "--apply"])
    tuned = load_params(run_dir)
    search = pd.read_csv(run_dir / "postprocess_search.csv")
    start = dataclasses.asdict(type(tuned)())
    is_start = np.all([search[k] == v for k, v in start.items()], axis=0)
    assert search["mean_ap"].max() >= search.loc[is_start, "mean_ap"].iloc[0]
    assert search.loc[search["mean_ap"].idxmax(), "min_size"] == tuned.min_size
    with pytest.raises(SystemExit, match=r"no OOF outputs for fold\(s\) \[7\]"):
        run_script("tune_postprocess", [run_dir, "--folds", "1", "7"])


@pytest.mark.slow
def test_tune_postprocess_by_modality_writes_thresholds_each_image_is_scored_with(
    trained_run, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run[0], run_dir)
    run_script("tune_postprocess", [run_dir, "--by-modality", "--apply"])
    printed = capsys.readouterr().out
    tuned = load_params(run_dir)  # read back and checked
    written = yaml.safe_load((run_dir / runs.POSTPROCESS_YAML).read_text())
    defaults = get_family(runs_family(run_dir)).params_type()
    assert set(written) - {"modalities"} == set(as_dict(defaults))
    assert isinstance(tuned, ByModality) == ("modalities" in written)
    # The score printed is that of the relabelled OOF images, each with its modality's.
    search = pd.read_csv(run_dir / "postprocess_search.csv")
    score = float(printed.split("tuned oof mean AP: ")[1].split()[0])
    assert score >= round(search["mean_ap"].max(), 4) - 1e-4
    # Refining: the search starts from a file's thresholds (by modality: its default).
    start = tmp_path / "start.yaml"
    start_values = dataclasses.asdict(defaults) | {"min_size": 7}
    start.write_text(yaml.safe_dump(start_values | {"modalities": {"tissue": {"min_size": 9}}}))
    run_script("tune_postprocess", [run_dir, "--start", start])
    searched = pd.read_csv(run_dir / "postprocess_search.csv")[list(start_values)]
    assert np.isclose(searched, list(start_values.values())).all(axis=1).any()
    with pytest.raises(SystemExit, match="not .* settings: min_sise"):
        start.write_text(yaml.safe_dump({"min_sise": 7}))
        run_script("tune_postprocess", [run_dir, "--start", start])
    # predict.py segments each image with its modality's: a minimum size no nucleus reaches
    # drops every one of these fluorescence discs, and changes nothing for other images.
    # (The two-step Mask R-CNN finds no disc at all, so only U-Net++ can show it.)
    if runs_family(run_dir) != "unetpp":
        return
    argv = ["--images", trained_run[1] / reading.TEST_STAGE, "--device", "cpu"]
    found = {}
    for modality in ("fluorescence", "brightfield"):
        dropped = as_dict(defaults) | {"modalities": {modality: {"min_size": 10**6}}}
        (run_dir / runs.POSTPROCESS_YAML).write_text(yaml.safe_dump(dropped))
        out = tmp_path / f"{modality}.csv"
        found[modality] = run_script("predict", argv + ["--runs", run_dir, "--out", out])
    assert len(found["fluorescence"]) == N_IMAGES
    assert all(labels.max() == 0 for labels in found["fluorescence"].values())
    assert sum(labels.max() for labels in found["brightfield"].values()) > 0


@pytest.mark.slow
def test_tune_postprocess_predicts_raw_outputs_a_fresh_clone_lacks(trained_run, tmp_path):
    # A clone holds each fold's OOF label images but not the raw outputs behind them.
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run[0], run_dir)
    for raw_dir in run_dir.glob(f"fold*/{oof.OOF_DIR}/*"):
        if raw_dir.name != oof.LABELS_DIR:
            shutil.rmtree(raw_dir)
    shutil.rmtree(run_dir / CACHE_DIR, ignore_errors=True)  # left by the ablation tests
    for tuned in (runs.POSTPROCESS_YAML, "postprocess_search.csv"):
        (run_dir / tuned).unlink(missing_ok=True)
    run_script("tune_postprocess", [run_dir, "--device", "cpu"])
    family = get_family(runs_family(run_dir))
    for fold, fold_dir in oof.oof_fold_dirs(run_dir).items():
        cache = run_dir / CACHE_DIR / views_key(InferenceOptions()) / f"fold{fold}"
        labelled = {p.stem for p in (fold_dir / oof.OOF_DIR / oof.LABELS_DIR).glob("*.png")}
        assert set(family.load_oof(cache)) == labelled
    assert (run_dir / runs.POSTPROCESS_YAML).is_file()
    assert len(pd.read_csv(run_dir / "postprocess_search.csv")) > 1


@pytest.fixture
def bundle(trained_run, tmp_path):
    """The tiny run exported as a reference bundle."""
    run_dir, data_dir, folds_csv = trained_run
    weights = tmp_path / "weights"
    argv = ["--runs", run_dir, "--out", weights, "--data-dir", data_dir, "--folds-csv", folds_csv]
    return weights, run_script("export_weights", argv)


@pytest.mark.slow
def test_export_bundles_every_fold_with_its_cv_and_checksums(trained_run, bundle):
    run_dir, data_dir, folds_csv = trained_run
    weights, manifest = bundle
    per_image = evaluate_run(run_dir, data_dir, folds_csv)
    members = {m["fold"]: m for m in manifest["members"]}
    assert sorted(members) == [0, 1]
    for fold, member in members.items():
        fold_scores = per_image.loc[per_image["fold"] == fold, "score"]
        assert member["oof_cv"] == round(fold_scores.mean(), 4)
        assert member["oof_images"] == 3 and member["epochs"] == 1
        copied = weights / member["weights"]
        assert copied.read_bytes() == (run_dir / f"fold{fold}" / runs.WEIGHTS).read_bytes()
        assert manifest["files"][member["weights"]]["sha256"] == reference.sha256(copied)
    assert reference.verify(weights) == [weights / run_dir.name]
    before = (weights / reference.MANIFEST).read_text()
    with pytest.raises(SystemExit, match="MB, over the 0 MB allowed"):
        run_script(
            "export_weights",
            ["--runs", run_dir, "--out", weights, "--folds-csv", folds_csv, "--max-megabytes", 0],
        )
    assert (weights / reference.MANIFEST).read_text() == before  # the old bundle is kept
    with pytest.raises(SystemExit, match=r"fold\(s\) \[7\] not among the available folds"):
        run_script(
            "export_weights",
            ["--runs", run_dir, "--out", weights, "--folds-csv", folds_csv, "--folds", "1,7"],
        )


@pytest.mark.slow
def test_an_int8_bundle_is_smaller_and_predicts(trained_run, bundle, tmp_path):
    run_dir, data_dir, folds_csv = trained_run
    weights, manifest = bundle
    small = tmp_path / "int8"
    argv = ["--runs", run_dir, "--out", small, "--data-dir", data_dir, "--folds-csv", folds_csv]
    int8 = run_script("export_weights", argv + ["--precision", "int8"])
    assert int8["precision"] == "int8"
    for member, original in zip(int8["members"], manifest["members"], strict=True):
        assert member["weights"].endswith(runs.WEIGHTS_INT8)
        size, fp16_size = (
            int8["files"][member["weights"]]["bytes"],
            manifest["files"][original["weights"]]["bytes"],
        )
        assert size < 0.7 * fp16_size
    labels = run_script(
        "predict",
        ["--weights", small, "--images", data_dir / reading.TEST_STAGE, "--out", tmp_path / "s.csv"]
        + ["--device", "cpu"],
    )
    assert len(labels) == N_IMAGES


@pytest.mark.slow
def test_folds_and_precision_are_chosen_per_run(trained_run, tmp_path):
    run_dir, data_dir, folds_csv = trained_run
    second = tmp_path / "second"
    shutil.copytree(run_dir, second)
    argv = ["--runs", run_dir, second, "--out", tmp_path / "mixed", "--data-dir", data_dir]
    argv += ["--folds-csv", folds_csv]
    manifest = run_script(
        "export_weights", argv + ["--folds", "all", "1", "--precision", "float16", "int8"]
    )
    chosen = [(m["run"], m["fold"], m["precision"]) for m in manifest["members"]]
    assert chosen == [
        (run_dir.name, 0, "float16"),
        (run_dir.name, 1, "float16"),
        ("second", 1, "int8"),
    ]
    assert manifest["precision"] == "float16, int8"
    assert reference.verify(tmp_path / "mixed") == [
        tmp_path / "mixed" / n for n in (run_dir.name, "second")
    ]
    with pytest.raises(SystemExit, match="--precision takes one value or one per run"):
        run_script("export_weights", argv + ["--precision", "int8", "int8", "int8"])


@pytest.mark.slow
def test_predict_without_runs_uses_the_bundle(trained_run, bundle, tmp_path):
    run_dir, data_dir, _ = trained_run
    weights, _ = bundle
    argv = ["--images", data_dir / reading.TEST_STAGE, "--device", "cpu"]
    from_run = run_script("predict", argv + ["--runs", run_dir, "--out", tmp_path / "a.csv"])
    from_bundle = run_script("predict", argv + ["--weights", weights, "--out", tmp_path / "b.csv"])
    assert from_bundle.keys() == from_run.keys()
    for image_id, labels in from_run.items():
        np.testing.assert_array_equal(from_bundle[image_id], labels)
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


@pytest.mark.slow
def test_the_bundle_keeps_its_inference_options_and_flags_override_them(trained_run, tmp_path):
    run_dir, data_dir, folds_csv = trained_run
    weights = tmp_path / "flip_bundle"
    argv = ["--runs", run_dir, "--out", weights, "--data-dir", data_dir, "--folds-csv", folds_csv]
    manifest = run_script("export_weights", argv + ["--tta", "flip", "--merge", "vote"])
    # Every option is written out, the defaults too (size adaptation off among them).
    expected = dataclasses.asdict(InferenceOptions(tta="flip", family_merge="vote"))
    assert manifest["inference"] == expected | {"scales": list(expected["scales"])}
    assert reference.inference_options(weights).tta == "flip"

    images = ["--images", data_dir / reading.TEST_STAGE, "--device", "cpu"]
    flip = run_script(
        "predict", images + ["--runs", run_dir, "--tta", "flip", "--out", tmp_path / "f.csv"]
    )
    plain = run_script("predict", images + ["--runs", run_dir, "--out", tmp_path / "p.csv"])
    bundled = run_script("predict", images + ["--weights", weights, "--out", tmp_path / "b.csv"])
    overridden = run_script(
        "predict", images + ["--weights", weights, "--tta", "none", "--out", tmp_path / "o.csv"]
    )
    if runs_family(run_dir) == "unetpp":  # the tiny Mask R-CNN finds nothing either way
        assert any(not np.array_equal(flip[i], plain[i]) for i in flip)  # the views matter
    for image_id in flip:
        np.testing.assert_array_equal(bundled[image_id], flip[image_id])
        np.testing.assert_array_equal(overridden[image_id], plain[image_id])
    with pytest.raises(SystemExit, match="map weight must be in"):
        run_script("export_weights", argv + ["--map-weight", "2"])


@pytest.mark.slow
def test_a_missing_or_altered_file_is_named_before_any_model_loads(bundle, tmp_path):
    weights, manifest = bundle
    altered, missing = (weights / m["weights"] for m in manifest["members"])
    blob = bytearray(altered.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    altered.write_bytes(bytes(blob))
    missing.unlink()
    with pytest.raises(reference.ReferenceWeightsError) as error:
        reference.verify(weights)
    message = str(error.value)
    assert f"missing: {missing}" in message and f"corrupt: {altered} sha256" in message
    assert "2 of" in message
    out = tmp_path / "sub.csv"
    with pytest.raises(SystemExit, match="missing: "):
        run_script("predict", ["--weights", weights, "--out", out, "--device", "cpu"])
    assert not out.exists()
    (weights / reference.MANIFEST).unlink()
    with pytest.raises(reference.ReferenceWeightsError, match="manifest.yaml not found"):
        reference.verify(weights)


@pytest.mark.slow
def test_quickstart_scores_each_image_with_its_own_fold(trained_run, bundle, tmp_path, capsys):
    from scripts.quickstart import QUICK_TEST_IMAGES

    run_dir, data_dir, folds_csv = trained_run
    weights, _ = bundle
    # The quick job: a few test images with the whole bundle, out of fold with --fast;
    # --full: every test image, out of fold with the whole bundle.
    for job, test_images in (("quick", QUICK_TEST_IMAGES), ("full", N_IMAGES)):
        expected = run_script(
            "predict",
            ["--oof", "--runs", run_dir, "--out-dir", tmp_path / f"oof_run_{job}"]
            + ["--folds-csv", folds_csv, "--device", "cpu"]
            + (["--fast"] if job == "quick" else []),
        )
        out = tmp_path / f"sample_{job}.csv"
        overlays = tmp_path / f"overlays_{job}"
        score = run_script(
            "quickstart",
            ["--weights", weights, "--data-dir", data_dir, "--folds-csv", folds_csv]
            + ["--out", out, "--overlays", overlays, "--oof-dir", tmp_path / f"oof_{job}"]
            + ["--device", "cpu"]
            + (["--full"] if job == "full" else []),
        )
        assert score == pytest.approx(expected, abs=1e-12)
        assert capsys.readouterr().out.strip().splitlines()[-1] == f"oof mean AP: {score:.4f}"
        submitted = pd.read_csv(out, keep_default_na=False)["ImageId"].unique()
        assert len(submitted) == test_images
        assert len(list(overlays.glob("*.png"))) == test_images


@pytest.mark.slow
def test_reproduce_cv_rescores_quoted_numbers_and_names_the_wrong_ones(trained_run, tmp_path):
    run_dir, data_dir, folds_csv = trained_run
    cv = run_script("evaluate_oof", [run_dir, "--folds-csv", folds_csv])
    reported = tmp_path / "reported.yaml"
    entries = [{"name": "tiny", "oof": str(run_dir), "cv": round(cv, 4), "made_by": "train"}]
    reported.write_text(yaml.safe_dump({"data_dir": str(data_dir), "entries": entries}))
    argv = ["--reported", reported, "--folds-csv", folds_csv, "--out", tmp_path / "reported.csv"]
    table = run_script("reproduce_cv", argv)
    assert table.loc[0, "cv"] == pytest.approx(cv) and table.loc[0, "images"] == N_IMAGES
    assert pd.read_csv(tmp_path / "reported.csv")["name"].tolist() == ["tiny"]
    entries += [
        {"name": "misquoted", "oof": str(run_dir), "cv": round(cv, 4) + 0.01},
        {"name": "gone", "oof": str(tmp_path / "nowhere"), "cv": 0.5},
    ]
    reported.write_text(yaml.safe_dump({"data_dir": str(data_dir), "entries": entries}))
    with pytest.raises(SystemExit) as error:
        run_script("reproduce_cv", argv)
    assert "misquoted: CV" in str(error.value) and "gone: " in str(error.value)
    assert "tiny" not in str(error.value)


def test_coordinate_search_recovers_a_good_threshold():
    labels = np.zeros((48, 48), np.int32)
    for label, center in enumerate([(12, 12), (12, 34), (34, 22)], start=1):
        labels[disk(center, 7, shape=labels.shape)] = label
    # Body probability 0.45 inside the nuclei: the default mask threshold (0.5) sees
    # nothing, a lower one finds them all.
    maps = make_targets(labels).astype(np.float32)
    maps[0] *= 0.45
    start = PostprocessParams(seed_threshold=0.4)
    assert mean_score({"a": maps}, {"a": labels}, start) == 0.0
    best, history = coordinate_search(
        {"a": maps}, {"a": labels}, start, grid={"mask_threshold": (0.3, 0.5)}
    )
    assert best.mask_threshold == 0.3
    assert history["mean_ap"].max() == 1.0
    with pytest.raises(ValueError, match="unknown postprocessing setting"):
        coordinate_search({"a": maps}, {"a": labels}, start, grid={"mask": (0.3,)})


def test_oof_probabilities_round_trip_to_within_quantization(tmp_path):
    rng = np.random.default_rng(0)
    probabilities = rng.random((3, 20, 30)).astype(np.float32)
    labels = rng.integers(0, 70000, (20, 30))  # beyond 16 bits: kept as a 32-bit TIFF
    oof.save_prediction(tmp_path / "fold0", "x", probabilities, labels)
    maps = oof.load_probabilities(tmp_path / "fold0")["x"]
    assert np.abs(maps - probabilities).max() <= 0.5 / 255 + 1e-7
    fold, read = oof.load_oof_labels(tmp_path)["x"]
    assert fold == 0
    np.testing.assert_array_equal(read, labels)


def _label_folder(root, seeds):
    """An ``images/`` + ``labels/`` folder pair of bright discs on a dark ground."""
    for seed in seeds:
        labels = _discs(seed)
        grey = np.where(labels > 0, 200, 20).astype(np.uint8)
        pair = {"images": np.dstack([grey] * 3), "labels": labels.astype(np.uint16)}
        for name, array in pair.items():
            (root / name).mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(root / name / f"ext{seed}.png"), array)
    return root


@pytest.mark.slow
def test_evaluate_external_scores_runs_and_their_saved_labels(trained_run, tmp_path, capsys):
    run_dir, _, _ = trained_run
    folder = _label_folder(tmp_path / "external", [200, 201, 202])
    saved, per_image = tmp_path / "labels", tmp_path / "per_image.csv"
    argv = ["--runs", run_dir, "--folds", "0", "--images", folder, "--device", "cpu"]
    outputs = ["--save-labels", saved, "--per-image", per_image, "--name", "ext"]
    score = run_script("evaluate_external", argv + outputs)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"ext mean AP: {score:.4f}"
    table = pd.read_csv(per_image)
    assert sorted(table["image_id"]) == ["ext200", "ext201", "ext202"]
    assert score == pytest.approx(table["score"].mean(), abs=1e-6)  # the CSV keeps 6 digits
    # The saved label images score the same without any model.
    assert run_script("evaluate_external", ["--labels", saved, "--images", folder]) == score
    adaptive = ["--size-adaptive", "--size-tolerance", "1", "--size-target", "24"]
    assert 0.0 <= run_script("evaluate_external", argv + adaptive) <= 1.0
    # A missing label image and an output path that is a file are named before
    # any model loads, one line each, exit status 2.
    (folder / "labels" / "ext201.png").unlink()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as refused:
        run_script("evaluate_external", argv + ["--save-labels", tmp_path / "a_file"])
    assert refused.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert any("ext201" in line for line in lines)
    assert any(line.startswith(f"error: {tmp_path / 'a_file'}") for line in lines)


@pytest.mark.slow
def test_ablation_scores_external_folders_and_size_adaptive_variants(trained_run, tmp_path):
    run_dir, data_dir, folds_csv = trained_run
    folder = _label_folder(tmp_path / "external", [300, 301])
    config = tmp_path / "general.yaml"
    variants = [
        {"name": "plain"},
        # A band this wide never rescales: the first pass is the answer.
        {"name": "adaptive, wide band", "size_adaptive": True, "size_tolerance": 100.0},
        {"name": "adaptive, to 30 px", "size_adaptive": True, "size_target": 30.0},
    ]
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(data_dir),
                "folds_csv": str(folds_csv),
                "external": {"held out": str(folder)},
                "defaults": {"runs": [str(run_dir)]},
                "variants": variants,
            }
        )
    )
    argv = ["--config", config, "--out-dir", tmp_path / "results", "--device", "cpu"]
    results = run_script("ablate", argv).set_index("variant")
    plain, wide, rescaled = (results.loc[v["name"]] for v in variants)
    assert rescaled["images"] == wide["images"] == plain["images"] == N_IMAGES
    assert 0.0 <= rescaled["held out"] <= 1.0
    # Size-adaptive rows segment directly, from full-precision outputs (the plain
    # row's come from the cache, probabilities stored in 8 bits): with a band that
    # never rescales they are exactly what predict --oof and evaluate_external give.
    oof_cv = run_script(
        "predict",
        ["--oof", "--runs", run_dir, "--out-dir", tmp_path / "oof", "--data-dir", data_dir]
        + ["--folds-csv", folds_csv, "--device", "cpu"],
    )
    external = run_script(
        "evaluate_external", ["--runs", run_dir, "--images", folder, "--device", "cpu"]
    )
    assert wide["cv"] == pytest.approx(oof_cv, abs=1e-12)
    assert wide["held out"] == pytest.approx(external, abs=1e-12)
    assert plain["held out"] == pytest.approx(external, abs=1e-12)
    assert "| variant | images | CV | delta |" in (tmp_path / "results" / "general.md").read_text()
    assert "held out" in (tmp_path / "results" / "general.md").read_text()


@pytest.mark.slow
def test_ablation_external_scores_are_cached_until_a_model_changes(
    trained_run, tmp_path, monkeypatch
):
    run_dir, data_dir, folds_csv = trained_run
    folder = _label_folder(tmp_path / "external", [400, 401])
    config = tmp_path / "cached.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(data_dir),
                "folds_csv": str(folds_csv),
                "external": {"held out": str(folder)},
                "variants": [{"name": "plain", "runs": [str(run_dir)]}],
            }
        )
    )
    segmented = []

    def recording(members, images, *args, **kwargs):
        segmented.append(sorted(images))
        return segment_images(members, images, *args, **kwargs)

    monkeypatch.setattr(ablation, "segment_images", recording)
    argv = ["--config", config, "--out-dir", tmp_path / "results", "--device", "cpu"]

    def held_out() -> float:
        return run_script("ablate", argv).set_index("variant").loc["plain", "held out"]

    first = held_out()
    assert segmented == [["ext400", "ext401"]]
    assert held_out() == first  # read back from the cache, nothing segmented
    assert segmented == [["ext400", "ext401"]]
    # A retrained fold (its weights file rewritten) is scored afresh.
    weights = runs.weights_path(run_dir / "fold1")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert held_out() == pytest.approx(first, abs=1e-12)
    assert segmented == [["ext400", "ext401"]] * 2


@pytest.mark.slow
def test_ablation_update_scores_only_new_columns_and_new_variants(
    trained_run, tmp_path, monkeypatch
):
    run_dir, data_dir, folds_csv = trained_run
    first, second = _label_folder(tmp_path / "a", [500, 501]), _label_folder(tmp_path / "b", [502])
    config = tmp_path / "grow.yaml"
    settings = {
        "data_dir": str(data_dir),
        "folds_csv": str(folds_csv),
        "external": {"first": str(first)},
        "variants": [{"name": "plain", "runs": [str(run_dir)]}],
    }
    config.write_text(yaml.safe_dump(settings))
    argv = ["--config", config, "--out-dir", tmp_path / "results", "--device", "cpu"]
    before = run_script("ablate", argv)
    # A second held-out set and a second variant join the YAML after the leaderboard is written.
    grown = {
        **settings,
        "external": {"first": str(first), "second": str(second)},
        "variants": [
            *settings["variants"],
            {"name": "flip", "runs": [str(run_dir)], "tta": "flip"},
        ],
    }
    config.write_text(yaml.safe_dump(grown))
    scored = []

    def recording(sub, *args, **kwargs):
        scored.append([v.name for v in sub.variants])
        return run_ablation(sub, *args, **kwargs)

    monkeypatch.setattr(ablation, "run_ablation", recording)
    after = run_script("ablate", [*argv, "--update"])
    assert scored == [["flip"]]  # the written row is not predicted out of fold again
    assert list(after["variant"]) == ["plain", "flip"]
    assert list(after.columns) == [*before.columns[:-2], "second", *before.columns[-2:]]
    # The written leaderboard keeps 6 significant digits.
    pd.testing.assert_frame_equal(after.loc[[0], before.columns], before, rtol=1e-5)
    external = run_script(
        "evaluate_external", ["--runs", run_dir, "--images", second, "--device", "cpu"]
    )
    assert after.loc[0, "second"] == pytest.approx(external, abs=1e-12)
    fresh = run_ablation(ablation.load_ablation(config), torch.device("cpu"))
    pd.testing.assert_frame_equal(
        after.drop(columns="seconds_per_image"), fresh.drop(columns="seconds_per_image"), rtol=1e-5
    )
    assert "| second |" in (tmp_path / "results" / "grow.md").read_text()
    with pytest.raises(SystemExit, match="no leaderboard"):
        run_script("ablate", [*argv[:2], "--out-dir", tmp_path / "none", "--update"])


@pytest.mark.slow
def test_training_reads_label_folders_and_records_external_sources(tmp_path):
    train = _label_folder(tmp_path / "own", range(400, 404))
    extra = _label_folder(tmp_path / "extra", [500, 501])
    folds_csv = tmp_path / "folds.csv"
    ids = [f"ext{i}" for i in range(400, 404)]
    pd.DataFrame(
        {"image_id": ids, "fold": [0, 1, 0, 1], "modality": "fluorescence", "group": range(4)}
    ).to_csv(folds_csv, index=False)
    config = tmp_path / "tiny.yaml"
    settings = TINY_TRAINING | {
        "colour": {"stain_fluorescence": 0.5, "haematoxylin_only": 0.5, "stain_jitter": 0.5},
        "extra_data": [{"name": "extra", "path": str(extra), "weight": 0.5, "tile": 32}],
    }
    config.write_text(yaml.safe_dump(settings))
    run_dir = tmp_path / "run"
    run_script(
        "train",
        ["--config", config, "--fold", "0", "--data-dir", train, "--folds-csv", folds_csv]
        + ["--out-dir", run_dir, "--device", "cpu"],
    )
    fold_dir = run_dir / "fold0"
    assert runs.read_run_info(fold_dir)["extra_data"] == [str(extra)]
    saved = yaml.safe_load((fold_dir / runs.CONFIG).read_text())
    assert saved["extra_data"] == settings["extra_data"]
    # Only the fold's own images are predicted out of fold, never the external ones.
    oof_ids = sorted(p.stem for p in (fold_dir / oof.OOF_DIR / oof.LABELS_DIR).glob("*.png"))
    assert oof_ids == ["ext400", "ext402"]
    # A run commits its int8 weights only; an int8 bundle takes them byte for byte.
    int8 = fold_dir / runs.WEIGHTS_INT8
    assert runs.recorded_checksums(fold_dir)[runs.WEIGHTS_INT8] == reference.sha256(int8)
    (fold_dir / runs.WEIGHTS).unlink()
    manifest = reference.export(
        [reference.BundlePart(run_dir, precision="int8")], tmp_path / "bundle", folds_csv=folds_csv
    )
    (member,) = manifest["members"]
    assert member["extra_data"] == settings["extra_data"]
    exported = tmp_path / "bundle" / run_dir.name / "fold0" / runs.WEIGHTS_INT8
    assert exported.read_bytes() == int8.read_bytes()
    with pytest.raises(FileNotFoundError, match="no finished fold"):
        reference.export([reference.BundlePart(run_dir)], tmp_path / "fp16", folds_csv=folds_csv)
