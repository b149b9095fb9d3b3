"""The layout of a training run on disk, shared by training, inference and evaluation.

``runs/<experiment>/fold<K>/`` holds, for fold K:

- ``config.yaml``: the resolved configuration;
- ``run.yaml``: where the data came from and what ran it;
- ``epochs.csv``: one row per epoch;
- ``last.ckpt`` and ``best.ckpt``: full checkpoints (regenerated, not committed);
- ``weights_fp16.pt``: the final model weights in float16 (committed), or in a
  reference bundle ``weights_int8.pt``, the same weights in int8 (see
  :mod:`nucleiseg.compact`);
- ``oof/``: out-of-fold predictions (see :mod:`nucleiseg.oof`);

and ``runs/<experiment>/postprocess.yaml`` the thresholds tuned on the
out-of-fold predictions of all its folds.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml

from nucleiseg.atomic import atomic_path
from nucleiseg.precision import precision_name, processor_name

CONFIG = "config.yaml"
RUN_INFO = "run.yaml"
EPOCHS_CSV = "epochs.csv"
LAST = "last.ckpt"
BEST = "best.ckpt"
WEIGHTS = "weights_fp16.pt"
WEIGHTS_INT8 = "weights_int8.pt"
POSTPROCESS_YAML = "postprocess.yaml"

_FOLD_DIR = re.compile(r"^fold(\d+)$")


def fold_dirs(run_dir: str | Path) -> dict[int, Path]:
    """The fold folders of a run, by fold number; a fold folder itself gives just itself.

    Args:
        run_dir: ``runs/<experiment>`` or one of its ``fold<K>`` folders.

    Returns:
        Fold number -> folder, sorted; empty if there is none.
    """
    run_dir = Path(run_dir)
    match = _FOLD_DIR.match(run_dir.name)
    if match:
        return {int(match.group(1)): run_dir}
    found = {}
    for path in run_dir.glob("fold*"):
        match = _FOLD_DIR.match(path.name)
        if match and path.is_dir():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def weights_path(fold_dir: Path) -> Path | None:
    """A fold's compact weights: float16 if there are, else int8; None if the fold has none."""
    for name in (WEIGHTS, WEIGHTS_INT8):
        if (Path(fold_dir) / name).is_file():
            return Path(fold_dir) / name
    return None


def write_run_info(
    fold_dir: Path, fold: int, data_dir: Path, device: torch.device, amp: bool
) -> None:
    """Record where a fold's data came from and what ran it (``run.yaml``).

    ``precision`` is what the model computed in, which for ``amp`` depends on
    the hardware (see ``nucleiseg.precision``).
    """
    info = {
        "fold": int(fold),
        "data_dir": str(data_dir),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "processor": processor_name(),
        "precision": precision_name(device, amp),
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
    }
    with atomic_path(Path(fold_dir) / RUN_INFO) as tmp:
        tmp.write_text(yaml.safe_dump(info, sort_keys=False))


def read_run_info(fold_dir: Path) -> dict:
    """The ``run.yaml`` of a fold folder."""
    path = Path(fold_dir) / RUN_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no run information; pass --data-dir explicitly")
    return yaml.safe_load(path.read_text())
