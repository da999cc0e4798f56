"""Files that are either wholly old or wholly new, whatever crashes in between; files read where others write."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Write `data` to `path` via a unique temp file, fsync and rename.

    Unique temp names make concurrent writers safe: each rename is atomic and
    the last one wins; a reader never sees a half-written file. `durable=False`
    skips the fsyncs, for files on tmpfs or recreated after a reboot anyway.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, value: Any, mode: int = 0o600, durable: bool = True) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=1, sort_keys=True).encode(), mode, durable)


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) and make it 0700: state never leaks to other users."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def open_regular_nofollow(path: Path) -> BinaryIO:
    """Open `path` for reading only if it is a regular file itself: no symlink, FIFO or device.

    For files in a directory someone less trusted can write (a jailed VMM's run dir):
    a planted symlink or FIFO must neither send a root reader elsewhere nor block it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"not a regular file: {path}")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def socket_nofollow(path: Path) -> Iterator[str]:
    """A path to connect to that reaches the unix socket at `path` only if `path` itself is one (no symlink).

    connect() follows symlinks and cannot be told not to; connecting through
    /proc/self/fd/N of an O_PATH descriptor opened with O_NOFOLLOW cannot be redirected.
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError(errno.ENOTSOCK, f"not a socket: {path}")
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
