"""Files that are either wholly old or wholly new, whatever crashes in between."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


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
