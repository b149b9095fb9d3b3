"""Adaptation to unlabelled images: pseudo-labels, ignored pixels, batch shares, BatchNorm
statistics, the end-to-end script and its bad inputs."""

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import (
    disc_labels,
    refused,
    run_script,
    tiny_config,
    tiny_maskrcnn_config,
    write_labelled,
)
from skimage.draw import disk

from nucleiseg.data import reading
from nucleiseg.data.augment import train_transform
from nucleiseg.data.dataset import BatchShare, NucleiDataset
from nucleiseg.data.reading import Sample
from nucleiseg.data.targets import IGNORE, UNKNOWN, make_targets
from nucleiseg.inference.batchnorm import adapt_batchnorm, batchnorm_layers
from nucleiseg.inference.family import load_params
from nucleiseg.models import runs
from nucleiseg.models.build import build_model
from nucleiseg.models.config import save_config
from nucleiseg.models.losses import bce_dice_loss, bce_loss
from nucleiseg.postprocessing.pseudo_labels import PseudoLabelParams, pseudo_labels
from nucleiseg.postprocessing.watershed import PostprocessParams
from nucleiseg.training import reference
from nucleiseg.training.adapt import PSEUDO_CSV, PSEUDO_DIR, load_adapt_config
from nucleiseg.training.engine import save_compact_weights


def _three_discs() -> np.ndarray:
    labels = np.zeros((40, 60), np.int32)
    for label, center in enumerate(((10, 10), (10, 40), (30, 25)), start=1):
        labels[disk(center, 5, shape=labels.shape)] = label
    return labels


def test_pseudo_labels_keep_confident_agreed_nuclei_and_leave_the_rest_unknown():
    labels = _three_discs()
    body = np.where(labels > 0, 0.95, 0.02).astype(np.float32)
    body[labels == 3] = 0.6  # found by every voter, but not sure enough
    body[35:, 50:] = 0.5  # an uncertain patch of background
    missing_2 = np.where(labels == 2, 0, labels)  # a voter that does not find nucleus 2
    found = pseudo_labels(labels, [labels, missing_2], body, PseudoLabelParams(agreement=0.8))
    assert (found.nuclei, found.kept, found.dropped) == (3, 1, 2)
    out = found.labels
    np.testing.assert_array_equal(out[labels == 1], 1)
    # Dropped nuclei and a 2-pixel margin around them are unknown, not background.
    round_5 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    margin = cv2.dilate(np.isin(labels, [2, 3]).astype(np.uint8), round_5)
    assert (out[labels >= 2] == UNKNOWN).all() and (out[(margin > 0) & (labels == 0)] != 0).all()
    assert (out[35:, 50:] == UNKNOWN).all()
    # Everywhere else the confident background stays background.
    unknown = (margin > 0) | (labels >= 2)
    unknown[35:, 50:] = True
    np.testing.assert_array_equal(out == UNKNOWN, unknown & (out != 1))
    assert found.unknown_share == pytest.approx(np.mean(out == UNKNOWN))
    # Half the voters is enough at an agreement of 0.5.
    lenient = pseudo_labels(labels, [labels, missing_2], body, PseudoLabelParams(agreement=0.5))
    assert lenient.kept == 2


def test_unknown_labels_become_ignored_targets():
    labels = _three_discs()
    pseudo = labels.copy()
    pseudo[:, 30:] = np.where(labels[:, 30:] == 2, UNKNOWN, labels[:, 30:])
    pseudo[20:, :] = np.where(pseudo[20:, :] == 0, UNKNOWN, pseudo[20:, :])
    targets = make_targets(pseudo)
    unknown = pseudo == UNKNOWN
    assert targets.dtype == np.uint8 and (targets[:, unknown] == IGNORE).all()
    known = make_targets(np.where(unknown, 0, pseudo))
    np.testing.assert_array_equal(targets[:, ~unknown], known[:, ~unknown])
    with pytest.raises(ValueError, match="or -1 where unknown"):
        make_targets(np.full((8, 8), -2, np.int32))


@pytest.mark.parametrize("loss", [bce_dice_loss, bce_loss], ids=["bce_dice", "bce"])
def test_ignored_pixels_add_nothing_to_the_loss_or_its_gradients(loss):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 16, 16, generator=generator)
    targets = (torch.rand(2, 3, 16, 16, generator=generator) > 0.7).float()
    ignored = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    ignored[0, :, 4:12, 2:9] = True
    ignored[1, :, :3, :] = True
    ignored = ignored.expand(-1, 3, -1, -1)
    with_ignore = targets.masked_fill(ignored, IGNORE)

    def value_and_grad(values):
        values = values.clone().requires_grad_(True)
        result = loss(values, with_ignore)
        result.backward()
        return result.detach(), values.grad

    value, grad = value_and_grad(logits)
    # The loss is that of the counted pixels alone, as if the others did not exist.
    counted = ~ignored[:, :1]
    alone = loss(
        logits.permute(1, 0, 2, 3)[:, counted[:, 0]][None, :, None],
        targets.permute(1, 0, 2, 3)[:, counted[:, 0]][None, :, None],
    )
    torch.testing.assert_close(value, alone)
    # Ignored pixels get no gradient, and whatever the model says there changes nothing.
    assert (grad[ignored] == 0).all() and (grad[~ignored] != 0).any()
    changed = logits.masked_fill(ignored, 0.0) + ignored * 50 * torch.randn(logits.shape)
    changed_value, changed_grad = value_and_grad(changed)
    assert changed_value == value
    assert torch.equal(changed_grad, grad)
    # Without an ignored pixel the loss is the plain one, to the bit.
    assert loss(logits, targets) == loss(logits, targets.clone())


def _samples(prefix: str, count: int, labels_fn) -> list[Sample]:
    return [
        Sample(f"{prefix}{i}", np.full((48, 48, 3), 40, np.uint8), labels_fn(i))
        for i in range(count)
    ]


def test_batch_share_puts_the_pseudo_labelled_crops_in_fixed_places():
    def dataset(samples, items, seed):
        transform = train_transform(32, (1.0, 1.0), colour=False)
        return NucleiDataset(samples, transform, items, seed=seed)

    base = dataset(_samples("dsb", 3, lambda i: disc_labels(i, 48)), 3 * 3, seed=0)
    # Every pixel of a pseudo-labelled crop here is unknown, so its targets say where it is.
    shared = dataset(_samples("new", 2, lambda i: np.full((48, 48), UNKNOWN)), 3 * 1, seed=1)
    mixed = BatchShare(base, shared, batch_size=4, per_batch=1)
    assert len(mixed) == 12
    mixed.set_epoch(2)
    from_shared = [bool((mixed[i][1] == IGNORE).all()) for i in range(len(mixed))]
    assert from_shared == [True, False, False, False] * 3
    assert torch.equal(mixed[5][0], base[4][0]) and shared.epoch == base.epoch == 2
    with pytest.raises(ValueError, match="whole batches"):
        BatchShare(base, shared, batch_size=4, per_batch=2)
    assert load_adapt_config(overrides={"share": 0.25}).per_batch(8) == 2
    assert load_adapt_config(overrides={"share": 0.01}).per_batch(8) == 1
    with pytest.raises(ValueError, match="share must be between 0 and 1"):
        load_adapt_config(overrides={"share": 1.0})
    with pytest.raises(ValueError, match="encoder cannot be set"):
        load_adapt_config(overrides={"train": {"encoder": "resnet34"}})


@pytest.mark.parametrize(
    "make_config", [tiny_config, tiny_maskrcnn_config], ids=["unetpp", "maskrcnn"]
)
def test_batchnorm_statistics_are_re_estimated_and_the_weights_stay(make_config):
    config = make_config()
    torch.manual_seed(0)
    model = build_model(config).eval()
    weights = {k: v.clone() for k, v in model.named_parameters()}
    first = batchnorm_layers(model)[0]
    seen = []
    first.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    image = np.zeros((64, 64, 3), np.uint8)
    image[disk((30, 30), 10)] = 220
    passes = adapt_batchnorm(model, [image], config, torch.device("cpu"))
    assert passes == 1 and not model.training and not first.training
    # One pass: the running mean is exactly that pass's mean (a plain, not exponential, average).
    torch.testing.assert_close(first.running_mean, seen[0].mean((0, 2, 3)))
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in weights.items())
    assert first.momentum == 0.1  # put back
    running = first.running_mean.clone()
    with pytest.raises(ValueError, match="no image"):
        adapt_batchnorm(model, [], config, torch.device("cpu"))
    assert torch.equal(first.running_mean, running)  # a refused call changes nothing


def test_batchnorm_variance_is_the_populations_between_images_too():
    """Two flat images of different levels: each pass alone has little variance at the first
    layer's input, the two together have more; an average of per-pass variances misses it."""
    config = tiny_config()
    torch.manual_seed(0)
    model = build_model(config).eval()
    first = batchnorm_layers(model)[0]
    seen = []
    first.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    dark, light = np.full((64, 64, 3), 10, np.uint8), np.full((64, 64, 3), 200, np.uint8)
    assert adapt_batchnorm(model, [dark, light], config, torch.device("cpu")) == 2
    pixels = torch.cat([x.transpose(0, 1).flatten(1) for x in seen], dim=1).double()
    torch.testing.assert_close(first.running_mean, pixels.mean(1).float())
    torch.testing.assert_close(first.running_var, pixels.var(1).float(), rtol=1e-4, atol=1e-5)
    per_pass = torch.stack([x.transpose(0, 1).flatten(1).var(1) for x in seen]).mean(0)
    assert (first.running_var > per_pass + 1e-3).any()


def _write_rgb(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny labelled dataset of bright discs, its folds file and a folder of target images:
    the same discs, dimmer, on a lighter ground, without labels."""
    root = tmp_path_factory.mktemp("adapt")
    ids = [f"img{i}" for i in range(6)]
    write_labelled(
        root / "data" / reading.TRAIN_STAGE,
        {image_id: disc_labels(i, 64, count=5) for i, image_id in enumerate(ids)},
    )
    folds_csv = root / "folds.csv"
    pd.DataFrame(
        {"image_id": ids, "fold": [0, 1] * 3, "modality": "fluorescence", "group": range(6)}
    ).to_csv(folds_csv, index=False)
    for i in range(3):
        grey = np.where(disc_labels(50 + i, 64, count=5) > 0, 150, 40).astype(np.uint8)
        _write_rgb(root / "target" / f"t{i}.png", np.dstack([grey] * 3))
    return root / "data", folds_csv, root / "target"


def _untrained_run(root: Path, data_dir: Path, **overrides) -> Path:
    """A one-fold run of random weights, as training leaves it, trained on ``data_dir``."""
    fold_dir = root / "fold0"
    config = tiny_config(**overrides)
    save_config(config, fold_dir / runs.CONFIG)
    save_compact_weights(build_model(config), fold_dir / runs.WEIGHTS)
    runs.write_run_info(fold_dir, 0, data_dir, torch.device("cpu"), amp=False)
    return root


def test_bad_inputs_are_refused_before_any_model_loads(source, tmp_path, no_model_loads):
    data_dir, folds_csv, target = source
    start = _untrained_run(tmp_path / "start", data_dir)
    used = tmp_path / "used"
    (used / "fold0").mkdir(parents=True)
    moved = _untrained_run(tmp_path / "moved", tmp_path / "nowhere")
    detector = _untrained_run(tmp_path / "detector", data_dir, **tiny_maskrcnn_config().to_dict())
    base = ["--images", target, "--from", start, "--folds-csv", folds_csv]
    cases = [
        (["--out-dir", used], f"{used}: not empty"),
        (["--out-dir", tmp_path / "a", "--images", tmp_path / "none"], "none"),
        (["--out-dir", tmp_path / "b", "--from", moved], "nowhere"),
        (["--out-dir", tmp_path / "c", "--from", detector], "no unetpp model to adapt"),
        (["--out-dir", tmp_path / "d", "--from", tmp_path / "no_run"], "no_run"),
        (["--out-dir", tmp_path / "e", "--folds-csv", tmp_path / "no.csv"], "no.csv"),
        (["--out-dir", tmp_path / "f", "--share", "1.5"], "share must be between 0 and 1"),
        (["--out-dir", tmp_path / "g", "--tta", "d4", "--tile", "33"], "tile"),
    ]
    for extra, message in cases:
        problems = refused("adapt", [*base, *extra])
        assert any(message in problem for problem in problems), (message, problems)
    assert not any((tmp_path / name).exists() for name in "abcdefg")


@pytest.mark.slow
def test_a_tiny_adaptation_writes_pseudo_labels_and_a_bundle_predict_uses(source, tmp_path):
    data_dir, folds_csv, target = source
    start = tmp_path / "start"
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {"epochs": 2, "samples_per_epoch": 48, "batch_size": 4, "crop_size": 64, "lr": 1e-2}
            | {"num_workers": 0, "amp": False, "channels_last": False, "val_every": 2}
        )
    )
    run_script(
        "train",
        ["--config", config, "--fold", "0", "--data-dir", data_dir, "--folds-csv", folds_csv]
        + ["--out-dir", start, "--device", "cpu"],
    )
    # A model of a few steps is unsure of everything: lenient thresholds let it find discs.
    lenient = {"mask_threshold": 0.3, "seed_threshold": 0.35, "border_threshold": 1.0}
    (start / runs.POSTPROCESS_YAML).write_text(yaml.safe_dump(lenient))
    settings = tmp_path / "adapt.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "pseudo": {"agreement": 0.5, "min_body": 0.3},
                "train": {"epochs": 1, "samples_per_epoch": 8, "val_every": 1},
            }
        )
    )
    out_dir = tmp_path / "adapted"
    result = run_script(
        "adapt",
        ["--images", target, "--from", start / "fold0", "--folds-csv", folds_csv]
        + ["--config", settings, "--out-dir", out_dir, "--device", "cpu"],
    )
    pseudo = out_dir / "round1" / PSEUDO_DIR
    table = pd.read_csv(pseudo / PSEUDO_CSV)
    assert sorted(table["image_id"]) == ["t0", "t1", "t2"] and table["kept"].sum() > 0
    assert (
        len(list((pseudo / "labels").iterdir())) == len(list((pseudo / "unknown").iterdir())) == 3
    )
    (fold,) = result.folds
    fold_dir = out_dir / "round1" / "start_adapted" / "fold0"
    adapted = yaml.safe_load((fold_dir / runs.CONFIG).read_text())
    assert adapted["init_from"] == str(start / "fold0" / runs.WEIGHTS_INT8) or adapted[
        "init_from"
    ] == str(start / "fold0" / runs.WEIGHTS)
    assert adapted["lr"] == 2e-4 and adapted["epochs"] == 1
    assert runs.read_split(fold_dir).validation == {"img0", "img2", "img4"}

    manifest = yaml.safe_load((result.bundle_dir / reference.MANIFEST).read_text())
    record = manifest["adaptation"]
    assert record["image_count"] == 3 and record["source_name"] == "target"
    assert record["settings"]["pseudo"]["agreement"] == 0.5 and record["pseudo_per_batch"] == [1]
    assert record["pseudo_labels"][0]["kept"] == table["kept"].sum()
    (member,) = manifest["members"]
    assert member["run"] == "start_adapted" and member["oof_images"] == 3
    reference.verify(result.bundle_dir)
    # The target has no labels to tune on: the adapted models keep the start's thresholds.
    assert load_params(result.bundle_dir / "start_adapted") == PostprocessParams(**lenient)
    labels = run_script(
        "predict",
        ["--weights", result.bundle_dir, "--images", target, "--out", tmp_path / "sub.csv"]
        + ["--device", "cpu"],
    )
    assert sorted(labels) == ["t0", "t1", "t2"]

    # BatchNorm statistics alone: no training, the same kind of bundle.
    bn = run_script(
        "adapt",
        ["--images", target, "--from", start, "--folds-csv", folds_csv, "--adapt-bn-only"]
        + ["--out-dir", tmp_path / "bn", "--device", "cpu"],
    )
    assert bn.pseudo == [] and bn.folds[0]["batchnorm_passes"] == 3
    manifest = yaml.safe_load((bn.bundle_dir / reference.MANIFEST).read_text())
    assert manifest["adaptation"]["method"] == "batchnorm statistics"
    assert manifest["members"][0]["epochs"] == 0
    assert sorted(
        run_script(
            "predict",
            ["--weights", bn.bundle_dir, "--images", target, "--out", tmp_path / "bn.csv"]
            + ["--device", "cpu"],
        )
    ) == ["t0", "t1", "t2"]
