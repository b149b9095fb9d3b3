"""Out-of-fold predictions on disk, so that the CV score is reproducible without a model.

Per fold folder ``<run>/fold<K>/oof/``:

- ``labels/<id>.png``: the final label image, uint16 PNG (0 = background);
  small enough to commit; ``<id>.tif`` (uint32) for an image of more than
  65,535 nuclei (see :mod:`nucleiseg.data.label_files`);
- ``probabilities/<id>.png``: the three probability maps (body, border,
  separation) as the R, G and B channels of a uint8 PNG, 1/255 steps; enough
  to re-run the postprocessing with other thresholds, and regenerated rather
  than committed.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from nucleiseg.atomic import write_bytes, write_png
from nucleiseg.data.label_files import label_files, read_label_file, write_label_image
from nucleiseg.data.reading import DataError, read_raw
from nucleiseg.models.runs import fold_dirs
from nucleiseg.postprocessing.instances import SoftInstances

OOF_DIR = "oof"
LABELS_DIR = "labels"
PROBABILITIES_DIR = "probabilities"
INSTANCES_DIR = "instances"


def save_prediction(
    fold_dir: Path, image_id: str, probabilities: np.ndarray | None, labels: np.ndarray
) -> None:
    """Write one image's out-of-fold label image and, if given, its probability maps.

    Args:
        fold_dir: The fold's run folder.
        image_id: Image id (the file name).
        probabilities: float (3, H, W) in [0, 1], or None.
        labels: int label image, 0 = background.
    """
    write_label_image(fold_dir / OOF_DIR / LABELS_DIR, image_id, labels)
    if probabilities is not None:
        quantized = np.rint(np.clip(probabilities, 0.0, 1.0) * 255).astype(np.uint8)
        # cv2 writes BGR: reverse so that body, border, separation are R, G, B.
        bgr = np.ascontiguousarray(quantized[::-1].transpose(1, 2, 0))
        write_png(fold_dir / OOF_DIR / PROBABILITIES_DIR / f"{image_id}.png", bgr)


def save_instances(fold_dir: Path, image_id: str, instances: SoftInstances) -> None:
    """Write one image's out-of-fold soft instances as a compressed ``.npz``, atomically.

    The masks are quantized to uint8 and stored back to back, each its box's
    size, so the file grows with the nuclei rather than with the image.
    """
    flat = [np.rint(np.clip(m, 0.0, 1.0) * 255).astype(np.uint8).ravel() for m in instances.masks]
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        shape=np.asarray(instances.shape, np.int64),
        scores=instances.scores.astype(np.float32),
        boxes=instances.boxes.astype(np.int64),
        masks=np.concatenate(flat) if flat else np.zeros(0, np.uint8),
    )
    write_bytes(Path(fold_dir) / OOF_DIR / INSTANCES_DIR / f"{image_id}.npz", buffer.getvalue())


def read_instances(path: Path) -> SoftInstances:
    """Soft instances from an out-of-fold ``.npz`` (masks as float32 in [0, 1])."""
    try:
        with np.load(Path(path)) as stored:
            shape, scores = tuple(int(v) for v in stored["shape"]), stored["scores"]
            boxes, flat = stored["boxes"], stored["masks"]
    except (OSError, ValueError, KeyError) as error:
        raise DataError(f"{path}: not an out-of-fold instances file ({error})") from error
    sizes = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    if sizes.sum() != flat.size:
        raise DataError(f"{path}: {flat.size} mask pixels for boxes holding {sizes.sum()}")
    pieces = np.split(flat.astype(np.float32) / 255.0, np.cumsum(sizes)[:-1]) if len(sizes) else []
    masks = tuple(p.reshape(b[2] - b[0], b[3] - b[1]) for p, b in zip(pieces, boxes, strict=True))
    return SoftInstances(shape, scores, boxes, masks)


def load_instances(fold_dir: Path) -> dict[str, SoftInstances]:
    """The out-of-fold soft instances of one fold, by image id.

    Raises:
        DataError: If the fold has none (they are not committed; re-run the
            fold's prediction to regenerate them).
    """
    return _read_folder(
        Path(fold_dir) / OOF_DIR / INSTANCES_DIR, ".npz", read_instances, "instance files"
    )


def read_probabilities(path: Path) -> np.ndarray:
    """float32 (3, H, W) probability maps from an OOF probability PNG."""
    raw = read_raw(Path(path))
    if raw.ndim != 3 or raw.shape[2] != 3:
        raise DataError(f"{path}: expected a 3-channel probability PNG, got shape {raw.shape}")
    return raw[..., ::-1].transpose(2, 0, 1).astype(np.float32) / 255.0


def oof_fold_dirs(run_dir: Path) -> dict[int, Path]:
    """The fold folders of a run that hold out-of-fold label images.

    Raises:
        DataError: If there is none.
    """
    found = {
        fold: path
        for fold, path in fold_dirs(run_dir).items()
        if (path / OOF_DIR / LABELS_DIR).is_dir()
    }
    if not found:
        raise DataError(f"{run_dir}: no fold<K>/{OOF_DIR}/{LABELS_DIR} folders")
    return found


def load_oof_labels(run_dir: Path) -> dict[str, tuple[int, np.ndarray]]:
    """Every out-of-fold label image of a run, with the fold it was held out in.

    Returns:
        Image id -> (fold, int32 label image), sorted by id.

    Raises:
        DataError: If an image was predicted by two folds (folds overlap).
    """
    predictions: dict[str, tuple[int, np.ndarray]] = {}
    for fold, fold_dir in oof_fold_dirs(run_dir).items():
        for image_id, path in label_files(fold_dir / OOF_DIR / LABELS_DIR).items():
            if image_id in predictions:
                raise DataError(
                    f"{path}: {image_id} also predicted by fold {predictions[image_id][0]}"
                )
            predictions[image_id] = (fold, read_label_file(path))
    return dict(sorted(predictions.items()))


def load_probabilities(fold_dir: Path) -> dict[str, np.ndarray]:
    """The out-of-fold probability maps of one fold, by image id.

    Raises:
        DataError: If the fold has none (they are not committed; re-run the
            fold's prediction to regenerate them).
    """
    return _read_folder(
        Path(fold_dir) / OOF_DIR / PROBABILITIES_DIR, ".png", read_probabilities, "probability maps"
    )


def _read_folder(
    folder: Path, suffix: str, reader: Callable[[Path], Any], what: str
) -> dict[str, Any]:
    """Every ``*<suffix>`` file of a folder read by ``reader``, by file stem; none is an error."""
    paths = sorted(folder.glob(f"*{suffix}"))
    if not paths:
        raise DataError(f"{folder}: no {what}")
    return {path.stem: reader(path) for path in paths}
