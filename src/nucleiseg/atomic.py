"""Atomic file writes: a reader sees the old file or the whole new one, never half of it.

Every file goes through :func:`write_bytes`: the content is encoded in memory
first, written to a temporary file beside the destination, flushed, synced
and checked for its size, then renamed onto the destination. A failed write
(a full disk, a read-only file system, a folder where a file should be) is a
:class:`WriteError` naming the file that was asked for, never the temporary
one, and leaves no file behind: an image library that reports success after
writing nothing cannot put an empty file in place.

:func:`output_problem` checks a destination before any work is spent on what
goes into it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

# An output is refused before any work when its file system has less room than this.
MIN_FREE_BYTES = 1 << 20


class WriteError(OSError):
    """A file could not be written; the message names the file asked for.

    Args:
        path: The destination asked for.
        reason: What went wrong.
        code: The ``errno`` of the failure, if there was one.
    """

    def __init__(self, path: str | os.PathLike, reason: str, code: int | None = None):
        super().__init__(f"{path}: could not write: {reason}")
        self.errno = code


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    For writers that can only write to a file name (pandas, yaml); prefer
    :func:`write_bytes`, which also checks that every byte arrived. The
    temporary file lives in the destination directory so that the final
    ``os.replace`` is a rename on one file system, which POSIX makes atomic.
    It is synced before the rename. If the block raises, the temporary file is
    removed and ``path`` is untouched.

    Args:
        path: Destination file. Its parent directory is created if missing.

    Yields:
        A path to write to (its suffix matches ``path``'s, so writers that look
        at the extension pick the right format).

    Raises:
        WriteError: If the file cannot be written, naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created here, exclusively, with the mode open() uses, so the umask gives
        # it ordinary permissions (mkstemp would make it private, 0600).
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield tmp
        descriptor = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as error:
        raise WriteError(path, _reason(error), error.errno) from error
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` atomically, checking that all of it reached the disk.

    Args:
        path: Destination file. Its parent directory is created if missing.
        payload: The whole content.

    Returns:
        ``path``.

    Raises:
        WriteError: If any step fails or the file holds another number of
            bytes than ``payload``; ``path`` is then as it was.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        descriptor = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            view = memoryview(payload)
            while view:
                written = os.write(descriptor, view)
                if written <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[written:]
            os.fsync(descriptor)
            size = os.fstat(descriptor).st_size
        finally:
            os.close(descriptor)
        if size != len(payload):
            raise WriteError(path, f"{size} of {len(payload)} bytes arrived", errno.EIO)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 with :func:`write_bytes`."""
    return write_bytes(path, text.encode("utf-8"))


def write_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Encode an image as PNG in memory and write it with :func:`write_bytes`.

    Args:
        path: Destination ``.png`` file.
        array: uint8 or uint16 image, grey (H, W) or BGR (H, W, 3), as cv2 takes it.

    Raises:
        WriteError: If the image cannot be encoded or written.
    """
    try:
        ok, encoded = cv2.imencode(".png", array)
    except cv2.error:
        ok = False
    if not ok:
        raise WriteError(path, f"cannot encode a {array.dtype} {array.shape} PNG", errno.EINVAL)
    return write_bytes(path, encoded.tobytes())


def output_problem(path: str | os.PathLike, folder: bool = False) -> str | None:
    """What stops ``path`` from being written, found before any work is spent on it.

    Checks that the path is not of the other kind (a folder given for a file,
    or a file for a folder), that its nearest existing parent is a folder in
    which a file can be created, and that its file system has room.

    Args:
        path: A file to be written, or a folder to be filled.
        folder: ``path`` is a folder.

    Returns:
        One line naming ``path`` and the problem, or None if it can be written.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        return f"{path}: is a file, not a folder"
    if not folder and path.is_dir():
        return f"{path}: is a folder; give a file name"
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{path}: cannot be created, {existing} is a file"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return f"{path}: cannot write in {existing}: {_reason(error)}"
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        return f"{path}: no space left on its file system ({free} bytes free)"
    return None
