"""Child processes without asyncio's child watchers: the agent reaps every child itself.

The agent is a child subreaper (or PID 1), so container processes become its
children once the runtime that started them exits, and orphans of all kinds end
up with it too. One SIGCHLD handler reaps everything and hands each exit code to
whoever watches that pid. asyncio's subprocess support would race it for the
same exit statuses, so programs are started with `posix_spawn` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import syscalls

_UNCLAIMED_TTL = 60.0  # seconds an exit nobody watched yet stays claimable
_WRITE_CHUNK = 32 * 1024  # a virtio-serial port takes at most 32 KiB per write()
# Python ignores these; the programs it starts must get the default actions back.
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


def exit_code(status: int) -> int:
    """A wait status as shells and conmon report it: the exit code, or 128 + the signal that killed it."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


class Reaper:
    """Reaps every child; `watch(pid)` gives a future for one pid's exit code."""

    def __init__(self) -> None:
        self._waiters: dict[int, asyncio.Future[int]] = {}
        self._unclaimed: dict[int, tuple[int, float]] = {}

    def install(self) -> None:
        if os.getpid() != 1:
            syscalls.set_child_subreaper()
        asyncio.get_running_loop().add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def watch(self, pid: int, since: float) -> asyncio.Future[int]:
        """A future for `pid`'s exit code.

        `since` (time.monotonic) is when the caller started the command that
        created `pid`: a process may exit, and be reaped, before its creator
        even learns its pid (a short exec), and such an exit is claimed here.
        """
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        early = self._unclaimed.pop(pid, None)
        if early is not None and early[1] >= since:
            future.set_result(early[0])
        else:
            self._waiters[pid] = future
        return future

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            future = self._waiters.pop(pid, None)
            if future is None:
                self._unclaimed[pid] = (exit_code(status), time.monotonic())
            elif not future.done():
                future.set_result(exit_code(status))
        cutoff = time.monotonic() - _UNCLAIMED_TTL
        for pid in [p for p, (_, at) in self._unclaimed.items() if at < cutoff]:
            del self._unclaimed[pid]


def spawn(argv: list[str], stdin: int, stdout: int, stderr: int) -> int:
    """Start `argv` (searched in PATH) with the given stdio; every other fd of ours is close-on-exec."""
    actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate((stdin, stdout, stderr))]
    return os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions, setsigdef=_DEFAULT_SIGNALS)


def output_pipe() -> tuple[int, int]:
    """(our read end, the child's write end): only ours non-blocking.

    O_NONBLOCK belongs to the open file, which a dup shares: a child handed a
    non-blocking end would get EAGAIN whenever the pipe is full.
    """
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    return read_end, write_end


def input_pipe() -> tuple[int, int]:
    """(the child's read end, our write end): only ours non-blocking."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    return read_end, write_end


async def wait_fd(fd: int, *, write: bool = False) -> None:
    """Wait until `fd` is readable (or writable)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    add(fd, wake)
    try:
        await ready
    finally:
        remove(fd)


async def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to a non-blocking fd, in pieces a virtio-serial port accepts, never blocking the loop."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view[:_WRITE_CHUNK]) :]
        except BlockingIOError:
            await wait_fd(fd, write=True)


class _Reader(asyncio.Protocol):
    def __init__(self, sink: Callable[[bytes], None], eof: asyncio.Future[None]) -> None:
        self._sink = sink
        self._eof = eof

    def data_received(self, data: bytes) -> None:
        self._sink(data)

    def connection_lost(self, exc: Exception | None) -> None:  # EOF, or EIO on a pty whose slave closed
        if not self._eof.done():
            self._eof.set_result(None)


async def read_fd(fd: int, sink: Callable[[bytes], None]) -> tuple[asyncio.ReadTransport, asyncio.Future[None]]:
    """Feed whatever arrives on `fd` (a pipe or pty, which it takes over) to `sink`; the future is done at EOF."""
    loop = asyncio.get_running_loop()
    eof: asyncio.Future[None] = loop.create_future()
    transport, _ = await loop.connect_read_pipe(lambda: _Reader(sink, eof), os.fdopen(fd, "rb", buffering=0))
    return transport, eof


@dataclass(frozen=True)
class Completed:
    code: int
    stdout: bytes
    stderr: bytes


async def run(reaper: Reaper, argv: list[str], *, timeout: float = 60.0) -> Completed:
    """Run a short command to completion and collect its output; past `timeout` it is killed (TimeoutError)."""
    out: list[bytes] = []
    err: list[bytes] = []
    out_r, out_w = output_pipe()
    err_r, err_w = output_pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    since = time.monotonic()
    try:
        pid = spawn(argv, null, out_w, err_w)
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        for fd in (null, out_w, err_w):
            os.close(fd)
    exited = reaper.watch(pid, since)
    readers = [await read_fd(out_r, out.append), await read_fd(err_r, err.append)]
    try:
        async with asyncio.timeout(timeout):
            code = await exited
            await asyncio.wait([eof for _, eof in readers])
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        raise
    finally:
        for transport, _ in readers:
            transport.close()
    return Completed(code, b"".join(out), b"".join(err))


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    table[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return table


def _holds(pid: int, pipes: frozenset[str]) -> bool:
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in pipes:
                    return True
    return False


def pipe_names(*fds: int) -> frozenset[str]:
    """How /proc shows these pipes (`pipe:[inode]`): to find every process still holding them."""
    return frozenset(f"pipe:[{os.fstat(fd).st_ino}]" for fd in fds)


def kill_tree(root: int, pipes: frozenset[str] = frozenset()) -> None:
    """SIGKILL `root`, its descendants, and every other process holding `pipes` (orphans that inherited them).

    Everything is stopped first, so that nothing forks past the walk.
    """
    me = os.getpid()
    stopped: set[int] = set()
    while True:
        parents = _parents()
        found = {root} | {pid for pid in parents if pid != me and pipes and _holds(pid, pipes)}
        todo = list(found)
        while todo:
            parent = todo.pop()
            for pid, ppid in parents.items():
                if ppid == parent and pid not in found:
                    found.add(pid)
                    todo.append(pid)
        new = found - stopped
        if not new:
            break
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        stopped |= new
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def receive_fd(connection: socket.socket) -> int:
    """The pty master a runtime sends over a console socket (SCM_RIGHTS)."""
    connection.setblocking(False)
    await wait_fd(connection.fileno())
    _, fds, _, _ = socket.recv_fds(connection, 4096, 4)
    for extra in fds[1:]:
        os.close(extra)
    if not fds:
        raise OSError("no terminal came over the console socket")
    return fds[0]
