"""The Snakemake workflow (workflow/Snakefile): its plan, its SLURM profile, a tiny whole run."""

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import disc_sample, write_labelled

from nucleiseg.data.reading import TEST_STAGE, TRAIN_STAGE
from nucleiseg.models import runs
from nucleiseg.models.config import load_config

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
GRID = yaml.safe_load((REPO / "workflow" / "config.yaml").read_text())
SAMPLE = yaml.safe_load((REPO / "workflow" / "sample.yaml").read_text())


def snakemake(workdir: Path, *arguments, status: int = 0) -> str:
    """Run snakemake on the workflow in ``workdir``; its output (stdout and stderr).

    Args:
        workdir: The folder it runs in.
        arguments: Its command-line arguments.
        status: The exit status it must end with.
    """
    command = [sys.executable, "-m", "snakemake", "--snakefile", SNAKEFILE, "--directory", workdir]
    done = subprocess.run(
        [str(a) for a in [*command, *arguments]],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == status, done.stdout + done.stderr
    return done.stdout + done.stderr


def planned_jobs(output: str) -> Counter:
    """Rule -> job count from a dry run's "Job stats" table."""
    table = output.split("Job stats:")[1].split("\n\n")[0]
    rows = (line.split() for line in table.splitlines()[3:])
    return Counter({rule: int(count) for rule, count in rows if rule != "total"})


def job_blocks(output: str) -> list[str]:
    """The dry run's text of each job, from its ``rule NAME:`` line to the next."""
    jobs = output.split("Job stats:")[1]
    return re.split(r"\n(?=(?:local)?rule \w+:)", jobs)[1:]


@pytest.fixture
def clean_clone(tmp_path):
    """A working directory with the committed inputs the grid reads and no run made yet.

    Beside it, empty folders stand for the dataset the configuration names
    (``../shared/data/dsb2018``): a dry run only checks that they exist.
    """
    clone = tmp_path / "main"
    for name in ("folds", "configs", "ablations"):
        (clone / name).parent.mkdir(exist_ok=True)
        (clone / name).symlink_to(REPO / name)
    (clone / GRID["test_images"]).mkdir(parents=True)
    return clone


def test_every_run_of_the_grid_is_the_experiment_its_configuration_names():
    for name, entry in GRID["training"].items():
        path = REPO / entry["config"] if "config" in entry else None
        config = load_config(path, {"model": entry["model"]})
        assert config.experiment == name, name
    assert set(GRID["configs"]) <= set(GRID["training"])


def test_dry_run_of_a_clean_clone_plans_the_whole_grid_with_every_jobs_resources(clean_clone):
    # A dry run caps threads at --cores (1 by default); a SLURM run does not.
    profile = REPO / "workflow" / "profiles" / "slurm"
    output = snakemake(clean_clone, "-n", "--profile", profile, "--cores", "64")
    folds = len(GRID["folds"])
    every_fold = [n for n in GRID["configs"] if "folds" not in GRID["training"][n]]
    trained = sum(len(GRID["training"][n].get("folds", GRID["folds"])) for n in GRID["configs"])
    assert trained == len(every_fold) * folds + len(GRID["configs"]) - len(every_fold)
    assert planned_jobs(output) == {
        "train_fold": trained,
        "evaluate_oof": len(GRID["configs"]),
        "tune_postprocess": len(GRID["configs"]),
        "ablate": len(GRID["ablations"]),
        "export_bundle": 1,
        "predict_test": 1,
        "validate_submission": 1,
        "all": 1,
    }
    blocks = [b for b in job_blocks(output) if not b.startswith("rule all:")]
    assert len(blocks) == sum(planned_jobs(output).values()) - 1
    for block in blocks:
        resources = dict(re.findall(r"(\w+)=([^,\n]+)", block.split("resources:")[1]))
        assert int(resources["mem_mb"]) >= 1000 and int(resources["runtime"]) >= 5, block
        assert resources["slurm_partition"] == "cpu", block
        assert re.search(r"\n    log: \S+\.log", block), block
    train = [b for b in blocks if b.startswith("rule train_fold:")]
    assert all("threads: 8" in b and "gpu=0" in b for b in train)
    assert any("mem_mb=10000" in b and "runtime=240" in b for b in train)  # Mask R-CNN


@pytest.mark.slow
def test_a_configuration_the_grid_cannot_run_is_refused_as_the_snakefile_is_read(
    clean_clone, tmp_path
):
    missing = tmp_path / "nowhere"
    training = GRID["training"] | {"maskrcnn_r18": {"model": "mask-rcnn"}}
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            GRID
            | {"data_dir": str(missing), "training": training}
            | {"configs": ["unetpp_effb0", "maskrcnn_r18", "unetpp_typo"]}
        )
    )
    output = snakemake(clean_clone, "-n", "--configfile", config, status=2)
    assert [line for line in output.splitlines() if line.startswith("error:")] == [
        "error: training: maskrcnn_r18: unknown model family 'mask-rcnn'; "
        "choose from unetpp, maskrcnn",
        "error: configs: unetpp_typo: no entry under training",
        f"error: data_dir: {missing}: no such folder (in {clean_clone})",
    ]
    assert "Job stats" not in output and "Traceback" not in output


def test_gpus_train_each_fold_with_torchrun_on_that_many_gpus(clean_clone):
    output = snakemake(
        clean_clone,
        "-n",
        "-p",
        "--config",
        "gpus=2",
        "configs=[unetpp_effb0_generalized]",
        "folds=[0]",
    )
    assert planned_jobs(output)["train_fold"] == 1
    (train,) = [b for b in job_blocks(output) if b.startswith("rule train_fold:")]
    assert "gpu=2" in train
    assert "-m torch.distributed.run --standalone --nproc-per-node 2" in train
    assert "--fold 0" in train and "--device cuda" in train
    (predict,) = [b for b in job_blocks(output) if b.startswith("rule predict_test:")]
    assert "gpu=1" in predict


def _tiny_grid(tmp_path: Path) -> Path:
    """workflow/sample.yaml for U-Net++ alone on six 64 px images in two folds, all under tmp_path.

    The bundled sample's whole-image validation makes each training job cost
    a minute on 2 CPU cores; these images keep the run to seconds a job.
    """
    ids = [f"img{i}" for i in range(6)]
    write_labelled(
        tmp_path / "data" / TRAIN_STAGE, {i: disc_sample(i, n).labels for n, i in enumerate(ids)}
    )
    write_labelled(tmp_path / "data" / TEST_STAGE, {"test0": disc_sample("test0", 100).labels})
    folds_csv = tmp_path / "folds.csv"
    pd.DataFrame(
        {"image_id": ids, "fold": [0, 1] * 3, "modality": "fluorescence", "group": range(6)}
    ).to_csv(folds_csv, index=False)
    run = tmp_path / "runs" / "unetpp_tiny"
    ablation = tmp_path / "ablation.yaml"
    variants = [
        {"name": "no views", "runs": [str(run)]},
        {"name": "flip", "runs": [str(run)], "tta": "flip"},
    ]
    ablation.write_text(
        yaml.safe_dump(
            {
                "name": "smoke",
                "data_dir": str(tmp_path / "data"),
                "folds_csv": str(folds_csv),
                "variants": variants,
            }
        )
    )
    entry = SAMPLE["training"]["unetpp_tiny"]
    config = SAMPLE | {
        "data_dir": str(tmp_path / "data"),
        "test_images": str(tmp_path / "data" / TEST_STAGE),
        "folds_csv": str(folds_csv),
        "runs_dir": str(tmp_path / "runs"),
        "results_dir": str(tmp_path / "results"),
        "logs_dir": str(tmp_path / "logs"),
        "configs": ["unetpp_tiny"],
        "training": {"unetpp_tiny": entry | {"config": str(REPO / entry["config"])}},
        "ablations": [str(ablation)],
        "bundle": SAMPLE["bundle"]
        | {"out": str(tmp_path / "weights"), "chosen_by": [str(ablation)]},
        "submission": str(tmp_path / "submission.csv"),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_a_finished_grid_reruns_nothing_and_a_deleted_fold_only_what_it_feeds(tmp_path):
    config = _tiny_grid(tmp_path)
    snakemake(tmp_path, "--cores", "2", "--configfile", config)
    fold1 = tmp_path / "runs" / "unetpp_tiny" / "fold1"
    assert (tmp_path / "submission.validation.txt").read_text().startswith("OK: ")
    assert (tmp_path / "results" / "smoke.md").is_file()
    assert (tmp_path / "weights" / "manifest.yaml").is_file()
    assert (tmp_path / "runs" / "unetpp_tiny" / runs.POSTPROCESS_YAML).is_file()
    assert "cv: " in (tmp_path / "logs" / "evaluate_oof" / "unetpp_tiny.log").read_text()

    assert "Nothing to be done" in snakemake(tmp_path, "--cores", "2", "--configfile", config)

    (fold1 / runs.WEIGHTS).unlink()
    plan = snakemake(tmp_path, "-n", "--configfile", config)
    assert planned_jobs(plan) == {
        "train_fold": 1,
        "evaluate_oof": 1,
        "tune_postprocess": 1,
        "ablate": 1,
        "export_bundle": 1,
        "predict_test": 1,
        "validate_submission": 1,
        "all": 1,
    }
    assert re.findall(r"wildcards: run=unetpp_tiny, fold=(\d+)", plan) == ["1"]
    fold0 = tmp_path / "runs" / "unetpp_tiny" / "fold0" / runs.WEIGHTS
    kept = fold0.stat().st_mtime_ns
    snakemake(tmp_path, "--cores", "2", "--configfile", config)
    assert fold0.stat().st_mtime_ns == kept
    retrained = (fold1 / runs.WEIGHTS).stat().st_mtime_ns
    # The leaderboard predicted fold 1 again from its new weights, not from its old cache.
    caches = list((tmp_path / "runs" / "unetpp_tiny" / "cache").glob("*/fold1/timing.json"))
    assert caches and all(c.stat().st_mtime_ns > retrained for c in caches)
