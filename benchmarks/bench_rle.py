"""Time ``rle.encode_labels`` against a per-object run-length encoder on one CPU core.

Run from the repository root::

    .venv/bin/python benchmarks/bench_rle.py

The cases are the ground-truth label images of ``bench_metric.py`` (random
ellipses from a fixed seed): 520x696 with 50 nuclei, 1024x1024 with 300 and
2000x2000 with 2000. Both encoders must give identical strings before they are
timed. The last line is ``speedup_vs_per_object: <ratio>`` for the 1024x1024 case.
"""

import os

# Pin before numpy and numba load so their thread pools see one core.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_name] = "1"
os.sched_setaffinity(0, {0})

import time  # noqa: E402

import numpy as np  # noqa: E402

# The metric benchmark's cases, so both benchmarks time the same label images.
from bench_metric import CASES, SEED, make_case  # noqa: E402
from references import per_object_encode  # noqa: E402

from nucleiseg.competition import rle  # noqa: E402


def best_ms(fn, labels: np.ndarray, budget_s: float = 0.5) -> float:
    """Best of repeated calls within ``budget_s`` seconds (at least three calls), in ms."""
    times = []
    stop = time.perf_counter() + budget_s
    while len(times) < 3 or time.perf_counter() < stop:
        start = time.perf_counter()
        fn(labels)
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main() -> None:
    rng = np.random.default_rng(SEED)
    rle.encode_labels(np.eye(3, dtype=np.int32))  # compile outside the timings
    speedup = {}
    for name, shape, n_nuclei, _ in CASES:
        labels, _ = make_case(rng, shape, n_nuclei)
        # The per-object encoder takes seconds on the larger cases, so its one
        # call serves both as the reference output and as its timing.
        start = time.perf_counter()
        expected = per_object_encode(labels)
        slow = 1e3 * (time.perf_counter() - start)
        if rle.encode_labels(labels) != expected:
            raise AssertionError(f"{name}: encode_labels differs from the per-object encoder")
        fast = best_ms(rle.encode_labels, labels)
        speedup[shape] = slow / fast
        print(
            f"{name}: encode_labels {fast:.2f} ms, per-object {slow:.1f} ms, "
            f"ratio {slow / fast:.0f}x"
        )
    print(f"speedup_vs_per_object: {speedup[(1024, 1024)]:.1f}")


if __name__ == "__main__":
    main()
