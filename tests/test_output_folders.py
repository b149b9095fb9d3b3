"""No command may destroy, mix or silently mislabel a user's files (issue 40, cases 1-4, 8, 9).

An export replaces only a bundle or an empty folder, never a run it reads; a
run folder or bundle being written by one process is refused at once to a
second one, and a lock left by a killed process does not block; weights that
fail their checksum are not exported; an interrupted export leaves no staging
folder behind.
"""

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from helpers import disc_labels, run_script, tiny_config, write_labelled

from nucleiseg import cli, locks
from nucleiseg.data import reading
from nucleiseg.inference import oof
from nucleiseg.models import runs
from nucleiseg.models.build import build_model
from nucleiseg.models.compact import compact_state
from nucleiseg.models.config import save_config
from nucleiseg.training import engine, reference

IMAGES = {"a": 0, "b": 1}  # image id -> fold (and seed of its discs)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A one-fold run of an untrained tiny U-Net++ with out-of-fold labels, its data and folds."""
    root = tmp_path_factory.mktemp("output_folders")
    data_dir = root / "data"
    write_labelled(data_dir / reading.TRAIN_STAGE, {i: disc_labels(s) for i, s in IMAGES.items()})
    folds_csv = root / "folds.csv"
    pd.DataFrame(
        {"image_id": list(IMAGES), "fold": list(IMAGES.values()), "modality": "fluorescence"}
        | {"group": list(IMAGES.values())}
    ).to_csv(folds_csv, index=False)
    fold_dir = root / "run" / "fold0"
    config = tiny_config()
    torch.manual_seed(0)
    save_config(config, fold_dir / runs.CONFIG)
    runs.save_weights(compact_state(build_model(config).state_dict()), fold_dir / runs.WEIGHTS)
    runs.write_run_info(fold_dir, 0, data_dir, torch.device("cpu"), amp=False)
    pd.DataFrame({"epoch": [1], "seconds": [6.0]}).to_csv(fold_dir / runs.EPOCHS_CSV, index=False)
    oof.save_prediction(fold_dir, "a", None, disc_labels(0))
    return SimpleNamespace(run=root / "run", data=data_dir, folds_csv=folds_csv)


def _export_argv(tiny_run, out, *run_dirs):
    """export_weights.py's arguments for the runs given (default: the tiny run) into ``out``."""
    data = ["--data-dir", tiny_run.data, "--folds-csv", tiny_run.folds_csv]
    return ["--runs", *(run_dirs or [tiny_run.run]), "--out", out, *data]


def _refused(script, argv, status=cli.USAGE_STATUS):
    with pytest.raises(cli.Refused) as refused:
        run_script(script, argv)
    assert refused.value.code == status
    return refused.value.problems


def _contents(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _leftovers(folder):
    """The hidden staging, old-bundle and lock entries an export keeps beside its folder."""
    return sorted(p.name for p in folder.parent.glob(f".{folder.name}.*"))


@contextlib.contextmanager
def _held_by_another_process(folder):
    """Another process holding ``folder``'s lock; yields the line a refusal names it with."""
    hold = (
        "import sys\nfrom nucleiseg.locks import folder_lock\n"
        "with folder_lock(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        info = json.loads(locks.lock_path(folder).read_text())
        assert (info["pid"], info["host"]) == (holder.pid, socket.gethostname())
        holder_name = f"pid {holder.pid} on {info['host']} since {info['since']}"
        yield holder, f"{folder}: could not write: in use by {holder_name}"
    finally:
        holder.kill()
        holder.wait()


# 1. --out is replaced only when it is new, empty or a bundle, and never when it holds a run.


def _not_a_bundle(folder):
    return (
        f"{folder}: holds files and is not a bundle (no manifest.yaml listing members and "
        "files); an export replaces its folder whole: give a new or empty one"
    )


def test_export_refuses_an_out_folder_it_would_destroy(tiny_run, tmp_path):
    user = tmp_path / "user"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    (user / "sub" / "a.png").write_bytes(b"png")
    kept, run_kept = _contents(user), _contents(tiny_run.run)
    assert _refused("export_weights", _export_argv(tiny_run, user)) == [_not_a_bundle(user)]
    (user / reference.MANIFEST).write_text("note: lists no members and no files\n")
    assert _refused("export_weights", _export_argv(tiny_run, user)) == [_not_a_bundle(user)]
    (user / reference.MANIFEST).unlink()
    run, fold = tiny_run.run, tiny_run.run / "fold0"
    replaced = f"{run}: the bundle would replace the run {run}"
    assert _refused("export_weights", _export_argv(tiny_run, run)) == [_not_a_bundle(run), replaced]
    fold_given = _export_argv(tiny_run, run, fold)
    assert _refused("export_weights", fold_given) == [_not_a_bundle(run), replaced]
    above = run.parent
    assert _refused("export_weights", _export_argv(tiny_run, above)) == [
        _not_a_bundle(above),
        f"{above}: the bundle would replace the run {run}",
    ]
    assert _refused("export_weights", _export_argv(tiny_run, fold / "bundle")) == [
        f"{fold / 'bundle'}: the bundle would go inside the fold folder {fold}"
    ]
    assert _contents(user) == kept and _contents(run) == run_kept
    assert not (fold / "bundle").exists()
    assert _leftovers(user) == _leftovers(run) == _leftovers(above) == []


def test_export_replaces_an_empty_folder_or_a_bundle_and_writes_inside_a_run(tiny_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    first = run_script("export_weights", _export_argv(tiny_run, empty))
    assert reference.verify(empty) == [empty / "run"]
    second = run_script("export_weights", _export_argv(tiny_run, empty) + ["--tta", "flip"])
    assert (first["inference"]["tta"], second["inference"]["tta"]) == ("none", "flip")
    assert reference.read_manifest(empty) == second
    # A fine-tune's bundle goes to <run>/bundle: a new folder inside a run is no fold folder.
    run = shutil.copytree(tiny_run.run, tmp_path / "run")
    run_script("export_weights", _export_argv(tiny_run, run / "bundle", run))
    assert reference.verify(run / "bundle") == [run / "bundle" / "run"]
    assert _leftovers(empty) == _leftovers(run / "bundle") == []


# 2. and 3. One writer per run folder or bundle: a second one is refused at once.


def test_a_second_training_into_a_run_folder_is_refused_at_once(tiny_run, tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    config = tmp_path / "tiny.yaml"
    save_config(tiny_config(epochs=1), config)  # seconds of training, were it not refused
    argv = ["--out-dir", run_dir, "--data-dir", tiny_run.data, "--folds-csv", tiny_run.folds_csv]
    argv += ["--config", config]
    with _held_by_another_process(run_dir) as (holder, in_use):
        assert _refused("train", argv + ["--device", "cpu"], cli.FAILURE_STATUS) == [in_use]
        assert not run_dir.exists()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed holder's lock file is still there; the kernel released its lock.
    lock = locks.lock_path(run_dir)
    assert json.loads(lock.read_text())["pid"] == holder.pid
    with locks.folder_lock(run_dir):
        assert json.loads(lock.read_text())["pid"] != holder.pid
    assert not lock.exists()


def test_under_torchrun_only_rank_0_takes_the_run_folder_lock(tiny_run, tmp_path, monkeypatch):
    run_dir, trained = tmp_path / "run", []
    monkeypatch.setattr(engine.distributed, "is_main", lambda: False)
    monkeypatch.setattr(engine, "train_fold", lambda *args, **kwargs: trained.append(args[4]))
    with _held_by_another_process(run_dir):  # as rank 0 holds it for the other ranks
        folds = engine.train_folds(
            tiny_config(), tiny_run.data, tiny_run.folds_csv, "0", run_dir, torch.device("cpu")
        )
    assert folds == [0] and trained == [run_dir / "fold0"]


def test_a_second_export_into_a_bundle_is_refused_at_once(tiny_run, tmp_path):
    bundle = tmp_path / "weights"
    run_script("export_weights", _export_argv(tiny_run, bundle))
    kept = _contents(bundle)
    with _held_by_another_process(bundle) as (_, in_use):
        argv = _export_argv(tiny_run, bundle)
        assert _refused("export_weights", argv, cli.FAILURE_STATUS) == [in_use]
        assert _leftovers(bundle) == [locks.lock_path(bundle).name]
    assert _contents(bundle) == kept


# 4. Weights are checked against the checksum recorded when they were written.


def test_export_refuses_weights_that_fail_their_checksum(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run.run, tmp_path / "run")
    weights = run / "fold0" / runs.WEIGHTS
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    weights.write_bytes(bytes(blob))
    out = tmp_path / "weights"
    assert _refused("export_weights", _export_argv(tiny_run, out, run)) == [
        f"not exported: {weights}: corrupt: its sha256 differs from the one recorded in "
        f"{run / 'fold0' / runs.WEIGHTS_SHA256} when it was written"
    ]
    assert not out.exists() and _leftovers(out) == []


# 8. A run folder that is not there is one error line, not a traceback.


def test_export_names_a_run_folder_that_is_not_there(tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    assert _refused("export_weights", ["--runs", missing, "--out", tmp_path / "w"]) == [
        f"--runs: {missing} is not a folder"
    ]
    assert capsys.readouterr().err == f"error: --runs: {missing} is not a folder\n"


# 9. An interrupted export removes its staging folder; the next one removes a stale one.


def test_an_interrupted_export_leaves_no_staging_folder(tiny_run, tmp_path, monkeypatch):
    bundle = tmp_path / "weights"
    staging = tmp_path / ".weights.staging"
    (staging / "run" / "fold9").mkdir(parents=True)  # what a killed export left
    (staging / "run" / "fold9" / "weights_fp16.pt").write_bytes(b"stale")
    run_script("export_weights", _export_argv(tiny_run, bundle))
    assert not staging.exists() and _leftovers(bundle) == []
    assert sorted(reference.read_manifest(bundle)["files"]) == sorted(
        str(p.relative_to(bundle)) for p in bundle.rglob("*.*") if p.name != reference.MANIFEST
    )
    kept = _contents(bundle)
    second = shutil.copytree(tiny_run.run, tmp_path / "second")
    evaluate_run, staged = reference.evaluate_run, []

    def interrupted(run_dir, *args):
        if run_dir == second:  # the first run's files are staged by now
            staged.extend(p.name for p in staging.rglob("*") if p.is_file())
            raise KeyboardInterrupt
        return evaluate_run(run_dir, *args)

    monkeypatch.setattr(reference, "evaluate_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_script("export_weights", _export_argv(tiny_run, bundle, tiny_run.run, second))
    assert runs.WEIGHTS in staged
    assert _leftovers(bundle) == [] and _contents(bundle) == kept
