"""The layout of a training run on disk, shared by training, inference and evaluation.

``runs/<experiment>/fold<K>/`` holds, for fold K:

- ``config.yaml``: the resolved configuration;
- ``run.yaml``: where the data came from and what ran it;
- ``epochs.csv``: one row per epoch;
- ``last.ckpt`` and ``best.ckpt``: full checkpoints (regenerated, not committed);
- ``weights_fp16.pt``: the final model weights in float16 (committed), or in a
  reference bundle ``weights_int8.pt``, the same weights in int8 (see
  :mod:`nucleiseg.models.compact`);
- ``weights.sha256``: the sha256 of the compact weights as they were written
  (``sha256sum`` format), checked before they are loaded;
- ``split.csv``: the images the fold trained on and those it held out
  (columns image_id, role), checked against the folds file a later command
  is given; runs trained before it was recorded have none;
- ``oof/``: out-of-fold predictions (see :mod:`nucleiseg.inference.oof`);

and ``runs/<experiment>/postprocess.yaml`` the thresholds tuned on the
out-of-fold predictions of all its folds.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
import zipfile
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml

from nucleiseg.atomic import write_bytes, write_text
from nucleiseg.data.reading import DataError
from nucleiseg.models.compact import compact_state
from nucleiseg.models.precision import precision_name, processor_name

CONFIG = "config.yaml"
RUN_INFO = "run.yaml"
EPOCHS_CSV = "epochs.csv"
LAST = "last.ckpt"
BEST = "best.ckpt"
WEIGHTS = "weights_fp16.pt"
WEIGHTS_INT8 = "weights_int8.pt"
POSTPROCESS_YAML = "postprocess.yaml"
WEIGHTS_SHA256 = "weights.sha256"
SPLIT_CSV = "split.csv"
TRAINING = "train"
VALIDATION = "validation"

_FOLD_DIR = re.compile(r"^fold(\d+)$")
_CHECKSUM_LINE = re.compile(r"^([0-9a-f]{64})  (\S.*)$")
_CHUNK = 1 << 20
_ZIP_SIGNATURE = b"PK\x03\x04"

log = logging.getLogger(__name__)


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


def run_root(run_dir: str | Path) -> Path:
    """The run folder of a run folder or of one of its ``fold<K>`` folders."""
    run_dir = Path(run_dir)
    return run_dir.parent if _FOLD_DIR.match(run_dir.name) else run_dir


def postprocess_path(run_dir: str | Path) -> Path:
    """Where a run's tuned thresholds are, given the run folder or one of its fold folders."""
    return run_root(run_dir) / POSTPROCESS_YAML


def weights_path(fold_dir: Path) -> Path | None:
    """A fold's compact weights: float16 if there are, else int8; None if the fold has none."""
    for name in (WEIGHTS, WEIGHTS_INT8):
        if (Path(fold_dir) / name).is_file():
            return Path(fold_dir) / name
    return None


def write_run_info(
    fold_dir: Path,
    fold: int,
    data_dir: Path,
    device: torch.device,
    amp: bool,
    extra_data: list[str] | None = None,
    processes: int = 1,
) -> None:
    """Record where a fold's data came from and what ran it (``run.yaml``).

    ``extra_data`` lists the external folders that joined the training images;
    ``processes``, recorded when more than 1, how many trained the fold
    together (torchrun; ``threads`` is then each one's).

    ``precision`` is what the model computed in, which for ``amp`` depends on
    the hardware (see ``nucleiseg.models.precision``).
    """
    info = {
        "fold": int(fold),
        "data_dir": str(data_dir),
        **({"extra_data": list(extra_data)} if extra_data else {}),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "processor": processor_name(),
        "precision": precision_name(device, amp),
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
        **({"processes": processes} if processes > 1 else {}),
    }
    write_text(Path(fold_dir) / RUN_INFO, yaml.safe_dump(info, sort_keys=False))


def read_run_info(fold_dir: Path) -> dict:
    """The ``run.yaml`` of a fold folder.

    Raises:
        FileNotFoundError: If there is none.
        nucleiseg.data.reading.DataError: If it is not a YAML mapping, naming it.
    """
    path = Path(fold_dir) / RUN_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no run information; pass --data-dir explicitly")
    return read_yaml(path)


class Split(NamedTuple):
    """The images a fold trained on and those it held out, as its ``split.csv`` records them."""

    training: frozenset[str]
    validation: frozenset[str]


def write_split(fold_dir: Path, training: Iterable[str], validation: Iterable[str]) -> None:
    """Record a fold's training and held-out images (``split.csv``: image_id, role).

    Raises:
        nucleiseg.atomic.WriteError: If the file cannot be written, naming it.
    """
    roles = {image_id: TRAINING for image_id in training}
    roles |= {image_id: VALIDATION for image_id in validation}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image_id", "role"])
    writer.writerows(sorted(roles.items()))
    write_text(Path(fold_dir) / SPLIT_CSV, buffer.getvalue())


def read_split(fold_dir: Path) -> Split | None:
    """A fold's recorded split; None for a fold trained before splits were recorded.

    Raises:
        nucleiseg.data.reading.DataError: If ``split.csv`` is unreadable, naming it.
    """
    path = Path(fold_dir) / SPLIT_CSV
    if not path.is_file():
        return None
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: unreadable split file ({error})") from error
    if any(row.get("role") not in (TRAINING, VALIDATION) or not row["image_id"] for row in rows):
        raise DataError(
            f"{path}: expected rows of image_id,role with role {TRAINING} or {VALIDATION}"
        )
    return Split(
        frozenset(row["image_id"] for row in rows if row["role"] == TRAINING),
        frozenset(row["image_id"] for row in rows if row["role"] == VALIDATION),
    )


def split_problem(
    run_dir: Path,
    fold_of: Mapping[str, int],
    folds_csv: Path,
    folds: Collection[int] | None = None,
) -> str | None:
    """Whether a folds file disagrees with the splits a run's folds recorded when they trained.

    A fold that trained on an image the folds file holds out in that fold, or
    held out an image the file puts in another fold, would be scored on its
    own training images. Folds trained before splits were recorded are taken
    on trust, with one INFO line.

    Args:
        run_dir: Run folder, or one of its fold folders.
        fold_of: Image id -> fold, from ``folds_csv`` (images it lacks are not compared).
        folds_csv: The folds file, for the message.
        folds: Compare only these folds (None: every fold folder).

    Returns:
        One line naming the first disagreeing fold folder and one of its
        images (or an unreadable ``split.csv``), or None.
    """
    unrecorded = []
    for fold, fold_dir in fold_dirs(run_dir).items():
        if folds is not None and fold not in folds:
            continue
        try:
            split = read_split(fold_dir)
        except DataError as error:
            return str(error)
        if split is None:
            unrecorded.append(fold)
            continue
        trained = sorted(i for i in split.training if fold_of.get(i, -1) == fold)
        held_out = sorted(i for i in split.validation if fold_of.get(i, fold) != fold)
        if trained or held_out:
            if trained:
                what = f"trained on {trained[0]}, which {folds_csv} holds out in fold {fold}"
            else:
                image = held_out[0]
                what = f"held out {image}, which {folds_csv} puts in fold {fold_of[image]}"
            return (
                f"{fold_dir}: fold {fold} {what} ({len(trained) + len(held_out)} images disagree "
                f"with its {SPLIT_CSV}); give the folds file it was trained with"
            )
    if unrecorded:
        log.info(
            "%s: fold(s) %s keep no record of the images they trained on (no %s: trained before "
            "it was written); %s is taken on trust",
            run_dir,
            ", ".join(map(str, unrecorded)),
            SPLIT_CSV,
            folds_csv,
        )
    return None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file; an empty file is an empty mapping.

    Raises:
        nucleiseg.data.reading.DataError: If the file cannot be read or is not a YAML
            mapping, naming it.
    """
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        reason = str(error).replace("\n", " ")
        raise DataError(f"{path}: not a readable YAML file ({reason})") from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise DataError(f"{path}: expected a YAML mapping, got {type(values).__name__}")
    return values


def torch_bytes(state: Any) -> bytes:
    """What ``torch.save`` writes for ``state``, made in memory.

    Saved to a file, torch records the file's name inside the archive; in
    memory it records a fixed one, so equal tensors give equal bytes and a
    checksum tells a reproduced file from a different one.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save_weights(state: Any, path: Path) -> None:
    """Write compact weights (:func:`torch_bytes`), then record their sha256 beside them.

    Args:
        state: The state dict to keep.
        path: ``<fold>/weights_fp16.pt`` (or ``weights_int8.pt``).

    Raises:
        nucleiseg.atomic.WriteError: If a file cannot be written, naming it.
    """
    path = Path(path)
    payload = torch_bytes(state)
    recorded = recorded_checksums(path.parent)
    # The old file's checksum goes first: if the new file is not written, none
    # is recorded for it rather than one that does not match.
    if recorded.pop(path.name, None) is not None:
        _write_checksums(path.parent, recorded)
    write_bytes(path, payload)
    recorded[path.name] = hashlib.sha256(payload).hexdigest()
    _write_checksums(path.parent, recorded)


def write_int8_weights(fold_dir: Path) -> Path:
    """Store a finished fold's float16 weights as int8 too (:mod:`nucleiseg.models.compact`).

    The int8 file is what a run commits (about half the size; int8 was
    measured to cost no accuracy), made from the float16 file exactly as a
    bundle export makes it, so the two agree byte for byte.

    Args:
        fold_dir: A fold folder holding ``weights_fp16.pt``.

    Returns:
        The ``weights_int8.pt`` written (its checksum recorded).

    Raises:
        FileNotFoundError: If the fold has no float16 weights.
    """
    source = Path(fold_dir) / WEIGHTS
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no float16 weights to store as int8")
    trained = torch.load(source, map_location="cpu", weights_only=True)
    target = Path(fold_dir) / WEIGHTS_INT8
    save_weights(compact_state(trained, "int8"), target)
    return target


def _write_checksums(fold_dir: Path, recorded: dict[str, str]) -> None:
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(recorded.items()))
    write_text(fold_dir / WEIGHTS_SHA256, lines)


def recorded_checksums(fold_dir: Path) -> dict[str, str]:
    """File name -> sha256 hex digest, from a fold's ``weights.sha256`` (empty if none).

    Raises:
        nucleiseg.data.reading.DataError: If the file is not in ``sha256sum`` format, naming it.
    """
    path = Path(fold_dir) / WEIGHTS_SHA256
    if not path.is_file():
        return {}
    recorded = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = _CHECKSUM_LINE.match(line)
        if match is None:
            raise DataError(f"{path}: line {number} is not '<sha256>  <file name>'")
        recorded[match.group(2)] = match.group(1)
    return recorded


def weights_problem(path: Path) -> str | None:
    """What is wrong with a weights file, found without loading it.

    A file with a recorded checksum (see :func:`save_weights`) must match it.
    One without, in the zip format torch writes, is checked member by member
    against the CRC-32s the archive holds, which catches a truncated file and
    nearly every flipped byte; a file in torch's older format is left to
    ``torch.load``.

    Args:
        path: A ``.pt`` or ``.ckpt`` file.

    Returns:
        One line naming the file and the problem, or None.
    """
    path = Path(path)
    if not path.is_file():
        return f"{path}: no such weights file"
    if path.stat().st_size == 0:
        return f"{path}: empty weights file (0 bytes)"
    try:
        expected = recorded_checksums(path.parent).get(path.name)
    except DataError as error:
        return str(error)
    try:
        if expected is not None:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
            if digest.hexdigest() != expected:
                return (
                    f"{path}: corrupt: its sha256 differs from the one recorded in "
                    f"{path.parent / WEIGHTS_SHA256} when it was written"
                )
            return None
        with path.open("rb") as handle:
            if handle.read(len(_ZIP_SIGNATURE)) != _ZIP_SIGNATURE:
                return None
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            return f"{path}: corrupt: {bad} fails its CRC check"
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        return f"{path}: corrupt or truncated weights file ({error})"
    return None
