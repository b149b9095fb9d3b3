"""Time ``average_precision`` against two common ways of computing the DSB 2018 metric.

Run from the repository root:

    python benchmarks/bench_metric.py

The compared methods, all written here and all checked to give the same score:

* ours: ``nucleiseg.competition.metric.average_precision`` (one numba pass, hashed pair counts);
* loop: for each ground-truth object, a full-image mask and the prediction labels
  under it (the per-object loop many notebooks use);
* hist2d: the public Kaggle example kernel, ``np.histogram2d`` over labels made
  consecutive, giving a dense n_true x n_pred intersection matrix.

Three synthetic cases from a fixed seed: random ellipses as ground truth, and as
prediction the same ellipses shifted, grown or shrunk, with about 10% missed and
10% spurious objects. The process is pinned to one core and single-threaded so the
figures compare algorithms, not thread counts. Times are the best of several runs;
peak memory (tracemalloc, which also sees numba's allocations) is for the largest
case. The last line is ``speedup_vs_histogram2d: <ratio>`` for the largest case.
"""

import os

# Before numpy and numba are imported, so that their thread pools start single-threaded.
for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"
os.sched_setaffinity(0, {0})

import math  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
from skimage.draw import ellipse  # noqa: E402

from nucleiseg.competition.metric import THRESHOLDS, average_precision  # noqa: E402

SEED = 2018
# (name, shape, number of nuclei, repeats of ours / loop / hist2d)
CASES = [
    ("520x696, 50 nuclei", (520, 696), 50, (50, 5, 10)),
    ("1024x1024, 300 nuclei", (1024, 1024), 300, (30, 3, 5)),
    ("2000x2000, 2000 nuclei", (2000, 2000), 2000, (20, 1, 3)),
]
MISSED = 0.1
SPURIOUS = 0.1


def random_ellipse(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[float, ...]:
    """Centre, radii and orientation of a nucleus-sized ellipse inside ``shape``."""
    return (
        rng.uniform(0, shape[0]),
        rng.uniform(0, shape[1]),
        rng.uniform(5, 14),
        rng.uniform(5, 14),
        rng.uniform(-np.pi, np.pi),
    )


def paint(image: np.ndarray, params: tuple[float, ...], label: int) -> None:
    """Draw an ellipse with ``label`` on the still-empty pixels, keeping objects disjoint."""
    row, col, r_row, r_col, angle = params
    rr, cc = ellipse(row, col, r_row, r_col, shape=image.shape, rotation=angle)
    free = image[rr, cc] == 0
    image[rr[free], cc[free]] = label


def make_case(
    rng: np.random.Generator, shape: tuple[int, int], n_objects: int
) -> tuple[np.ndarray, np.ndarray]:
    """A ground-truth label image and an imperfect prediction of it, both int32."""
    truth = np.zeros(shape, dtype=np.int32)
    objects = [random_ellipse(rng, shape) for _ in range(n_objects)]
    for label, params in enumerate(objects, start=1):
        paint(truth, params, label)

    predicted = []
    for row, col, r_row, r_col, angle in objects:
        if rng.random() < MISSED:
            continue
        shift_row, shift_col = rng.integers(-3, 4, size=2)
        scale = rng.uniform(0.8, 1.2)  # below 1 erodes, above 1 dilates
        predicted.append((row + shift_row, col + shift_col, r_row * scale, r_col * scale, angle))
    predicted += [random_ellipse(rng, shape) for _ in range(round(SPURIOUS * n_objects))]
    pred = np.zeros(shape, dtype=np.int32)
    # Shuffled labels, so that prediction k is not ground-truth object k.
    for label, params in zip(rng.permutation(len(predicted)) + 1, predicted, strict=True):
        paint(pred, params, label)
    return truth, pred


def competition_score(matches: Callable[[float], tuple[int, int, int]]) -> float:
    """Mean over the thresholds of tp / (tp + fp + fn), given tp, fp, fn per threshold."""
    precisions = []
    for t in np.arange(0.5, 1.0, 0.05):  # the Kaggle kernel's thresholds
        tp, fp, fn = matches(t)
        precisions.append(tp / (tp + fp + fn))
    return float(np.mean(precisions))


def per_object_loop(truth: np.ndarray, pred: np.ndarray) -> float:
    """Score from one full-image mask per ground-truth object."""
    pred_ids, pred_area = np.unique(pred, return_counts=True)
    pred_area = pred_area[pred_ids > 0]
    pred_ids = pred_ids[pred_ids > 0]
    true_ids = np.unique(truth)
    true_ids = true_ids[true_ids > 0]
    rows, cols, ious = [], [], []
    for i, label in enumerate(true_ids):
        mask = truth == label
        hit_ids, inter = np.unique(pred[mask], return_counts=True)
        inter = inter[hit_ids > 0]
        j = np.searchsorted(pred_ids, hit_ids[hit_ids > 0])
        rows.append(np.full(len(j), i))
        cols.append(j)
        ious.append(inter / (mask.sum() + pred_area[j] - inter))
    rows, cols, ious = np.concatenate(rows), np.concatenate(cols), np.concatenate(ious)

    def matches(t: float) -> tuple[int, int, int]:
        per_true = np.bincount(rows[ious > t], minlength=len(true_ids))
        per_pred = np.bincount(cols[ious > t], minlength=len(pred_ids))
        return np.sum(per_true == 1), np.sum(per_pred == 0), np.sum(per_true == 0)

    return competition_score(matches)


def histogram2d_kernel(truth: np.ndarray, pred: np.ndarray) -> float:
    """Score as in the public Kaggle example kernel, after making labels consecutive."""
    # np.unique then searchsorted: several times faster than return_inverse=True.
    true_ids = np.unique(truth)
    pred_ids = np.unique(pred)
    truth_consecutive = np.searchsorted(true_ids, truth)
    pred_consecutive = np.searchsorted(pred_ids, pred)
    n_true, n_pred = len(true_ids), len(pred_ids)
    intersection = np.histogram2d(
        truth_consecutive.ravel(), pred_consecutive.ravel(), bins=(n_true, n_pred)
    )[0]
    area_true = np.histogram(truth_consecutive, bins=n_true)[0][:, np.newaxis]
    area_pred = np.histogram(pred_consecutive, bins=n_pred)[0][np.newaxis, :]
    union = area_true + area_pred - intersection
    # The kernel drops the background row and column (label 0 is present in both).
    intersection = intersection[1:, 1:]
    union = union[1:, 1:]
    union[union == 0] = 1e-9
    iou = intersection / union

    def matches(t: float) -> tuple[int, int, int]:
        hit = iou > t
        return (
            np.sum(np.sum(hit, axis=1) == 1),
            np.sum(np.sum(hit, axis=0) == 0),
            np.sum(np.sum(hit, axis=1) == 0),
        )

    return competition_score(matches)


def ours(truth: np.ndarray, pred: np.ndarray) -> float:
    return average_precision(truth, pred).score


METHODS = {"ours": ours, "loop": per_object_loop, "hist2d": histogram2d_kernel}


def best_time(fn: Callable, truth: np.ndarray, pred: np.ndarray, repeats: int) -> float:
    """Best wall time of ``repeats`` calls, in seconds."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn(truth, pred)
        best = min(best, time.perf_counter() - start)
    return best


def peak_memory(fn: Callable, truth: np.ndarray, pred: np.ndarray) -> int:
    """Peak bytes allocated during one call, beyond what was allocated before it."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    fn(truth, pred)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak - before


def main() -> None:
    rng = np.random.default_rng(SEED)
    cases = [(name, *make_case(rng, shape, n), repeats) for name, shape, n, repeats in CASES]
    # Compile the numba kernel outside the timings.
    average_precision(cases[0][1], cases[0][2])

    print(f"one core (affinity {sorted(os.sched_getaffinity(0))}), numba single-threaded")
    print(f"thresholds {THRESHOLDS[0]:.2f}..{THRESHOLDS[-1]:.2f}; times are best of N, ms/image")
    header = (
        f"{'case':<24}{'n_true':>7}{'n_pred':>7}{'score':>8}"
        f"{'ours':>9}{'loop':>11}{'hist2d':>10}{'loop/ours':>11}{'hist2d/ours':>13}"
    )
    print(header)
    print("-" * len(header))
    for name, truth, pred, repeats in cases:
        result = average_precision(truth, pred)
        for method, fn in METHODS.items():
            score = fn(truth, pred)
            if not math.isclose(score, result.score, rel_tol=0, abs_tol=1e-12):
                raise AssertionError(f"{name}: {method} scores {score}, ours {result.score}")
        ms = {
            method: 1000 * best_time(fn, truth, pred, n)
            for (method, fn), n in zip(METHODS.items(), repeats, strict=True)
        }
        print(
            f"{name:<24}{result.n_true:>7}{result.n_pred:>7}{result.score:>8.4f}"
            f"{ms['ours']:>9.2f}{ms['loop']:>11.1f}{ms['hist2d']:>10.1f}"
            f"{ms['loop'] / ms['ours']:>10.0f}x{ms['hist2d'] / ms['ours']:>12.0f}x"
        )
    print("repeats (ours, loop, hist2d): " + "; ".join(f"{r}" for *_, r in cases))

    name, truth, pred, _ = cases[-1]
    inputs = truth.nbytes + pred.nbytes
    print(f"\npeak memory on {name} (tracemalloc, inputs of {inputs / 2**20:.1f} MiB not counted):")
    for method, fn in METHODS.items():
        print(f"  {method:<7}{peak_memory(fn, truth, pred) / 2**20:>9.2f} MiB")

    print(f"speedup_vs_histogram2d: {ms['hist2d'] / ms['ours']:.1f}")


if __name__ == "__main__":
    main()
