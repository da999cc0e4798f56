"""exec, attach and port-forward for runc pods: what runs behind a streaming session.

- exec: `runc exec --process` with the container's own process spec and the
  given command. Without a terminal the command gets our pipes (stdin's read end
  owned by the container's user, so it can reopen /dev/stdin). With one, runc
  runs on a pty we create, as CRI-O does: runc makes the container's terminal,
  relays between it and ours, and copies our terminal's size over on SIGWINCH.
- attach: conmon's attach socket (SOCK_SEQPACKET: each packet from conmon is a
  pipe byte, 2 stdout or 3 stderr, then data; what we send is stdin) and its
  `ctl` fifo for resizes (`1 <height> <width>`), in CRI-O's formats.
- port-forward: sockets made inside the pod's network namespace by a throwaway
  thread that setns()es there (CLONE_NEWNET moves only the calling thread, and a
  socket stays in the namespace it was made in), connected from the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import struct
import tempfile
import termios
import threading
from pathlib import Path
from tty import setraw
from typing import Any

from core.chunks import ChunkQueue
from core.errors import FailedPrecondition, Unavailable
from core.proc import spawn
from runc_backend.runc import Runc, _kill_exec
from sandbox.backend import ByteChannel, Process, StreamChannel

log = logging.getLogger("tandem.runc")

READ_SIZE = 64 * 1024
ATTACH_PACKET = 8192
"""Stdin bytes per packet to conmon (its STDIO_BUF_SIZE); a bigger SEQPACKET would be cut short."""
CONNECT_TIMEOUT = 10.0
KILL_GRACE = 5.0
_STDOUT_PIPE, _STDERR_PIPE = 2, 3  # conmon's stdpipe_t
_RESIZE = 1  # conmon ctl message type
_CLONE_NEWNET = 0x40000000


def _exit_code(returncode: int) -> int:
    """A child's exit status as a shell reports it: 128 + the signal when one killed it."""
    return 128 - returncode if returncode < 0 else returncode


class _Fd:
    """A non-blocking file descriptor (pty master, pipe end) used from the event loop."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self._watched: set[str] = set()

    async def read(self) -> bytes:
        """Some bytes; b"" at end of file, including the EIO a pty master gives once its other side is closed."""
        while self.fd >= 0:
            try:
                return os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                await self._ready("reader")
            except OSError as e:
                if e.errno == errno.EIO:
                    return b""
                raise
        return b""

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.fd < 0:
                raise BrokenPipeError("closed")
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                await self._ready("writer")

    async def _ready(self, kind: str) -> None:
        loop = asyncio.get_running_loop()
        add, remove = (
            (loop.add_reader, loop.remove_reader) if kind == "reader" else (loop.add_writer, loop.remove_writer)
        )
        ready: asyncio.Future[None] = loop.create_future()

        def woken() -> None:
            if not ready.done():
                ready.set_result(None)

        add(self.fd, woken)
        self._watched.add(kind)
        try:
            await ready
        finally:
            if kind in self._watched:
                self._watched.discard(kind)
                remove(self.fd)

    def close(self) -> None:
        """Close the descriptor (waiters stay parked until cancelled; the caller ends them)."""
        if self.fd < 0:
            return
        loop = asyncio.get_running_loop()
        for kind in self._watched:
            (loop.remove_reader if kind == "reader" else loop.remove_writer)(self.fd)
        self._watched.clear()
        os.close(self.fd)
        self.fd = -1


# ---- exec ----------------------------------------------------------------------------------


async def exec_process(
    runc: Runc,
    bundle: Path,
    cid: str,
    cmd: list[str],
    *,
    tty: bool,
    stdin: bool,
    terminal_size: tuple[int, int] | None,
) -> Process:
    """Start `cmd` in container `cid` (whose bundle holds the process spec to run it with)."""
    process = json.loads((bundle / "config.json").read_text())["process"]
    process.update(args=cmd, terminal=tty)
    process.pop("consoleSize", None)
    if tty and terminal_size is not None:
        process["consoleSize"] = {"width": terminal_size[0], "height": terminal_size[1]}
    files = tempfile.TemporaryDirectory(prefix="tandem-exec-")
    spec = Path(files.name) / "process.json"
    spec.write_text(json.dumps(process))
    argv = [runc.binary, "--root", str(runc.root), "exec", "--process", str(spec), cid]
    try:
        if tty:
            return await _start_tty(argv, files, terminal_size)
        return await _start_piped(argv, files, process.get("user", {}), stdin)
    except BaseException:
        files.cleanup()
        raise


async def _start_piped(
    argv: list[str], files: tempfile.TemporaryDirectory[str], user: dict[str, Any], stdin: bool
) -> Process:
    if not stdin:
        proc = await spawn(argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        return _PipedExec(proc, None, files)
    read_end, write_end = os.pipe()
    try:
        os.fchown(read_end, user.get("uid", 0), user.get("gid", 0))
        proc = await spawn(argv, stdin=read_end, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return _PipedExec(proc, _Fd(write_end), files)


async def _start_tty(
    argv: list[str], files: tempfile.TemporaryDirectory[str], terminal_size: tuple[int, int] | None
) -> Process:
    """runc on a pty of ours, sized like the client's terminal before runc copies its size over.

    It starts raw, so input arriving before runc sets the modes it wants is not echoed or edited here.
    runc then leaves output processing on ours and turns ONLCR off on the container's terminal, racing
    the command: its very first lines may end in CR CR LF, which a terminal shows as CR LF.
    """
    master, slave = os.openpty()
    try:
        setraw(slave)
        if terminal_size is not None:
            _set_size(master, *terminal_size)
        proc = await spawn(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return _TtyExec(proc, _Fd(master), files)


def _set_size(fd: int, width: int, height: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


class _Exec(Process):
    """What both kinds of exec share: a `runc exec` child whose exit is the command's."""

    def __init__(self, proc: asyncio.subprocess.Process, files: tempfile.TemporaryDirectory[str]) -> None:
        self._proc = proc
        self._files = files

    async def wait(self) -> int:
        code = await self._proc.wait()
        self._files.cleanup()
        return _exit_code(code)

    async def kill(self) -> None:
        """Kill the command and whatever it started (runc's own helper finds them), then runc."""
        if self._proc.returncode is None:
            await asyncio.to_thread(_kill_exec, self._proc.pid)
            try:
                await asyncio.wait_for(self._proc.wait(), KILL_GRACE)
            except TimeoutError:
                self._proc.kill()
        await self.wait()


class _PipedExec(_Exec):
    def __init__(
        self, proc: asyncio.subprocess.Process, stdin: _Fd | None, files: tempfile.TemporaryDirectory[str]
    ) -> None:
        super().__init__(proc, files)
        self._stdin = stdin

    async def read_stdout(self) -> bytes:
        assert self._proc.stdout is not None
        return await self._proc.stdout.read(READ_SIZE)

    async def read_stderr(self) -> bytes:
        assert self._proc.stderr is not None
        return await self._proc.stderr.read(READ_SIZE)

    async def write_stdin(self, data: bytes) -> None:
        if self._stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                await self._stdin.write(data)

    async def close_stdin(self) -> None:
        if self._stdin is not None:
            self._stdin.close()

    async def resize(self, width: int, height: int) -> None:
        pass

    async def wait(self) -> int:
        code = await super().wait()
        await self.close_stdin()  # nothing reads it any more
        return code


class _TtyExec(_Exec):
    def __init__(self, proc: asyncio.subprocess.Process, master: _Fd, files: tempfile.TemporaryDirectory[str]) -> None:
        super().__init__(proc, files)
        self._master = master

    async def read_stdout(self) -> bytes:
        data = await self._master.read()
        if not data:
            self._master.close()
        return data

    async def read_stderr(self) -> bytes:
        return b""

    async def write_stdin(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            await self._master.write(data)

    async def close_stdin(self) -> None:
        """A terminal has no end of file to pass on (^D would be a keystroke): nothing to do."""

    async def resize(self, width: int, height: int) -> None:
        if self._master.fd < 0 or self._proc.returncode is not None:
            return
        _set_size(self._master.fd, width, height)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._proc.pid, signal.SIGWINCH)  # runc copies the new size to the container's terminal

    async def kill(self) -> None:
        await super().kill()
        self._master.close()


# ---- attach --------------------------------------------------------------------------------


async def attach_process(socket_path: Path, ctl: Path, *, detach_on_stdin_eof: bool) -> Process:
    """Connect to a running container's conmon: its output as it is logged, and its stdin."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setblocking(False)
    try:
        # By an O_PATH descriptor, as podman does: the path itself may be longer than a socket address allows.
        fd = os.open(socket_path, os.O_PATH | os.O_CLOEXEC)
        try:
            await asyncio.get_running_loop().sock_connect(sock, f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    except OSError as e:
        sock.close()
        raise FailedPrecondition(f"cannot attach: the container's monitor does not answer ({e})") from e
    return _Attach(sock, ctl, detach_on_stdin_eof)


class _Attach(Process):
    def __init__(self, sock: socket.socket, ctl: Path, detach_on_stdin_eof: bool) -> None:
        self._sock = sock
        self._ctl = ctl
        self._detach_on_stdin_eof = detach_on_stdin_eof
        self._outputs = {_STDOUT_PIPE: ChunkQueue(64), _STDERR_PIPE: ChunkQueue(64)}
        self._receiver = asyncio.create_task(self._receive(), name="attach receiver")

    async def _receive(self) -> None:
        """Sort conmon's packets into stdout and stderr until it closes the socket (the container exited)."""
        loop = asyncio.get_running_loop()
        try:
            while packet := await loop.sock_recv(self._sock, READ_SIZE):
                if (queue := self._outputs.get(packet[0])) is not None:
                    await queue.put(packet[1:])
        except OSError:
            pass
        finally:
            for queue in self._outputs.values():
                queue.end()

    async def read_stdout(self) -> bytes:
        return await self._outputs[_STDOUT_PIPE].get()

    async def read_stderr(self) -> bytes:
        return await self._outputs[_STDERR_PIPE].get()

    async def write_stdin(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            for start in range(0, len(data), ATTACH_PACKET):
                await loop.sock_sendall(self._sock, data[start : start + ATTACH_PACKET])

    async def close_stdin(self) -> None:
        """End of the client's input: conmon closes the container's stdin (if it was created `stdin_once`)."""
        if self._detach_on_stdin_eof:
            await self.kill()
            return
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    async def resize(self, width: int, height: int) -> None:
        try:
            fd = os.open(self._ctl, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # conmon is gone, or reads no ctl fifo: nothing to resize
            return
        try:
            os.write(fd, f"{_RESIZE} {height} {width}\n".encode())
        except OSError:
            pass
        finally:
            os.close(fd)

    async def wait(self) -> None:
        await asyncio.wait({self._receiver})
        self._sock.close()

    async def kill(self) -> None:
        """Detach: the container keeps running."""
        self._receiver.cancel()
        await asyncio.wait({self._receiver})
        self._sock.close()


# ---- port-forward --------------------------------------------------------------------------


async def connect(netns: str | None, port: int) -> ByteChannel:
    """A TCP connection to `port` on the loopback of network namespace `netns` (None: the host's)."""
    sockets = await _sockets_in_netns(netns) if netns else _loopback_sockets()
    loop = asyncio.get_running_loop()
    failures = []
    try:
        while sockets:
            sock, address = sockets.pop(0)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (address, port)), CONNECT_TIMEOUT)
            except OSError as e:  # TimeoutError included
                sock.close()
                failures.append(f"{address}: {os.strerror(e.errno) if e.errno else 'timed out'}")
                continue
            return StreamChannel(*await asyncio.open_connection(sock=sock))
    finally:
        for sock, _ in sockets:
            sock.close()
    raise Unavailable(f"cannot connect to port {port} inside the pod ({'; '.join(failures) or 'no loopback'})")


def _loopback_sockets() -> list[tuple[socket.socket, str]]:
    """Unconnected sockets for 127.0.0.1 and ::1 (where the namespace has IPv6), in the calling thread's netns."""
    made = []
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        sock.setblocking(False)
        made.append((sock, address))
    return made


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


def _sockets_in(netns: str) -> list[tuple[socket.socket, str]]:
    """`_loopback_sockets` made inside `netns`; runs in a thread of its own, which it moves there and back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            return _loopback_sockets()
        finally:
            _setns(home)
    finally:
        os.close(home)


async def _sockets_in_netns(netns: str) -> list[tuple[socket.socket, str]]:
    """`_sockets_in` on a new thread that then ends: a pool thread would be handed out again, still in the
    pod's namespace, if moving it back ever failed."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[list[tuple[socket.socket, str]]] = loop.create_future()

    def settle(result: list[tuple[socket.socket, str]] | None, error: BaseException | None) -> None:
        if done.cancelled():
            for sock, _ in result or []:
                sock.close()
        elif error is not None:
            done.set_exception(error)
        else:
            done.set_result(result or [])

    def run() -> None:
        try:
            result = _sockets_in(netns)
        except BaseException as e:
            loop.call_soon_threadsafe(settle, None, e)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="tandem netns", daemon=True).start()
    try:
        return await done
    except OSError as e:
        raise Unavailable(f"cannot enter the pod's network namespace {netns}: {e}") from e
