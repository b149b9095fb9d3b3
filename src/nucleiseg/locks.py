"""One writer per output folder: a lock that a second process sees at once.

A command that fills a folder (a training run, a reference bundle) holds an
exclusive ``fcntl.flock`` on a lock file beside it, ``.<name>.lock``, for the
whole job. The file holds the holder's pid, host and start time, so that a
second command into the same folder stops at once naming who holds it, rather
than mixing its files with the first one's. The kernel releases the lock when
its holder exits, however it exits, so a lock file left by a killed process
does not block the next one; a holder that ends normally removes the file.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from nucleiseg.atomic import WriteError

# How long a refused process waits for the holder to have written who it is:
# the holder writes right after it takes the lock, so this is seldom waited.
_HOLDER_WAIT_S = 1.0


class FolderInUse(WriteError):
    """Another process holds the folder's lock; the message names it.

    A :class:`nucleiseg.atomic.WriteError`, so that every command that reports
    a file it could not write reports a folder it may not write the same way.

    Args:
        folder: The folder asked for.
        holder: Who holds it, e.g. ``pid 12 on node1 since 2025-01-01T10:00:00+00:00``.
    """

    def __init__(self, folder: str | os.PathLike, holder: str):
        super().__init__(folder, f"in use by {holder}", errno.EBUSY)


def lock_path(folder: str | os.PathLike) -> Path:
    """The lock file of a folder: ``.<name>.lock`` beside it."""
    folder = Path(folder).resolve()  # ``.`` and ``..`` have no name of their own
    return folder.with_name(f".{folder.name}.lock")


def _holder(descriptor: int, path: Path) -> str:
    """Who holds a lock, from its file; the file's name if the holder has not written it yet."""
    deadline = time.monotonic() + _HOLDER_WAIT_S
    while True:
        try:
            holder = json.loads(os.pread(descriptor, 4096, 0))
            return f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
        except (ValueError, KeyError, TypeError):
            if time.monotonic() > deadline:
                return f"another process (its lock: {path})"
            time.sleep(0.01)


def _is_file_at(descriptor: int, path: Path) -> bool:
    """Whether an open file is still the one at ``path`` (a releasing holder removes it)."""
    try:
        return os.stat(path).st_ino == os.fstat(descriptor).st_ino
    except FileNotFoundError:
        return False


def _take(path: Path, folder: Path) -> int:
    """Open and lock ``path``, retrying when its last holder removed it meanwhile."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        taken = False
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            taken = _is_file_at(descriptor, path)
        except BlockingIOError:
            raise FolderInUse(folder, _holder(descriptor, path)) from None
        finally:
            if not taken:
                os.close(descriptor)
        if taken:
            return descriptor


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of ``folder`` for the ``with`` block, or stop at once if another process does.

    Args:
        folder: The folder to be written (it need not exist yet; its parent is
            created for the lock file).

    Yields:
        The lock file.

    Raises:
        FolderInUse: If another process holds the lock, naming its pid, host
            and start time.
        nucleiseg.atomic.WriteError: If the lock file cannot be created or locked.
    """
    folder = Path(folder)
    path = lock_path(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = _take(path, folder)
    except WriteError:
        raise
    except OSError as error:
        raise WriteError(path, error.strerror or str(error), error.errno) from error
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
    try:
        # Who holds it is for the message of a refused process only: a disk too
        # full for these bytes leaves the lock held, and that message shorter.
        with contextlib.suppress(OSError):
            os.ftruncate(descriptor, 0)  # a killed holder's line may be longer
            os.pwrite(descriptor, json.dumps(holder).encode(), 0)
        yield path
    finally:
        # Removed while still held, so that no process can take the old file after it.
        path.unlink(missing_ok=True)
        os.close(descriptor)
