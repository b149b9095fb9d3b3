"""Models, loss, configuration and the training engine, on tiny synthetic data."""

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import disc_labels, disc_sample, tiny_config, tiny_maskrcnn_config, write_labelled

from nucleiseg.data.dataset import to_tensor
from nucleiseg.data.reading import TRAIN_STAGE
from nucleiseg.data.targets import make_targets
from nucleiseg.inference import oof
from nucleiseg.inference.family import get_family
from nucleiseg.inference.predictor import predict_probabilities
from nucleiseg.inference.tiling import pad_to_stride
from nucleiseg.models import runs
from nucleiseg.models.build import build_model, load_weights
from nucleiseg.models.compact import compact_state
from nucleiseg.models.config import TrainConfig, load_config, save_config
from nucleiseg.models.losses import bce_dice_loss, get_loss
from nucleiseg.training import engine
from nucleiseg.training.checks import training_problems


def test_unetpp_output_shape_and_backward():
    model = build_model(tiny_config())
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3, 64, 64)
    bce_dice_loss(logits, torch.zeros_like(logits)).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_bce_dice_is_low_for_right_and_high_for_wrong_logits():
    targets = torch.zeros(1, 3, 8, 8)
    targets[:, :, 2:6, 2:6] = 1
    right = bce_dice_loss(20 * (2 * targets - 1), targets)
    wrong = bce_dice_loss(-20 * (2 * targets - 1), targets)
    assert right.item() < 0.01 and wrong.item() > 10


def test_bce_is_bce_dice_without_its_dice_term():
    targets = torch.zeros(2, 3, 8, 8)
    targets[:, :, 2:6, 2:6] = 1
    logits = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    probabilities = torch.sigmoid(logits)
    inter = (probabilities * targets).sum((0, 2, 3))
    dice = 1 - (2 * inter + 1) / (probabilities.sum((0, 2, 3)) + targets.sum((0, 2, 3)) + 1)
    bce = get_loss("bce")(logits, targets)
    assert bce.item() == pytest.approx(
        float(-(targets * probabilities.log() + (1 - targets) * (1 - probabilities).log()).mean()),
        rel=1e-5,
    )
    assert bce_dice_loss(logits, targets).item() == pytest.approx(
        bce.item() + dice.mean().item(), rel=1e-6
    )


def test_config_yaml_then_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\npostprocess:\n  min_size: 3\n")
    config = load_config(path, {"epochs": 9, "seed": None})
    assert config.epochs == 9 and config.postprocess.min_size == 3 and config.seed == 0
    path.write_text("epoch: 7\n")
    with pytest.raises(ValueError, match="unknown setting.*epoch"):
        load_config(path)


def test_unknown_model_fails_by_name():
    with pytest.raises(ValueError, match="unknown model 'unet'"):
        tiny_config(model="unet")
    with pytest.raises(KeyError, match="unknown model 'unet'"):
        build_model(TrainConfig(model="unet"))


def test_family_defaults_come_before_the_file_and_the_flags(tmp_path):
    config = load_config(overrides={"model": "maskrcnn"})
    assert (config.encoder, config.batch_size, config.experiment) == ("resnet18", 4, "maskrcnn_r18")
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: maskrcnn\nbatch_size: 2\nmaskrcnn:\n  anchor_sizes: [4, 8, 16, 32, 64]\n"
    )
    config = load_config(path, {"encoder": "resnet34"})
    assert (config.encoder, config.batch_size) == ("resnet34", 2)
    assert config.maskrcnn.anchor_sizes == (4, 8, 16, 32, 64)
    assert load_config(path, {"model": "unetpp"}).encoder == "tu-efficientnet_b0"


def test_training_steps_lower_the_loss():
    config = tiny_config(samples_per_epoch=8, lr=3e-3)
    trainer = engine.Trainer.create(config, torch.device("cpu"))
    sample = disc_sample("a", 0)
    images = torch.stack([to_tensor(sample.image)] * 2)
    targets = torch.from_numpy(make_targets(sample.labels)).float()[None].repeat(2, 1, 1, 1)
    losses = []
    trainer.model.train()
    for _ in range(12):
        loss = bce_dice_loss(trainer.model(images), targets)
        trainer.optimizer.zero_grad()
        loss.backward()
        trainer.optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize("family", ["unetpp", "maskrcnn"])
def test_resumed_run_ends_exactly_like_an_uninterrupted_one(family, tmp_path, monkeypatch):
    train = [disc_sample(f"t{i}", i) for i in range(3)]
    val = [disc_sample("v0", 10)]
    modalities = {s.image_id: "fluorescence" for s in train + val}
    config = tiny_config() if family == "unetpp" else tiny_maskrcnn_config()
    cpu = torch.device("cpu")

    engine.train_fold(config, train, val, modalities, tmp_path / "whole" / "fold0", cpu)

    original = engine.Trainer.train_one_epoch

    def crash_in_second_epoch(self, loader, epoch):
        if epoch == 1:
            raise KeyboardInterrupt("killed mid-run")
        return original(self, loader, epoch)

    monkeypatch.setattr(engine.Trainer, "train_one_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        engine.train_fold(config, train, val, modalities, tmp_path / "split" / "fold0", cpu)
    assert len(pd.read_csv(tmp_path / "split" / "fold0" / runs.EPOCHS_CSV)) == 1
    with pytest.raises(FileExistsError, match="--resume"):
        engine.train_fold(config, train, val, modalities, tmp_path / "split" / "fold0", cpu)
    monkeypatch.setattr(engine.Trainer, "train_one_epoch", original)
    engine.train_fold(
        config, train, val, modalities, tmp_path / "split" / "fold0", cpu, resume=True
    )

    whole = torch.load(tmp_path / "whole" / "fold0" / runs.LAST, weights_only=False)
    split = torch.load(tmp_path / "split" / "fold0" / runs.LAST, weights_only=False)
    assert whole["epoch"] == split["epoch"] == 2
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    columns = ["epoch", "train_loss", "val_loss", "val_map", "lr"]
    history = pd.read_csv(tmp_path / "split" / "fold0" / runs.EPOCHS_CSV)[columns]
    assert history[["train_loss", "val_loss"]].notna().all().all()
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "whole" / "fold0" / runs.EPOCHS_CSV)[columns], history
    )
    # Equal tensors, equal files: a checksum tells a reproduced fold from another.
    weights = [tmp_path / run / "fold0" / runs.WEIGHTS for run in ("whole", "split")]
    assert weights[0].read_bytes() == weights[1].read_bytes()
    assert runs.weights_problem(weights[1]) is None
    # The finished fold keeps compact weights that load back, and its OOF label images.
    model = build_model(config)
    load_weights(model, tmp_path / "split" / "fold0" / runs.WEIGHTS)
    fold, labels = oof.load_oof_labels(tmp_path / "split")["v0"]
    assert fold == 0 and labels.shape == (64, 64)
    raw = get_family(family).load_oof(tmp_path / "split" / "fold0")["v0"]
    if family == "unetpp":
        assert raw.shape == (3, 64, 64) and 0 <= raw.min() <= raw.max() <= 1
    else:
        assert raw.shape == (64, 64) and all(0 <= m.min() <= m.max() <= 1 for m in raw.masks)


def test_encoder_weights_from_a_local_file_and_init_from_a_checkpoint(tmp_path):
    import timm

    backbone = timm.create_model("efficientnet_b0", pretrained=False)
    torch.save({"state_dict": backbone.state_dict()}, tmp_path / "effb0_imagenet.pth")
    model = build_model(tiny_config(encoder_weights=str(tmp_path / "effb0_imagenet.pth")))
    assert torch.equal(model.encoder.model.conv_stem.weight, backbone.conv_stem.weight)

    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "run.ckpt")
    started = build_model(tiny_config(init_from=str(tmp_path / "run.ckpt")))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, started.state_dict()[name]), name

    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_weights(model, tmp_path / "missing.ckpt")
    torch.save({"conv_stem.weight": backbone.conv_stem.weight}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="encoder weights missing"):
        build_model(tiny_config(encoder_weights=str(tmp_path / "partial.pth")))


@pytest.mark.parametrize("shape", [(5, 7), (33, 64), (70, 41)])
def test_whole_image_prediction_pads_to_the_stride_and_crops_back(shape):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (*shape, 3), dtype=np.uint8)
    padded = pad_to_stride(image)
    assert padded.shape[0] % 32 == 0 and padded.shape[1] % 32 == 0
    np.testing.assert_array_equal(padded[: shape[0], : shape[1]], image)
    model = build_model(tiny_config()).eval()
    probabilities = predict_probabilities(model, image, torch.device("cpu"))
    assert probabilities.shape == (3, *shape)
    assert probabilities.min() >= 0 and probabilities.max() <= 1


def test_each_fold_of_a_fine_tune_starts_from_its_own_fold(tmp_path, monkeypatch):
    """``{fold}`` in init_from: fold K starts from fold K of the earlier run, records that
    path, and a missing start is named before anything trains."""
    fold_of = {"img0": 0, "img1": 0, "img2": 1, "img3": 1}
    write_labelled(
        tmp_path / "data" / TRAIN_STAGE, {i: disc_labels(n) for n, i in enumerate(fold_of)}
    )
    folds_csv = tmp_path / "folds.csv"
    pd.DataFrame(
        {"image_id": list(fold_of), "fold": list(fold_of.values())}
        | {"modality": "fluorescence", "group": range(4)}
    ).to_csv(folds_csv, index=False)
    starts = {}
    for fold in (0, 1):
        torch.manual_seed(10 + fold)
        starts[fold] = compact_state(build_model(tiny_config()).state_dict())
        save_config(tiny_config(), tmp_path / "start" / f"fold{fold}" / runs.CONFIG)
        runs.save_weights(starts[fold], tmp_path / "start" / f"fold{fold}" / runs.WEIGHTS)
    config = tiny_config(epochs=1, init_from=str(tmp_path / "start" / "fold{fold}" / runs.WEIGHTS))
    data_dir, run_dir = tmp_path / "data", tmp_path / "run"
    assert training_problems(config, data_dir, folds_csv, "all", run_dir, False) == []

    started = {}  # init_from -> the weights the fold's model held when it was validated

    def validate(model, config, samples, device, save=None):
        started[config.init_from] = {k: v.clone() for k, v in model.state_dict().items()}
        return 0.2, 0.7

    # Training stubbed out: the model validated is the one the fold started from.
    monkeypatch.setattr(engine.Trainer, "train_one_epoch", lambda self, loader, epoch: 0.5)
    monkeypatch.setattr(engine, "validate", validate)
    engine.train_folds(config, data_dir, folds_csv, "all", run_dir, torch.device("cpu"))
    for fold in (0, 1):
        own = str(tmp_path / "start" / f"fold{fold}" / runs.WEIGHTS)
        assert load_config(run_dir / f"fold{fold}" / runs.CONFIG).init_from == own
        weights = started[own]
        for name, tensor in starts[fold].items():
            assert torch.equal(weights[name].to(tensor.dtype), tensor), (fold, name)

    (tmp_path / "start" / "fold1" / runs.WEIGHTS).unlink()
    problems = training_problems(config, data_dir, folds_csv, "all", tmp_path / "run2", False)
    assert len(problems) == 1 and str(tmp_path / "start" / "fold1" / runs.WEIGHTS) in problems[0]
