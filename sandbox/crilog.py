"""Writing the CRI container log format: `<RFC3339Nano> <stdout|stderr> <P|F> <text>` per line.

Each chunk of output is cut at its newlines: a complete line is written with
`F`, a trailing piece without its newline with `P` (partial: the rest follows
in a later line), as conmon does, so nothing waits in a buffer.

What a writer is given may be hostile (a VM's output) and a line costs some 40
bytes of prefix, so a chunk of newlines grows forty-fold: chunks are formatted
and written `PIECE` bytes at a time, and the file never grows past `max_size`
(plus one piece): past it the file starts over, empty, as conmon's does with
`--log-size-max` (kubelet's rotation normally moves it away long before).
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


PIECE = 8 * 1024
"""Bytes of output formatted at a time (conmon reads 8 KiB at a time too): what one formatting holds in memory
is at most ~45 times this, whatever the chunk."""


def format_lines(stream: str, data: bytes, unix_ns: int) -> bytes:
    """`data` as CRI log lines; b"" for no data."""
    if not data:
        return b""
    prefix = f"{timestamp(unix_ns)} {stream} ".encode()
    lines, newline, partial = data.rpartition(b"\n")
    out = prefix + b"F " + lines.replace(b"\n", b"\n" + prefix + b"F ") + b"\n" if newline else b""
    if partial:
        out += prefix + b"P " + partial + b"\n"
    return out


def pieces(data: bytes, size: int = PIECE) -> list[bytes]:
    """`data` cut into pieces of at most `size` bytes, each ending at its last newline where it has one."""
    out = []
    start = 0
    while len(data) - start > size:
        cut = data.rfind(b"\n", start, start + size)
        end = cut + 1 if cut >= 0 else start + size
        out.append(data[start:end])
        start = end
    if start < len(data):
        out.append(data[start:])
    return out


class CriLogWriter:
    """Appends to one container's log file; `reopen` makes the next write open the path again (log rotation)."""

    def __init__(self, path: Path, max_size: int) -> None:
        self.path = path
        self.max_size = max_size
        self._file: BinaryIO | None = None
        self._size = 0  # of the open file

    def open(self) -> BinaryIO:
        """Create the file if need be: it exists from the container's creation on, as kubelet expects."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._file = os.fdopen(fd, "ab", buffering=0)
            self._size = os.fstat(fd).st_size
        return self._file

    def write(self, stream: str, data: bytes, unix_ns: int) -> None:
        for piece in pieces(data):
            lines = format_lines(stream, piece, unix_ns)
            file = self.open()
            if self._size and self._size + len(lines) > self.max_size:
                file = self._start_over()
            file.write(lines)
            self._size += len(lines)

    def _start_over(self) -> BinaryIO:
        """The file reached `max_size`: an empty one takes its place (made aside and renamed, as conmon does, so
        a reader following the path sees a new file)."""
        fresh = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(fresh, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
        os.rename(fresh, self.path)
        self.close()
        self._file = os.fdopen(fd, "ab", buffering=0)
        self._size = 0
        return self._file

    def reopen(self) -> None:
        """After the kubelet renamed the file: a new one at the path, at once, as conmon does."""
        self.close()
        self.open()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
