"""Cross-validation folds that keep every view of one scene in one fold.

Many DSB 2018 training images are not independent: a larger field of view was
cut into tiles (neighbouring tiles share nuclei cut by the seam), a few fields
were imaged twice with an overlap, and a few images are near-duplicates (the
same field at another time point, size or contrast). If such images land in
different folds, validation scores leak. So same-scene pairs are found from the
pixels, joined into groups (connected components), and whole groups are dealt
to folds with :class:`sklearn.model_selection.StratifiedGroupKFold`, stratified
by imaging modality.

A pair is only ever looked for between images of the same modality, and each
test asks for real structure (nuclei), because flat background matches
anything:

- **adjacent tiles**: the last row (column) of one image continues into the
  first row (column) of another of the same width (height). Across the seam the
  step must be no larger than between neighbouring rows inside each image, both
  over the whole edge and on the nuclei crossing it; the fine structure of the
  two rows must correlate; at least :data:`MIN_SEAM_STRUCTURE` edge pixels must
  belong to nuclei; and the two tiles must be each other's best match.
- **overlapping views**: phase correlation of quarter-size images proposes a
  shift; the overlap, refined at full size with template matching, must
  correlate at :data:`MIN_OVERLAP_CORRELATION` or more, cover
  :data:`MIN_OVERLAP_FRACTION` of the smaller image and hold at least
  :data:`MIN_OVERLAP_OBJECTS` objects in each image (a patch holding one
  nucleus correlates well with almost any other nucleus).
- **near-duplicates at any size**: 32x32 thumbnails of images with the same
  aspect ratio correlate at :data:`MIN_THUMBNAIL_CORRELATION` or more.

The thresholds were tuned on the 664 stage-1 training images; the comments at
the constants give the numbers they were set from.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pandas as pd
from scipy.fft import irfft2, next_fast_len, rfft2
from scipy.ndimage import gaussian_filter1d
from sklearn.model_selection import StratifiedGroupKFold
from tqdm import tqdm

from nucleiseg.atomic import write_text
from nucleiseg.cli import DEFAULT_FOLDS_PATH
from nucleiseg.data.modality import MODALITIES, classify_modality
from nucleiseg.data.reading import DataError, find_images, labelled_root, read_image

logger = logging.getLogger(__name__)

FOLD_COLUMNS = ("image_id", "fold", "modality", "group")

ADJACENT = "adjacent"
OVERLAP = "overlap"
DUPLICATE = "duplicate"

# Structure: a pixel belongs to a nucleus (or other object) when it is this far
# from the background, in grey levels: NOISE_SIGMAS noise deviations, at least
# MIN_CONTRAST. In every training image the median nucleus is 12 or more grey
# levels off the background.
NOISE_SIGMAS = 6.0
MIN_CONTRAST = 10.0

# Adjacent tiles. Over accepted seams the step is about the in-image row step
# (ratio 1.0, 95% under 1.3); over the 233,000 other pairs of training-image
# edges with nuclei on them it is 12 times that (median), over 3 times in 99%.
MIN_SEAM_STRUCTURE = 16
MAX_SEAM_STEP = 1.5
MIN_SEAM_CORRELATION = 0.7
_MIN_STEP = 0.5  # grey levels; a smaller step is quantisation, not structure
_BAND_PASS_SIGMAS = (1.0, 8.0)  # keeps nucleus-sized detail, drops pixel noise and shading

# Overlapping views. True overlaps hold hundreds of objects; chance matches of
# sparse fluorescence images hold at most six.
MIN_OVERLAP_CORRELATION = 0.9
MIN_OVERLAP_FRACTION = 0.1
MIN_OVERLAP_OBJECTS = 8
MIN_OBJECT_AREA = 10
_QUARTER = 4
_MIN_QUARTER_CORRELATION = 0.8  # cheap screen before the full-size check

# Near-duplicates. Unrelated training images reach 0.63 at most; the duplicate
# pair 0.98.
MIN_THUMBNAIL_CORRELATION = 0.9
MAX_ASPECT_DIFFERENCE = 0.05
MIN_THUMBNAIL_STD = 2.0
_THUMBNAIL_SIZE = 32


class ScenePair(NamedTuple):
    """Two images found to show the same scene."""

    first: str
    second: str
    kind: str  # ADJACENT (second below or right of first), OVERLAP or DUPLICATE
    score: float


class _Edge(NamedTuple):
    outer: np.ndarray  # the image's outermost row or column
    inner: np.ndarray  # the one next to it
    structure: np.ndarray  # bool, outer pixels off the background (nuclei)
    detail: np.ndarray  # band-passed outer row, zero mean and unit norm


class _View(NamedTuple):
    grey: np.ndarray  # float32 (H, W)
    threshold: float  # grey-level distance from the background that counts as structure
    objects: int  # structure components of at least MIN_OBJECT_AREA pixels
    quarter: np.ndarray  # quarter-size grey, zero mean


def _grey(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {image.shape}")
    return image.astype(np.float32).mean(axis=2)


def _structure_threshold(grey: np.ndarray) -> float:
    # Robust noise from horizontal neighbour differences: nuclei edges are too
    # few to move the median.
    steps = np.abs(np.diff(grey, axis=1))
    sigma = 1.4826 * float(np.median(steps)) / np.sqrt(2.0)
    return max(NOISE_SIGMAS * sigma, MIN_CONTRAST)


def _count_objects(grey: np.ndarray, threshold: float) -> int:
    mask = (np.abs(grey - np.median(grey)) > threshold).astype(np.uint8)
    _, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    return int((stats[1:, cv2.CC_STAT_AREA] >= MIN_OBJECT_AREA).sum())


def _view(image: np.ndarray) -> _View:
    grey = _grey(image)
    threshold = _structure_threshold(grey)
    h, w = grey.shape
    quarter = cv2.resize(
        grey, (max(w // _QUARTER, 1), max(h // _QUARTER, 1)), interpolation=cv2.INTER_AREA
    )
    return _View(grey, threshold, _count_objects(grey, threshold), quarter - quarter.mean())


def _edge(outer: np.ndarray, inner: np.ndarray, threshold: float) -> _Edge:
    structure = np.abs(outer - np.median(outer)) > threshold
    fine, coarse = (gaussian_filter1d(outer, s, mode="nearest") for s in _BAND_PASS_SIGMAS)
    detail = fine - coarse
    detail = detail - detail.mean()
    detail /= max(float(np.linalg.norm(detail)), 1e-6)
    return _Edge(outer, inner, structure, detail)


def _edges(view: _View, axis: str) -> tuple[_Edge, _Edge]:
    """(far edge, near edge): bottom and top rows for "v", right and left columns for "h"."""
    g = view.grey if axis == "v" else view.grey.T
    return _edge(g[-1], g[-2], view.threshold), _edge(g[0], g[1], view.threshold)


def _stack(edges: list[_Edge], field: str) -> np.ndarray:
    return np.stack([getattr(e, field) for e in edges])


def _adjacent_in_bucket(
    ids: list[str], views: Mapping[str, _View], axis: str, chunk: int = 32
) -> list[ScenePair]:
    """Adjacent pairs among images whose edges along ``axis`` have one length."""
    far, near = zip(*(_edges(views[k], axis) for k in ids), strict=True)
    a1, a2, on_a, detail_a = (_stack(list(far), f) for f in _Edge._fields)
    b0, b1, on_b, detail_b = (_stack(list(near), f) for f in _Edge._fields)
    own_a, own_b = np.abs(a1 - a2), np.abs(b0 - b1)
    n = len(ids)
    step = np.full((n, n), np.inf)  # step ratio over the nuclei of accepted seams
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        # The step over the seam against the step between each image's two outer rows.
        cross = np.abs(a1[rows, None] - b0[None])
        own = (own_a[rows, None] + own_b[None]) / 2
        on_nuclei = on_a[rows, None] | on_b[None]
        n_nuclei = on_nuclei.sum(-1)
        nuclei_step = (cross * on_nuclei).sum(-1) / np.maximum(
            (own * on_nuclei).sum(-1), _MIN_STEP * np.maximum(n_nuclei, 1)
        )
        edge_step = cross.mean(-1) / np.maximum(own.mean(-1), _MIN_STEP)
        accepted = (
            (n_nuclei >= MIN_SEAM_STRUCTURE)
            & (nuclei_step <= MAX_SEAM_STEP)
            & (edge_step <= MAX_SEAM_STEP)
            & (detail_a[rows] @ detail_b.T >= MIN_SEAM_CORRELATION)
        )
        step[rows] = np.where(accepted, nuclei_step, np.inf)
    np.fill_diagonal(step, np.inf)
    # An edge continues into at most one other edge: keep mutual best matches only.
    best_below, best_above = step.argmin(axis=1), step.argmin(axis=0)
    return [
        ScenePair(ids[i], ids[j], ADJACENT, float(step[i, j]))
        for i, j in enumerate(best_below)
        if np.isfinite(step[i, j]) and best_above[j] == i
    ]


def _adjacent_pairs(views: Mapping[str, _View], modalities: Mapping[str, str]) -> list[ScenePair]:
    pairs = []
    for axis, length_dim in (("v", 1), ("h", 0)):
        buckets = defaultdict(list)
        for k, v in views.items():
            buckets[modalities[k], v.grey.shape[length_dim]].append(k)
        for ids in buckets.values():
            if len(ids) > 1:
                pairs += _adjacent_in_bucket(ids, views, axis)
    return pairs


def _overlap_slices(
    shape_a: tuple[int, int], shape_b: tuple[int, int], shift: tuple[int, int]
) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Slices of a and b that coincide when a[y + dy, x + dx] lies on b[y, x]."""
    sa, sb = [], []
    for size_a, size_b, d in zip(shape_a, shape_b, shift, strict=True):
        lo, hi = max(0, -d), min(size_b, size_a - d)
        if hi <= lo:
            return None
        sa.append(slice(lo + d, hi + d))
        sb.append(slice(lo, hi))
    return tuple(sa), tuple(sb)


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    norm = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum()) / norm if norm > 0 else 0.0


def _verify_overlap(a: _View, b: _View, quarter_shift: tuple[int, int]) -> float | None:
    """Full-size overlap correlation for a shift proposed at quarter size, or None if rejected."""
    m = _QUARTER
    shift = (quarter_shift[0] * m, quarter_shift[1] * m)
    slices = _overlap_slices(a.grey.shape, b.grey.shape, shift)
    if slices is None:
        return None
    pa, pb = a.grey[slices[0]], b.grey[slices[1]]
    if min(pa.shape) <= 4 * m:  # too thin to refine, and far below MIN_OVERLAP_FRACTION
        return None
    # The quarter-size shift is off by up to m pixels: slide the overlap's
    # interior from a over the overlap in b to find the exact shift.
    scores = cv2.matchTemplate(pb, pa[m:-m, m:-m], cv2.TM_CCOEFF_NORMED)
    _, score, _, (rx, ry) = cv2.minMaxLoc(scores)
    shift = (shift[0] + m - ry, shift[1] + m - rx)
    slices = _overlap_slices(a.grey.shape, b.grey.shape, shift)
    pa, pb = a.grey[slices[0]], b.grey[slices[1]]
    smaller = min(a.grey.size, b.grey.size)
    if (
        score < MIN_OVERLAP_CORRELATION
        or pa.size < MIN_OVERLAP_FRACTION * smaller
        or _count_objects(pa, a.threshold) < MIN_OVERLAP_OBJECTS
        or _count_objects(pb, b.threshold) < MIN_OVERLAP_OBJECTS
    ):
        return None
    return float(score)


def _whitened_spectrum(quarters: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    spectrum = rfft2(quarters, s=shape, axes=(-2, -1))
    return spectrum / (np.abs(spectrum) + 1e-3)


def _overlap_pairs(views: Mapping[str, _View], modalities: Mapping[str, str]) -> list[ScenePair]:
    # An image with fewer objects than an accepted overlap needs cannot have one.
    by_shape = defaultdict(list)
    for k, v in views.items():
        if v.objects >= MIN_OVERLAP_OBJECTS:
            by_shape[modalities[k], v.quarter.shape].append(k)
    buckets = [
        (s, t)
        for s, t in itertools.combinations_with_replacement(sorted(by_shape), 2)
        if s[0] == t[0]
    ]
    pairs = []
    for s, t in tqdm(buckets, desc="overlap search", unit="size pair"):
        first, second = by_shape[s], by_shape[t]
        (ha, wa), (hb, wb) = s[1], t[1]
        # Padding to the sum of the sizes makes the correlation linear, not circular.
        canvas = (next_fast_len(ha + hb), next_fast_len(wa + wb))
        spectra_a = _whitened_spectrum(np.stack([views[k].quarter for k in first]), canvas)
        spectra_b = _whitened_spectrum(np.stack([views[k].quarter for k in second]), canvas)
        for i, a in enumerate(first):
            js = range(i + 1, len(second)) if s == t else range(len(second))
            if not js:
                continue
            surfaces = irfft2(spectra_a[i] * spectra_b[js[0] :].conj(), s=canvas, axes=(-2, -1))
            peaks = surfaces.reshape(len(js), -1).argmax(axis=1)
            for j, peak in zip(js, peaks, strict=True):
                dy, dx = divmod(int(peak), canvas[1])
                # The peak at (dy, dx) means a[y + dy, x + dx] lies on b[y, x].
                shift = (dy - canvas[0] if dy >= ha else dy, dx - canvas[1] if dx >= wa else dx)
                b = second[j]
                slices = _overlap_slices((ha, wa), (hb, wb), shift)
                if (
                    slices is None
                    or _correlation(views[a].quarter[slices[0]], views[b].quarter[slices[1]])
                    < _MIN_QUARTER_CORRELATION
                ):
                    continue
                score = _verify_overlap(views[a], views[b], shift)
                if score is not None:
                    pairs.append(ScenePair(*sorted((a, b)), OVERLAP, score))
    return pairs


def _thumbnail(grey: np.ndarray) -> tuple[np.ndarray, float]:
    small = cv2.resize(grey, (_THUMBNAIL_SIZE, _THUMBNAIL_SIZE), interpolation=cv2.INTER_AREA)
    small = small.ravel() - small.mean()
    std = float(small.std())
    return small / max(float(np.linalg.norm(small)), 1e-6), std


def _duplicate_pairs(views: Mapping[str, _View], modalities: Mapping[str, str]) -> list[ScenePair]:
    pairs = []
    for modality in sorted(set(modalities.values())):
        ids = [k for k in views if modalities[k] == modality]
        thumbs, stds = zip(*(_thumbnail(views[k].grey) for k in ids), strict=True)
        aspect = np.log([views[k].grey.shape[1] / views[k].grey.shape[0] for k in ids])
        similar = np.stack(thumbs) @ np.stack(thumbs).T
        textured = np.array(stds) >= MIN_THUMBNAIL_STD
        accepted = (
            (similar >= MIN_THUMBNAIL_CORRELATION)
            & (np.abs(aspect[:, None] - aspect[None]) <= MAX_ASPECT_DIFFERENCE)
            & textured[:, None]
            & textured[None]
        )
        pairs += [
            ScenePair(ids[i], ids[j], DUPLICATE, float(similar[i, j]))
            for i, j in zip(*np.nonzero(np.triu(accepted, k=1)), strict=True)
        ]
    return pairs


def find_scene_pairs(
    images: Mapping[str, np.ndarray], modalities: Mapping[str, str] | None = None
) -> list[ScenePair]:
    """Find pairs of images that show the same scene (see the module docstring).

    Args:
        images: Image id -> RGB uint8 image of shape (H, W, 3).
        modalities: Image id -> modality; classified from the pixels when not given.

    Returns:
        The pairs, each with ``first`` < ``second`` except for adjacent tiles
        (``second`` lies below or right of ``first``), sorted.
    """
    ids = sorted(images)
    if modalities is None:
        modalities = {k: classify_modality(images[k]) for k in ids}
    views = {k: _view(images[k]) for k in tqdm(ids, desc="preparing", unit="image")}
    pairs = (
        _adjacent_pairs(views, modalities)
        + _overlap_pairs(views, modalities)
        + _duplicate_pairs(views, modalities)
    )
    counts = Counter(p.kind for p in pairs)
    logger.info(
        "same-scene pairs: %d adjacent, %d overlapping, %d near-duplicate",
        counts[ADJACENT],
        counts[OVERLAP],
        counts[DUPLICATE],
    )
    return sorted(pairs)


def connected_groups(ids: Iterable[str], pairs: Iterable[tuple[str, str]]) -> dict[str, int]:
    """Number the connected components of a graph of images.

    Args:
        ids: All image ids (an image in no pair is a group of its own).
        pairs: Edges as (id, id).

    Returns:
        Image id -> group number, sorted by id; groups are numbered 0, 1, ...
        in the order of their smallest image id.
    """
    parent = {k: k for k in sorted(ids)}

    def root(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]  # path halving keeps the trees flat
            k = parent[k]
        return k

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    numbers: dict[str, int] = {}
    return {k: numbers.setdefault(root(k), len(numbers)) for k in parent}


def find_groups(
    images: Mapping[str, np.ndarray], modalities: Mapping[str, str] | None = None
) -> dict[str, int]:
    """Group images that show the same scene.

    Args:
        images: Image id -> RGB uint8 image of shape (H, W, 3).
        modalities: Image id -> modality; classified from the pixels when not given.

    Returns:
        Image id -> group number, sorted by id; groups are numbered 0, 1, ...
        in the order of their smallest image id.
    """
    pairs = find_scene_pairs(images, modalities)
    groups = connected_groups(images, ((p.first, p.second) for p in pairs))
    sizes = Counter(Counter(groups.values()).values())
    logger.info(
        "%d groups; group sizes (size: count): %s",
        len(set(groups.values())),
        ", ".join(f"{size}: {count}" for size, count in sorted(sizes.items())),
    )
    return groups


def assign_folds(
    image_ids: Iterable[str],
    modalities: Mapping[str, str],
    groups: Mapping[str, int],
    n_folds: int = 5,
    seed: int = 0,
) -> pd.DataFrame:
    """Deal whole groups to folds, stratified by modality.

    A modality with fewer groups than folds cannot be in every fold; that is
    logged as a warning rather than refused, so that small datasets (such as
    the bundled sample) still get folds. Every group still lands in exactly one
    fold.

    Args:
        image_ids: The images to assign.
        modalities: Image id -> modality.
        groups: Image id -> group number (see :func:`find_groups`).
        n_folds: Number of folds K.
        seed: Seed of the shuffle; the same seed gives the same folds.

    Returns:
        Frame with columns :data:`FOLD_COLUMNS`, one row per image, sorted by
        image id; ``fold`` is in 0..K-1.

    Raises:
        ValueError: If K < 2 or there are fewer groups than folds.
    """
    ids = sorted(image_ids)
    if n_folds < 2:
        raise ValueError(f"need at least 2 folds, got {n_folds}")
    y = np.array([modalities[k] for k in ids])
    g = np.array([groups[k] for k in ids])
    n_groups = len(set(g.tolist()))
    if n_groups < n_folds:
        raise ValueError(f"{n_groups} groups of images cannot fill {n_folds} folds")
    for modality in sorted(set(y.tolist())):
        modality_groups = len(set(g[y == modality].tolist()))
        if modality_groups < n_folds:
            logger.warning(
                "%s: %d group(s) for %d folds; %d fold(s) will have no %s image",
                modality,
                modality_groups,
                n_folds,
                n_folds - modality_groups,
                modality,
            )
    folds = np.zeros(len(ids), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Already reported above, by modality name.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(ids)), y, g)):
            folds[held_out] = fold
    return pd.DataFrame({"image_id": ids, "fold": folds, "modality": y, "group": g})


def _check_folds(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    missing = [c for c in FOLD_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(missing)}")
    frame = frame.loc[:, list(FOLD_COLUMNS)]
    if frame.empty:
        raise DataError(f"{source}: no rows")
    ids = frame["image_id"]
    if ids.isna().any() or (ids.astype(str) == "").any():
        raise DataError(f"{source}: image ids must be present and unique (one is empty)")
    ids = ids.astype(str)
    repeated = sorted(set(ids[ids.duplicated()]))
    if repeated:
        others = f" ({len(repeated)} ids repeat)" if len(repeated) > 1 else ""
        raise DataError(
            f"{source}: image ids must be present and unique; {repeated[0]} is in "
            f"{int((ids == repeated[0]).sum())} rows{others}"
        )
    for column in ("fold", "group"):
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.isna().any() or (values != values.round()).any() or (values < 0).any():
            raise DataError(f"{source}: {column} must be a whole number >= 0")
        frame[column] = values.astype(np.int64)
    n_folds = int(frame["fold"].max()) + 1
    empty = sorted(set(range(n_folds)) - set(frame["fold"]))
    if n_folds < 2 or empty:
        raise DataError(
            f"{source}: folds must be numbered 0..K-1 with K >= 2 and none empty "
            f"(found {sorted(set(frame['fold']))})"
        )
    unknown = sorted(set(frame["modality"]) - set(MODALITIES))
    if unknown:
        raise DataError(f"{source}: unknown modality {', '.join(map(str, unknown))}")
    split = frame.groupby("group")["fold"].nunique()
    if (split > 1).any():
        raise DataError(
            f"{source}: group(s) {', '.join(map(str, split.index[split > 1][:5]))} "
            "span more than one fold"
        )
    return frame.sort_values("image_id", ignore_index=True)


def read_folds(path: str | Path = DEFAULT_FOLDS_PATH) -> pd.DataFrame:
    """Read and check a folds file.

    Args:
        path: CSV with columns :data:`FOLD_COLUMNS`.

    Returns:
        The folds, sorted by image id; ``fold`` and ``group`` as int64.

    Raises:
        DataError: If the file is missing or unreadable, a column is missing,
            an image id is repeated, folds are not numbered 0..K-1 (K >= 2)
            with none empty, a modality is unknown, or a group spans folds.
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype={"image_id": str, "modality": str}, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DataError(f"{path}: unreadable folds file ({error})") from error
    return _check_folds(frame, str(path))


def fold_assignment(path: str | Path, image_ids: Iterable[str]) -> pd.DataFrame:
    """The folds of some images, from a folds file.

    A subset of the training set (such as the bundled sample) takes its folds
    from the file made for the full set, so that it keeps its groups whole.

    Args:
        path: Folds CSV (see :func:`read_folds`).
        image_ids: The images that need a fold.

    Returns:
        The file's rows for these images, sorted by image id.

    Raises:
        DataError: If the file is invalid or an image has no row in it.
    """
    folds = read_folds(path)
    wanted = set(image_ids)
    missing = sorted(wanted - set(folds["image_id"]))
    if missing:
        raise DataError(
            f"{path}: no fold for {len(missing)} image(s), e.g. {', '.join(missing[:3])}"
        )
    return folds[folds["image_id"].isin(wanted)].reset_index(drop=True)


def parse_fold_list(spec: str, available: Iterable[int]) -> list[int]:
    """Folds named on a command line: a number, a comma-separated list, or ``all``.

    Args:
        spec: For example ``"0"``, ``"0,2"`` or ``"all"``.
        available: The folds there are.

    Returns:
        The folds asked for, sorted, each once.

    Raises:
        ValueError: If ``spec`` cannot be read or names a fold that is not available.
    """
    available = sorted({int(f) for f in available})
    if spec.strip().lower() == "all":
        return available
    try:
        folds = sorted({int(part) for part in spec.split(",")})
    except ValueError as error:
        raise ValueError(f"cannot read fold list {spec!r}; expected e.g. 0, 0,2 or all") from error
    unknown = [f for f in folds if f not in available]
    if unknown:
        raise ValueError(f"fold(s) {unknown} not among the available folds {available}")
    return folds


def write_folds(frame: pd.DataFrame, path: str | Path) -> None:
    """Check folds and write them atomically as CSV (same frame, same bytes).

    Args:
        frame: Folds as returned by :func:`assign_folds`.
        path: Destination CSV.
    """
    frame = _check_folds(frame, "folds to write")
    write_text(path, frame.to_csv(index=False, lineterminator="\n"))


def make_folds(data_root: str | Path, n_folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """Folds for the training images of a dataset.

    Args:
        data_root: Dataset root holding ``stage1_train/<id>/images/<id>.png``.
        n_folds: Number of folds K.
        seed: Seed of the fold assignment.

    Returns:
        The folds, as :func:`assign_folds` returns them.
    """
    paths = find_images(labelled_root(data_root))
    images = {k: read_image(p) for k, p in tqdm(paths.items(), desc="reading", unit="image")}
    modalities = {k: classify_modality(image) for k, image in images.items()}
    groups = find_groups(images, modalities)
    return assign_folds(images, modalities, groups, n_folds=n_folds, seed=seed)


def fold_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Images per fold (rows) and modality (columns), with totals.

    Args:
        frame: Folds with columns :data:`FOLD_COLUMNS`.

    Returns:
        Count table with an ``all`` row and column.
    """
    return pd.crosstab(frame["fold"], frame["modality"], margins=True, margins_name="all")
