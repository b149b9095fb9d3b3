"""Run-length encoding of masks in the 2018 Data Science Bowl format.

A mask is written as ``"start length start length ..."``: 1-indexed pixel
positions in column-major order (down the first column, then down the next:
pixel ``(y, x)`` of an ``H x W`` image is number ``x * H + y + 1``), with
ascending starts. A run that reaches the bottom of one column and goes on at
the top of the next is a single run.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from numba import njit

# Starts and lengths this large cannot come from any image, and bounding them
# keeps ``start + length`` from overflowing int64.
_MAX_VALUE = 2**62
_TOKEN = re.compile(r"[+-]?[0-9]+")
# numpy's string-to-int conversion also takes "1_000" and non-ASCII digits,
# which the format does not; tokens with other characters take the slow path.
_PLAIN = re.compile(r"[0-9+\-]*")


class RLEError(ValueError):
    """A run-length string that is not a valid encoding, with the reason."""


class DecodedLabels(NamedTuple):
    """Label image decoded from the run-length strings of one image's objects.

    Attributes:
        labels: int32 label image; object ``i`` of the input has label ``i + 1``.
        overlap_pixels: Number of pixels claimed by more than one object (each
            went to the first object claiming it).
    """

    labels: np.ndarray
    overlap_pixels: int


def encode(mask: np.ndarray) -> str:
    """Run-length encode one binary mask.

    Args:
        mask: 2-D array; nonzero pixels belong to the mask.

    Returns:
        The run-length string; empty for an empty mask.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    encoded = encode_labels((mask != 0).view(np.uint8))
    return encoded[0][1] if encoded else ""


def encode_labels(labels: np.ndarray) -> list[tuple[int, str]]:
    """Run-length encode every object of a label image in one pass over its pixels.

    Args:
        labels: 2-D array of a non-negative integer dtype; 0 is background and
            labels need not be consecutive.

    Returns:
        ``(label, run-length string)`` for each label present, ascending by label.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.size == 0:
        return []
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    run_label, run_start, run_length = _label_runs(labels)
    if run_label.size == 0:
        return []
    # A stable sort keeps each object's runs in pixel order, so starts stay ascending.
    order = np.argsort(run_label, kind="stable")
    run_label = run_label[order]
    group_ends = np.append(np.flatnonzero(np.diff(run_label)) + 1, run_label.size)
    buffer, text_ends = _format_runs(run_start[order], run_length[order], group_ends)
    text = buffer.tobytes().decode("ascii")
    text_starts = np.concatenate(([0], text_ends[:-1]))
    return [
        (label, text[begin:end])
        for label, begin, end in zip(
            run_label[group_ends - 1].tolist(),
            text_starts.tolist(),
            text_ends.tolist(),
            strict=True,
        )
    ]


def parse(rle: str, shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Starts and lengths of a run-length string, checked.

    Args:
        rle: The run-length string; an empty (or all-whitespace) string is an
            empty mask.
        shape: ``(H, W)`` of the image; if given, runs must lie inside it.

    Returns:
        ``(starts, lengths)``, int64 arrays; starts are 1-indexed.

    Raises:
        RLEError: On a non-integer token, an odd number of tokens, a start or
            length below 1, starts not ascending or runs overlapping, or (with
            ``shape``) a run past the last pixel.
    """
    if not isinstance(rle, str):
        raise RLEError(f"run-length encoding must be a string, got {type(rle).__name__}")
    tokens = rle.split()
    dims = None if shape is None else _check_shape(shape)
    if not tokens:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    values = _to_ints(tokens)
    if values.size % 2:
        raise RLEError(f"odd number of tokens ({values.size}); expected start/length pairs")
    starts, lengths = values[0::2], values[1::2]
    _check_each(starts < 1, starts, "start {} is < 1")
    _check_each(lengths < 1, lengths, "length {} is < 1")
    _check_each(starts > _MAX_VALUE, starts, "start {} is too large")
    _check_each(lengths > _MAX_VALUE, lengths, "length {} is too large")
    ends = starts + lengths
    bad = np.flatnonzero(starts[1:] < ends[:-1])
    if bad.size:
        k = bad[0]
        if starts[k + 1] <= starts[k]:
            raise RLEError(
                f"starts not ascending: run {k + 2} starts at {starts[k + 1]}, "
                f"run {k + 1} at {starts[k]}"
            )
        raise RLEError(
            f"runs overlap: run {k + 2} starts at {starts[k + 1]} "
            f"but run {k + 1} ends at {ends[k] - 1}"
        )
    if dims is not None and ends[-1] - 1 > dims[0] * dims[1]:
        h, w = dims
        raise RLEError(
            f"run {starts.size} ends at pixel {ends[-1] - 1}, "
            f"past the last pixel of a {h}x{w} image ({h * w})"
        )
    return starts, lengths


def decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Binary mask of a run-length string.

    Args:
        rle: The run-length string.
        shape: ``(H, W)`` of the image.

    Returns:
        Boolean mask of shape ``shape``.

    Raises:
        RLEError: If the string is not a valid encoding for this shape.
    """
    return decode_labels([rle], shape).labels.astype(bool)


def decode_labels(rles: Sequence[str], shape: tuple[int, int]) -> DecodedLabels:
    """Label image of one image's objects.

    Args:
        rles: One run-length string per object; object ``i`` gets label ``i + 1``
            (an empty string leaves its label unused).
        shape: ``(H, W)`` of the image.

    Returns:
        The label image and the number of pixels claimed twice; such a pixel
        goes to the first object claiming it, so the result does not depend on
        anything but the order of ``rles``.

    Raises:
        RLEError: If a string is not a valid encoding for this shape (the
            message names the object).
    """
    h, w = _check_shape(shape)
    if isinstance(rles, str):
        raise TypeError("rles must be a sequence of strings, not one string")
    if len(rles) >= np.iinfo(np.int32).max:
        raise ValueError(f"too many objects for int32 labels: {len(rles)}")
    starts, lengths, counts = [], [], []
    for i, rle in enumerate(rles):
        try:
            s, n = parse(rle, (h, w))
        except RLEError as error:
            raise RLEError(f"object {i + 1}: {error}") from error
        starts.append(s)
        lengths.append(n)
        counts.append(s.size)
    object_ends = np.cumsum(np.asarray(counts, dtype=np.int64))
    labels, overlap = _paint(
        np.concatenate(starts or [np.zeros(0, np.int64)]),
        np.concatenate(lengths or [np.zeros(0, np.int64)]),
        object_ends,
        h,
        w,
    )
    return DecodedLabels(labels, int(overlap))


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    try:
        h, w = (operator.index(n) for n in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be two integers (H, W), got {shape!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"shape must be positive, got {shape!r}")
    return h, w


def _to_ints(tokens: list[str]) -> np.ndarray:
    if _PLAIN.fullmatch("".join(tokens)):
        try:
            return np.array(tokens, dtype=np.int64)
        except OverflowError:
            raise RLEError("token out of range") from None
        except ValueError:
            pass  # a misplaced sign, as in "1-2"; named below
    position, token = next((i, t) for i, t in enumerate(tokens) if not _TOKEN.fullmatch(t))
    raise RLEError(f"non-integer token {token!r} at position {position + 1}")


def _check_each(bad: np.ndarray, values: np.ndarray, message: str) -> None:
    """Raise for the first run flagged in ``bad``, naming it (1-based) and its value."""
    if bad.any():
        k = int(np.argmax(bad))
        raise RLEError(f"run {k + 1}: " + message.format(values[k]))


@njit(cache=True)
def _label_runs(labels):
    """Runs of every nonzero label, in column-major pixel order (starts 1-indexed)."""
    h, w = labels.shape
    run_label = np.empty(1024, labels.dtype)
    run_start = np.empty(1024, np.int64)
    run_length = np.empty(1024, np.int64)
    n = 0
    current = labels[0, 0]
    start = 0
    position = 0
    for x in range(w):
        # A column closes at most h runs, plus one for the final run. Growing
        # here rather than in the pixel loop matters: reassigning the arrays
        # there makes the loop about 20 times slower.
        if n + h + 1 > run_label.size:
            capacity = 2 * (n + h + 1)
            run_label = _grown(run_label, capacity)
            run_start = _grown(run_start, capacity)
            run_length = _grown(run_length, capacity)
        for y in range(h):
            value = labels[y, x]
            if value != current:
                if current != 0:
                    run_label[n] = current
                    run_start[n] = start + 1
                    run_length[n] = position - start
                    n += 1
                current = value
                start = position
            position += 1
    if current != 0:
        run_label[n] = current
        run_start[n] = start + 1
        run_length[n] = position - start
        n += 1
    return run_label[:n], run_start[:n], run_length[:n]


@njit(cache=True)
def _grown(array, capacity):
    bigger = np.empty(capacity, array.dtype)
    bigger[: array.size] = array
    return bigger


@njit(cache=True)
def _n_digits(value):
    digits = 1
    while value >= 10:
        value //= 10
        digits += 1
    return digits


@njit(cache=True)
def _format_runs(starts, lengths, group_ends):
    """ASCII "start length ..." of each group of runs, back to back, and where each ends.

    Writing digits into one byte buffer and decoding it once is much faster
    than formatting every number as a Python string.
    """
    size = 0
    for i in range(starts.size):
        size += _n_digits(starts[i]) + _n_digits(lengths[i]) + 2
    buffer = np.empty(size, np.uint8)
    text_ends = np.empty(group_ends.size, np.int64)
    at = 0
    first = 0
    for g in range(group_ends.size):
        for i in range(first, group_ends[g]):
            if i > first:
                buffer[at] = 32  # space
                at += 1
            at = _write_number(buffer, at, starts[i])
            buffer[at] = 32
            at = _write_number(buffer, at + 1, lengths[i])
        text_ends[g] = at
        first = group_ends[g]
    return buffer[:at], text_ends


@njit(cache=True)
def _write_number(buffer, at, value):
    end = at + _n_digits(value)
    for i in range(end - 1, at - 1, -1):
        buffer[i] = 48 + value % 10  # ASCII "0" + digit
        value //= 10
    return end


@njit(cache=True)
def _paint(starts, lengths, object_ends, h, w):
    """Label image from each object's runs; the first object claiming a pixel keeps it."""
    # Writing straight into the row-major image walks each run down a column;
    # nuclei cover a small part of an image, so this beats painting a
    # column-major image and transposing all of it.
    labels = np.zeros((h, w), np.int32)
    shared = np.zeros((0, 0), np.uint8)
    overlap = 0
    first = 0
    for label in range(1, object_ends.size + 1):
        for i in range(first, object_ends[label - 1]):
            x, y = divmod(starts[i] - 1, h)
            for _ in range(lengths[i]):
                if labels[y, x] == 0:
                    labels[y, x] = label
                else:
                    # Allocated only once an overlap is met: most images have none.
                    if shared.size == 0:
                        shared = np.zeros((h, w), np.uint8)
                    if shared[y, x] == 0:
                        shared[y, x] = 1
                        overlap += 1
                y += 1
                if y == h:
                    y = 0
                    x += 1
        first = object_ends[label - 1]
    return labels, overlap
