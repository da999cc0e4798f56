"""Files appearing in a directory, as the event loop hears of them (inotify(7) through ctypes).

Used where another program announces something by writing a file, such as
conmon's exit files: the loop wakes when the file is complete, instead of
polling for it.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("tandem.inotify")

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_Q_OVERFLOW = 0x00004000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name
_READ_SIZE = 64 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = (ctypes.c_int,)
_libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)


def parse_events(data: bytes) -> list[tuple[int, str]]:
    """(mask, name) of each event in what one read(2) of an inotify descriptor returned."""
    events = []
    offset = 0
    while offset + _EVENT.size <= len(data):
        _, mask, _, length = _EVENT.unpack_from(data, offset)
        offset += _EVENT.size
        name = data[offset : offset + length].rstrip(b"\0")
        offset += length
        events.append((mask, os.fsdecode(name)))
    return events


class DirectoryWatch:
    """Calls `on_file(name)` for each file completed in `directory` (written and closed, or renamed into it).

    `on_file(None)` means events were lost (the kernel's queue overflowed): the
    caller should look at everything. Callbacks run on the event loop.
    """

    def __init__(self, directory: Path, on_file: Callable[[str | None], None]) -> None:
        self.directory = directory
        self._on_file = on_file
        self._fd: int | None = None

    def start(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        if _libc.inotify_add_watch(fd, os.fsencode(self.directory), IN_CLOSE_WRITE | IN_MOVED_TO) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {self.directory}: {os.strerror(err)}")
        self._fd = fd
        asyncio.get_running_loop().add_reader(fd, self._read)

    def _read(self) -> None:
        if self._fd is None:
            return
        try:
            data = os.read(self._fd, _READ_SIZE)
        except OSError as e:
            if e.errno != errno.EAGAIN:
                log.error("reading inotify events failed", extra={"dir": str(self.directory), "error": str(e)})
            return
        for mask, name in parse_events(data):
            if mask & IN_Q_OVERFLOW:
                self._on_file(None)
            elif name:
                self._on_file(name)

    def close(self) -> None:
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
