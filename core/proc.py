"""The one way Tandem runs external programs (runc, conmon, QEMU, CNI plugins, ...).

- `run`: to completion, bounded by a timeout; a failure becomes a `CommandFailed`
  carrying the program's stderr (`run_blocking` for the operator's tools).
- `spawn`: a child whose stdio the caller wires and whose end it awaits.
- `spawn_detached`: a long-lived program in its own session that outlives the daemon.
- `wait_exit`: the end of any process, through a pidfd.
- `ProcessIdentity`: "is this still the process I started", across pid reuse and restarts.

Every start is logged; a program that is not installed is `Unavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from core.errors import CommandFailed, DeadlineExceeded, InvalidArgument, TandemError, Unavailable

log = logging.getLogger("tandem.proc")


def start_error(program: str, error: OSError) -> TandemError:
    """The domain error for a program the kernel would not start: never let an OSError escape.

    Callers' cleanup paths catch domain errors; an argv or environment built from an
    oversized request (E2BIG) must fail the request, not leave state nobody can remove.
    """
    if isinstance(error, FileNotFoundError):
        return Unavailable(f"{program} is not installed (run `tandem doctor`)")
    if error.errno == errno.E2BIG:
        return InvalidArgument(f"{program}: argument list or environment too long")
    return Unavailable(f"cannot start {program}: {error.strerror or error}")


@dataclass(frozen=True)
class Completed:
    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes


async def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = 60.0,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    check: bool = True,
    pass_fds: Sequence[int] = (),
) -> Completed:
    """Run `argv` to completion; raise `CommandFailed` on a non-zero exit when `check`.

    `pass_fds` are descriptors the program inherits under the same numbers (detached mount trees, say).
    """
    args = [str(a) for a in argv]
    proc = await spawn(
        args,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
        pass_fds=pass_fds,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(input), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise DeadlineExceeded(f"{args[0]} did not finish within {timeout:g}s") from None
    except asyncio.CancelledError:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    assert proc.returncode is not None
    result = Completed(args, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise CommandFailed(args, proc.returncode, stderr.decode(errors="replace"))
    return result


def run_blocking(
    argv: Sequence[str | os.PathLike[str]], *, timeout: float = 60.0, input: bytes | None = None
) -> Completed:
    """`run` for code outside the event loop (the operator's tools): never raises on a non-zero exit."""
    args = [str(a) for a in argv]
    log.debug("exec %s", shlex.join(args))
    stdin = subprocess.DEVNULL if input is None else None
    try:
        done = subprocess.run(args, stdin=stdin, input=input, capture_output=True, timeout=timeout, check=False)
    except OSError as e:
        raise start_error(args[0], e) from e
    except subprocess.TimeoutExpired:
        raise DeadlineExceeded(f"{args[0]} did not finish within {timeout:g}s") from None
    return Completed(args, done.returncode, done.stdout, done.stderr)


Stdio = int | IO[Any] | None


async def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    stdin: Stdio = asyncio.subprocess.DEVNULL,
    stdout: Stdio = None,
    stderr: Stdio = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    pass_fds: Sequence[int] = (),
    start_new_session: bool = False,
) -> asyncio.subprocess.Process:
    """Start `argv` as a child of this event loop, its stdio as given (PIPE, DEVNULL, a descriptor or file)."""
    args = [str(a) for a in argv]
    log.debug("exec %s", shlex.join(args))
    try:
        return await asyncio.create_subprocess_exec(
            *args,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            pass_fds=tuple(pass_fds),
            start_new_session=start_new_session,
        )
    except OSError as e:
        raise start_error(args[0], e) from e


def spawn_detached(
    argv: Sequence[str | os.PathLike[str]], log_path: Path, pass_fds: Sequence[int] = ()
) -> ProcessIdentity:
    """Start a long-lived program in its own session, output to `log_path`; return who it is.

    `pass_fds` are descriptors it inherits (a tap device, say).

    Not asyncio's subprocess: its transport kills a still-running child when it is
    closed or garbage-collected, and these processes must outlive the objects (and
    the daemon) that started them. `wait_exit` reaps them. Blocking (fork and exec):
    call it from a thread.
    """
    args = [str(a) for a in argv]
    log.info("exec %s", shlex.join(args))
    with open(log_path, "wb") as out:
        try:
            child = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                pass_fds=tuple(pass_fds),
            )
        except OSError as e:
            raise start_error(args[0], e) from e
    identity = ProcessIdentity.of(child.pid)
    assert identity is not None, "our own unreaped child has a /proc entry"
    return identity


async def start_detached(
    argv: Sequence[str | os.PathLike[str]], log_path: Path, pidfile: Path, pass_fds: Sequence[int] = ()
) -> ProcessIdentity:
    """`spawn_detached` from a thread, who it started saved to `pidfile` before this returns, also when the call
    is cancelled meanwhile.

    A thread cannot be stopped: a cancelled call that went on without it would leave a process starting
    that nothing records, racing whoever cleans up after the cancellation (a warm VM's boot cut short by
    the daemon's shutdown left QEMU running). So the cancelled call waits for the thread, records what it
    started, and only then lets the cancellation through; the cleanup finds the process by its pidfile.
    """
    starting = asyncio.ensure_future(asyncio.to_thread(spawn_detached, argv, log_path, pass_fds))
    try:
        identity = await asyncio.shield(starting)
    except asyncio.CancelledError:
        await asyncio.wait([starting])
        if not starting.cancelled() and starting.exception() is None:
            starting.result().save(pidfile)
        raise
    identity.save(pidfile)
    return identity


async def wait_pidfd(pidfd: int, timeout: float | None = None) -> bool:
    """Wait until the process behind `pidfd` has exited; False on timeout. The caller keeps owning `pidfd`."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await asyncio.wait_for(exited, timeout)
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)
    return True


async def kill_and_wait(process: ProcessIdentity, timeout: float) -> bool:
    """SIGKILL `process` through a pidfd (never a later process that got its pid), then `wait_exit`; a process
    already gone is success; False if it outlived `timeout`."""
    pidfd = process.open()
    if pidfd is None:
        return True
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)
    return await wait_exit(process, timeout)


async def wait_exit(process: int | ProcessIdentity, timeout: float | None = None) -> bool:
    """Wait for a process (a pid, or better an identity) to exit, reaping it if it is ours; False on timeout.

    Whoever its parent is: the wait is on a pidfd. A process already gone is success.
    """
    if isinstance(process, ProcessIdentity):
        pid, fd = process.pid, process.open()
    else:
        pid = process
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            fd = None
    if fd is None:
        return True
    try:
        if not await wait_pidfd(fd, timeout):
            return False
    finally:
        os.close(fd)
    reap(pid)  # the pidfd was of this very process, so the pid is not yet anyone else's
    return True


def reap(pid: int) -> None:
    """Collect the exit of `pid` if it is an exited child of ours (a zombie otherwise); anything else is a no-op."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks after boot) from /proc/<pid>/stat, None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name in parentheses may hold anything
    return fields[0], int(fields[19])


@dataclass(frozen=True)
class ProcessIdentity:
    """One process, told apart from any later one that gets its pid: the pid and its start time.

    Taken when Tandem starts (or first meets) a process and persisted beside the
    pid, it answers "is this still the process I started?" after any amount of
    time, a daemon restart included.
    """

    pid: int
    start_time: int  # clock ticks after boot (/proc/<pid>/stat field 22): never the same for a reused pid

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        """The identity of the process that has `pid` now, None if there is none."""
        found = _stat(pid)
        return None if found is None else cls(pid, found[1])

    def exists(self) -> bool:
        """Whether the process is still there, a zombie not yet reaped included."""
        found = _stat(self.pid)
        return found is not None and found[1] == self.start_time

    def alive(self) -> bool:
        """Whether the process still runs: it exists and is no zombie."""
        found = _stat(self.pid)
        return found is not None and found[1] == self.start_time and found[0] not in ("Z", "X")

    def open(self) -> int | None:
        """A pidfd of this very process (checked after opening, so it cannot be a successor), None if it is gone."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except (ProcessLookupError, OSError):
            return None
        if not self.exists():
            os.close(pidfd)
            return None
        return pidfd

    def to_list(self) -> list[int]:
        """The identity as a record stores it."""
        return [self.pid, self.start_time]

    @classmethod
    def from_list(cls, value: object) -> ProcessIdentity | None:
        """An identity a record stored, None for anything else (a record without one, a damaged one)."""
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
            return cls(value[0], value[1])
        return None

    def save(self, path: Path) -> None:
        """Write the identity to `path` (a pidfile with the start time beside the pid)."""
        path.write_text(f"{self.pid} {self.start_time}\n")

    @classmethod
    def load(cls, path: Path) -> ProcessIdentity | None:
        """The identity `save` wrote, None when the file is missing or is not one."""
        try:
            pid, start_time = (int(field) for field in path.read_text().split())
        except (OSError, ValueError):
            return None
        return cls(pid, start_time)
