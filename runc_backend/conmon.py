"""conmon, the per-container monitor CRI-O uses, driven the way CRI-O drives it.

conmon runs `runc create`, then stays as the container's parent (a subreaper):
it writes the container's stdout/stderr to the CRI log file, serves the attach
socket, watches for OOM kills, and when the container exits writes its exit code
to `<exit_dir>/<cid>` and `<persist_dir>/exit`. It double-forks into its own
session, so containers keep running and logging while Tandem restarts.

Files, per container:
  <bundle>/ctl, <bundle>/winsz      control fifos (log reopen, terminal resize)
  <bundle>/attach                   attach socket, reached as <socket_dir>/<cid>/attach (a short path)
  <persist_dir>/pidfile             the container's host pid (written by runc)
  <persist_dir>/conmon.pid          conmon's own pid
  <persist_dir>/conmon.identity     conmon's pid and start time (`core.proc.ProcessIdentity`), written by Tandem
  <persist_dir>/exit                exit code, also at <exit_dir>/<cid>; its mtime is the finish time
  <persist_dir>/oom                 exists when the kernel OOM-killed something in the container
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

from core.errors import CommandFailed, DeadlineExceeded, FailedPrecondition, Unavailable
from core.proc import ProcessIdentity, spawn, wait_pidfd
from runc_backend.runc import Runc

log = logging.getLogger("tandem.conmon")

CREATE_TIMEOUT = 240.0
"""Seconds `runc create` may take under conmon (CRI-O's ContainerCreateTimeout)."""

_REOPEN_LOGS = b"2 0 0\n"  # conmon ctl message: type 2 (REOPEN_LOGS_EVENT), height and width unused
_POLL = 0.02
_POLL_AFTER_DEATH = 0.001  # conmon writes the exit file within a few ms of reaping the container
_EXIT_FILE_GRACE = 2.0  # seconds the exit file may trail the container's death


def read_exit(exit_dir: Path, cid: str) -> tuple[int, int] | None:
    """(exit code, finished-at ns) from conmon's exit file, or None while the container runs.

    Signal deaths are 128 + signal (SIGTERM 143, SIGKILL 137); -1 means conmon
    could not tell. conmon writes the file atomically (temp file and rename)
    after the container died and its output was flushed to the log.
    """
    path = exit_dir / cid
    try:
        text = path.read_text()
        finished = path.stat().st_mtime_ns
    except FileNotFoundError:
        return None
    return int(text.strip()), finished


async def wait_exit(exit_dir: Path, cid: str, timeout: float, pidfd: int | None = None) -> tuple[int, int] | None:
    """`read_exit`, waiting up to `timeout` seconds for the file to appear (it trails the exit slightly).

    With `pidfd` (of the container's init) the wait is for that process to die,
    then a short poll for the file conmon writes once it reaped it; else a poll
    every 20 ms. The caller keeps owning `pidfd`.
    """
    deadline = time.monotonic() + timeout
    poll = _POLL
    if pidfd is not None and read_exit(exit_dir, cid) is None:
        if not await wait_pidfd(pidfd, timeout):
            return read_exit(exit_dir, cid)
        poll = _POLL_AFTER_DEATH
        deadline = max(deadline, time.monotonic() + _EXIT_FILE_GRACE)
    while True:
        result = read_exit(exit_dir, cid)
        if result is not None or time.monotonic() >= deadline:
            return result
        await asyncio.sleep(poll)


def oom_killed(persist_dir: Path) -> bool:
    """Whether conmon saw an OOM kill in the container's memory cgroup."""
    return (persist_dir / "oom").exists()


def running_monitor(persist_dir: Path) -> ProcessIdentity | None:
    """The conmon started for the container of `persist_dir` while it runs (after a restart: is anyone
    recording its exit?)."""
    monitor = ProcessIdentity.load(persist_dir / "conmon.identity")
    return monitor if monitor is not None and monitor.alive() else None


def _runc_message(stderr: str) -> str:
    """runc's error text out of its logrus line (`time=... level=error msg="..."`), else the text as is."""
    for line in reversed(stderr.strip().splitlines()):
        if 'msg="' in line:
            return line.split('msg="', 1)[1].rsplit('"', 1)[0].replace('\\"', '"')
    return stderr.strip()


class Conmon:
    """Starts one conmon per container, all sharing one runc state dir and one attach socket dir.

    `socket_dir` must be short: `<socket_dir>/<cid>/attach` has to fit a unix
    socket path (108 bytes), so with 64-hex ids it can have about 34 characters.
    """

    def __init__(self, runc: Runc, binary: str = "conmon", *, socket_dir: Path, log_level: str = "error") -> None:
        self.runc = runc
        self.binary = shutil.which(binary) or binary
        self.socket_dir = socket_dir
        self.log_level = log_level

    def attach_socket_path(self, cid: str) -> Path:
        """Where conmon serves the container's attach socket (SOCK_SEQPACKET) while it runs."""
        return self.socket_dir / cid / "attach"

    def remove_attach_link(self, cid: str) -> None:
        """Remove `<socket_dir>/<cid>`, the symlink to the bundle that conmon leaves behind when it exits."""
        with contextlib.suppress(FileNotFoundError):
            (self.socket_dir / cid).unlink()

    def _argv(
        self,
        cid: str,
        bundle: Path,
        log_path: Path,
        exit_dir: Path,
        persist_dir: Path,
        terminal: bool,
        stdin: bool,
        stdin_once: bool,
        log_max_size: int | None,
    ) -> list[str]:
        argv = [
            self.binary,
            "--api-version", "1",
            "-c", cid,
            "-u", cid,
            "-r", self.runc.binary,
            "--runtime-arg", f"--root={self.runc.root}",
            "-b", str(bundle),
            "-p", str(persist_dir / "pidfile"),
            "-P", str(persist_dir / "conmon.pid"),
            "-l", f"k8s-file:{log_path}",
            "--exit-dir", str(exit_dir),
            "--persist-dir", str(persist_dir),
            "--socket-dir-path", str(self.socket_dir),
            "--log-level", self.log_level,
            "--syslog",
        ]  # fmt: skip
        if log_max_size is not None and log_max_size > 0:
            argv += ["--log-size-max", str(log_max_size)]
        if terminal:
            argv.append("-t")
        elif stdin:
            argv.append("-i")
            if not stdin_once:
                argv.append("--leave-stdin-open")
        return argv

    async def create(
        self,
        cid: str,
        bundle: Path,
        *,
        log_path: Path,
        exit_dir: Path,
        persist_dir: Path,
        terminal: bool = False,
        stdin: bool = False,
        stdin_once: bool = False,
        log_max_size: int | None = None,
        timeout: float = CREATE_TIMEOUT,
    ) -> int:
        """Run `runc create` for the bundle under a new conmon; return the container's host pid.

        The container is then created, not started: call `runc.start(cid)`.
        runc's refusal (a bad config.json, say) is a `CommandFailed` carrying
        runc's message, with nothing left behind.
        """
        if not os.path.isabs(self.runc.binary) or not os.path.isabs(self.binary):
            raise Unavailable(f"{self.binary} or {self.runc.binary} is not installed (run `tandem doctor`)")
        for d in (exit_dir, persist_dir, self.socket_dir, log_path.parent):
            d.mkdir(parents=True, exist_ok=True)
        argv = self._argv(cid, bundle, log_path, exit_dir, persist_dir, terminal, stdin, stdin_once, log_max_size)
        try:
            return await asyncio.wait_for(self._spawn(cid, argv, persist_dir), timeout)
        except BaseException as e:
            await self._abandon(cid, persist_dir)
            if isinstance(e, TimeoutError):
                raise DeadlineExceeded(f"conmon did not create container {cid} within {timeout:g}s") from None
            raise

    async def _spawn(self, cid: str, argv: list[str], persist_dir: Path) -> int:
        """Start conmon with the sync pipe as fd `_OCI_SYNCPIPE`; read `{"data": pid}` or `{"data": -1, "message"}`."""
        sync_r, sync_w = os.pipe()
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "_OCI_SYNCPIPE": str(sync_w)}
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(sync_r, "rb", buffering=0)
        )
        try:
            try:
                # conmon's first process forks the monitor and exits; the monitor replaces the
                # stdio we give it with /dev/null, so these pipes only ever carry early errors.
                proc = await spawn(
                    argv,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    pass_fds=(sync_w,),
                    start_new_session=True,
                    env=env,
                    cwd=persist_dir,
                )
            finally:
                os.close(sync_w)
            early, _ = await proc.communicate()
            if proc.returncode != 0:
                raise CommandFailed(argv, proc.returncode or 0, early.decode(errors="replace"))
            line = await reader.readline()
        finally:
            transport.close()
        try:
            reply = json.loads(line)
            pid = int(reply["data"])
        except (ValueError, KeyError, TypeError):
            detail = early.decode(errors="replace").strip() or "no reply on the sync pipe"
            raise CommandFailed(argv, 1, f"conmon exited before reporting container {cid}: {detail}") from None
        if pid <= 0:
            message = _runc_message(str(reply.get("message", ""))) or "runc create failed"
            raise CommandFailed([self.runc.binary, "create", cid], 1, message)
        # conmon wrote its pidfile before it ran runc, and stays to watch the container: it is this process
        monitor = _pidfile_process(persist_dir)
        if monitor is not None:
            monitor.save(persist_dir / "conmon.identity")
        log.debug("container created", extra={"cid": cid, "pid": pid})
        return pid

    async def _abandon(self, cid: str, persist_dir: Path) -> None:
        """Undo a create that failed or was cancelled: stop its conmon (its runc dies with it), forget the container."""
        if (monitor := _pidfile_process(persist_dir)) is not None and (pidfd := monitor.open()) is not None:
            try:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            finally:
                os.close(pidfd)
        try:
            await self.runc.delete(cid, force=True)
        except Exception as e:  # cleanup after a failure must not mask it
            log.warning("cleanup after failed create", extra={"cid": cid, "error": str(e)})
        self.remove_attach_link(cid)

    async def reopen_log(self, bundle: Path, log_path: Path, timeout: float = 5.0) -> None:
        """Make conmon reopen the container's log, as the kubelet asks after renaming it for rotation.

        conmon recreates `log_path` (new inode) and writes on there; this waits
        until that new file is in place.
        """
        old = _inode(log_path)
        try:
            fd = os.open(bundle / "ctl", os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENXIO):  # no fifo, or nobody reading it: conmon is gone
                raise FailedPrecondition(f"no conmon is running for the container in {bundle}") from e
            raise
        try:
            os.write(fd, _REOPEN_LOGS)
        finally:
            os.close(fd)
        deadline = time.monotonic() + timeout
        while (new := _inode(log_path)) is None or new == old:
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"conmon did not reopen {log_path} within {timeout:g}s")
            await asyncio.sleep(_POLL)


def _pidfile_process(persist_dir: Path) -> ProcessIdentity | None:
    """The process conmon's own pidfile names, now: only right after the create is that surely conmon."""
    try:
        return ProcessIdentity.of(int((persist_dir / "conmon.pid").read_text().strip()))
    except (OSError, ValueError):
        return None


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None
