"""Writing the CRI container log format: `<RFC3339Nano> <stdout|stderr> <P|F> <text>` per line.

Each chunk of output is cut at its newlines: a complete line is written with
`F`, a trailing piece without its newline with `P` (partial: the rest follows
in a later line), as conmon does, so nothing waits in a buffer.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import BinaryIO

STDOUT = "stdout"
STDERR = "stderr"


def timestamp(unix_ns: int) -> str:
    """RFC 3339 with nanoseconds, in UTC: 2026-11-27T19:06:22.123456789Z."""
    seconds, nanos = divmod(unix_ns, 1_000_000_000)
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{nanos:09d}Z"


def format_lines(stream: str, data: bytes, unix_ns: int) -> bytes:
    """`data` as CRI log lines; b"" for no data."""
    if not data:
        return b""
    prefix = f"{timestamp(unix_ns)} {stream} ".encode()
    pieces = data.split(b"\n")
    out = bytearray()
    for piece in pieces[:-1]:
        out += prefix + b"F " + piece + b"\n"
    if pieces[-1]:
        out += prefix + b"P " + pieces[-1] + b"\n"
    return bytes(out)


class CriLogWriter:
    """Appends to one container's log file; `reopen` makes the next write open the path again (log rotation)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None

    def open(self) -> BinaryIO:
        """Create the file if need be: it exists from the container's creation on, as kubelet expects."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._file = os.fdopen(fd, "ab", buffering=0)
        return self._file

    def write(self, stream: str, data: bytes, unix_ns: int) -> None:
        lines = format_lines(stream, data, unix_ns)
        if lines:
            self.open().write(lines)

    def reopen(self) -> None:
        """After the kubelet renamed the file: a new one at the path, at once, as conmon does."""
        self.close()
        self.open()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
