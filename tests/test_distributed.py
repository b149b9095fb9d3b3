"""One fold trained by two gloo processes on CPU, as torchrun starts them, against one process."""

import contextlib
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import disc_sample, run_script, tiny_config, write_labelled

from nucleiseg.data import reading

# One step per epoch, so that each epoch's training loss is one step's loss:
from nucleiseg.models import runs

# One step per epoch, so that each epoch's training loss is one step's loss:
# One step per epoch, so that each epoch's training loss is one step's loss:
from nucleiseg.training import distributed, engine

# One step per epoch, so that each epoch's training loss is one step's loss:
# a global batch of 4 crops, 2 per process.
STEPS = 4
CONFIG = {"epochs": STEPS, "samples_per_epoch": 4, "batch_size": 4, "val_every": STEPS}
# The processes average their gradients, so their weights stay equal, but each
# normalizes its 2 crops with their own batch-norm statistics and takes the soft
# Dice over them, where one process takes both over all 4 crops. From the same
# first weights the first step's losses differ by 1e-5 (relative); the gradients
# through batch norm differ more (on 64 px crops the deepest maps are 2x2), and
# AdamW's first steps move every weight by about the learning rate whatever the
# gradient's size, so the next losses differ by up to 1.6% (measured: 1.55%).
FIRST_LOSS_RTOL = 1e-3
LOSS_RTOL = 0.03


TRAIN = [disc_sample(f"t{i}", i) for i in range(4)]
VAL = [disc_sample("v0", 10)]
MODALITIES = {s.image_id: "fluorescence" for s in TRAIN + VAL}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, root: str) -> None:
    """One process: torchrun's environment, then the engine's fold training as train.py runs it."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    same_weights, renamed = [], []
    replace = os.replace

    def record_rename(src, dst):
        renamed.append(str(dst))
        replace(src, dst)

    os.replace = record_rename
    original = engine.Trainer.train_one_epoch

    def one_epoch_then_compare(self, loader, epoch):
        loss = original(self, loader, epoch)
        weights = torch.cat([p.detach().flatten() for p in self.model.parameters()])
        same_weights.append(all(torch.equal(w, weights) for w in distributed.gather(weights)))
        return loss

    def crash_in_epoch_2(self, loader, epoch):
        if epoch == 2:
            raise KeyboardInterrupt("killed mid-run")
        return one_epoch_then_compare(self, loader, epoch)

    config = tiny_config(**CONFIG)
    with distributed.launch(torch.device("cpu")) as device:
        assert distributed.world_size() == world and distributed.rank() == rank
        engine.Trainer.train_one_epoch = one_epoch_then_compare
        engine.train_fold(config, TRAIN, VAL, MODALITIES, f"{root}/ddp/fold0", device)
        engine.Trainer.train_one_epoch = crash_in_epoch_2
        with contextlib.suppress(KeyboardInterrupt):
            engine.train_fold(config, TRAIN, VAL, MODALITIES, f"{root}/split/fold0", device)
        engine.Trainer.train_one_epoch = one_epoch_then_compare
        engine.train_fold(
            config, TRAIN, VAL, MODALITIES, f"{root}/split/fold0", device, resume=True
        )
    with open(f"{root}/rank{rank}.json", "w") as f:
        json.dump({"same_weights": same_weights, "renamed": renamed}, f)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The fold trained by two processes (whole, and interrupted then resumed) and by one."""
    root = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.spawn(_rank, args=(2, _free_port(), str(root)), nprocs=2, join=True)
    engine.train_fold(
        tiny_config(**CONFIG),
        TRAIN,
        VAL,
        MODALITIES,
        root / "single" / "fold0",
        torch.device("cpu"),
    )
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    return root, ranks


@pytest.mark.slow
def test_both_ranks_hold_identical_weights_after_every_step(two_processes):
    _, ranks = two_processes
    # 4 steps, then 2 before the crash and 2 after resuming.
    assert ranks[0]["same_weights"] == ranks[1]["same_weights"] == [True] * (2 * STEPS)


@pytest.mark.slow
def test_only_rank_0_writes_checkpoints_csv_weights_and_oof(two_processes):
    root, ranks = two_processes
    assert ranks[1]["renamed"] == []
    written = {os.path.relpath(p, root / "ddp" / "fold0") for p in ranks[0]["renamed"]}
    names = {runs.CONFIG, runs.EPOCHS_CSV, runs.LAST, runs.BEST, runs.WEIGHTS, runs.WEIGHTS_INT8}
    assert names <= written
    assert "oof/labels/v0.png" in written


@pytest.mark.slow
def test_the_loss_curve_matches_one_process_with_the_same_global_batch(two_processes):
    root, _ = two_processes
    two = pd.read_csv(root / "ddp" / "fold0" / runs.EPOCHS_CSV)
    one = pd.read_csv(root / "single" / "fold0" / runs.EPOCHS_CSV)
    assert len(two) == len(one) == STEPS
    np.testing.assert_allclose(two["train_loss"][0], one["train_loss"][0], rtol=FIRST_LOSS_RTOL)
    np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=LOSS_RTOL)
    np.testing.assert_array_equal(two["lr"], one["lr"])
    # The curve is the loss going down, not a constant that would match anyway.
    assert one["train_loss"].iloc[-1] < one["train_loss"].iloc[0]


@pytest.mark.slow
def test_a_resumed_two_process_run_ends_exactly_like_an_uninterrupted_one(two_processes):
    root, _ = two_processes
    whole = torch.load(root / "ddp" / "fold0" / runs.LAST, weights_only=False)
    split = torch.load(root / "split" / "fold0" / runs.LAST, weights_only=False)
    assert whole["epoch"] == split["epoch"] == STEPS and len(split["rank_rng"]) == 2
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    columns = ["epoch", "train_loss", "val_loss", "val_map", "lr"]
    pd.testing.assert_frame_equal(
        pd.read_csv(root / "ddp" / "fold0" / runs.EPOCHS_CSV)[columns],
        pd.read_csv(root / "split" / "fold0" / runs.EPOCHS_CSV)[columns],
    )
    assert (root / "ddp" / "fold0" / runs.WEIGHTS).read_bytes() == (
        root / "split" / "fold0" / runs.WEIGHTS
    ).read_bytes()


@pytest.mark.slow
def test_torchrun_continues_a_fold_in_two_processes_with_resume(tmp_path, repo_root):
    write_labelled(tmp_path / reading.TRAIN_STAGE, {s.image_id: s.labels for s in TRAIN + VAL})
    folds = tmp_path / "folds.csv"
    ids = [s.image_id for s in TRAIN + VAL]
    pd.DataFrame(
        {
            "image_id": ids,
            "fold": [1] * len(TRAIN) + [0],
            "modality": "fluorescence",
            "group": range(len(ids)),
        }
    ).to_csv(folds, index=False)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(**(CONFIG | {"epochs": 2})).to_dict()))
    run = tmp_path / "run"
    train = [repo_root / "scripts" / "train.py", "--config", config, "--fold", "0"]
    train += ["--data-dir", tmp_path, "--folds-csv", folds, "--out-dir", run, "--device", "cpu"]
    run_script("train", train[1:])
    first = pd.read_csv(run / "fold0" / runs.EPOCHS_CSV)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    command = [*torchrun, "2", *train, "--epochs", "3", "--resume"]
    # torchrun gives each process one thread unless OMP_NUM_THREADS says otherwise.
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    subprocess.run([str(part) for part in command], check=True, timeout=600, env=env)
    info = runs.read_run_info(run / "fold0")
    assert info["processes"] == 2 and info["threads"] == 1
    history = pd.read_csv(run / "fold0" / runs.EPOCHS_CSV)
    assert history["epoch"].tolist() == [1, 2, 3]
    pd.testing.assert_frame_equal(history.iloc[:2], first)
    assert history["val_map"].notna().tolist() == [False, True, True]
    assert torch.load(run / "fold0" / runs.LAST, weights_only=False)["epoch"] == 3
    assert runs.weights_problem(run / "fold0" / runs.WEIGHTS) is None
    assert (run / "fold0" / "oof" / "labels" / "v0.png").is_file()


def test_processes_that_cannot_share_the_batch_are_refused_before_training(
    tmp_path, monkeypatch, capsys
):
    write_labelled(tmp_path / reading.TRAIN_STAGE, {s.image_id: s.labels for s in TRAIN + VAL})
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as stopped:
        run_script("train", ["--data-dir", tmp_path, "--out-dir", tmp_path / "run"])
    assert stopped.value.code == 2
    assert "error: batch_size 8 cannot be shared equally by 3 processes" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
