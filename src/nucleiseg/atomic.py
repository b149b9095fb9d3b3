"""Atomic file writes: a reader sees the old file or the whole new one, never half of it."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary file lives in the destination directory so that the final
    ``os.replace`` is a rename on one file system, which POSIX makes atomic.
    If the block raises, the temporary file is removed and ``path`` is untouched.

    Args:
        path: Destination file. Its parent directory is created if missing.

    Yields:
        A path to write to (its suffix matches ``path``'s, so writers that look
        at the extension, such as ``cv2.imwrite``, pick the right format).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp{path.suffix}")
    # Created here, exclusively, with the mode open() uses, so the umask gives
    # it ordinary permissions (mkstemp would make it private, 0600).
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
