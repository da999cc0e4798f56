"""runc's command line, with its failures turned into domain errors.

Every call passes `--root`, so Tandem's containers live in their own state
directory and neither see nor disturb anyone else's runc containers. Creating a
container is not here: it happens under conmon (see `conmon.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal as signals
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from core.errors import CommandFailed, DeadlineExceeded, FailedPrecondition, NotFound
from core.proc import ProcessIdentity, run, spawn
from sandbox.backend import ExecResult
from sandbox.oci.model import Resources

log = logging.getLogger("tandem.runc")

MAX_EXEC_OUTPUT = 16 * 2**20
"""Bytes of each of stdout and stderr that `exec_sync` returns (CRI-O's limit too); the rest is dropped."""

_KILL_GRACE = 5.0  # seconds runc exec gets to exit once its process tree is dead
_NOT_FOUND = "does not exist"
_NOT_RUNNING = ("not running", "process already finished", "no such process")


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            table[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return table


def _pipes(pid: int) -> set[str]:
    """The pipes `pid` has open, as their `pipe:[inode]` names."""
    found = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if (target := os.readlink(f"/proc/{pid}/fd/{fd}")).startswith("pipe:"):
                    found.add(target)
    return found


def _exec_processes(runc_pid: int, pipes: set[str]) -> set[int]:
    """An exec's processes: everything below `runc exec`, and whatever still holds its output pipes.

    The second part catches children orphaned to the container's init that
    inherited stdout: runc waits for them, as it copies output until EOF.
    """
    parents = _parents()
    found = {pid for pid in parents if pid != runc_pid and pipes & _pipes(pid)}
    todo = [runc_pid, *found]
    while todo:
        parent = todo.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                todo.append(pid)
    return found


def _kill_exec(runc_pid: int) -> None:
    """SIGKILL an exec's processes; stop them first so none can fork a new one past us."""
    pipes = _pipes(runc_pid)
    stopped: set[int] = set()
    while new := _exec_processes(runc_pid, pipes) - stopped:
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signals.SIGSTOP)
        stopped |= new
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signals.SIGKILL)


class _ExecFiles:
    """A private temp dir for one exec: process.json, runc's pid file, and the captured stdout/stderr."""

    def __init__(self, process: dict[str, Any]) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="tandem-exec-")
        base = Path(self._tmp.name)
        self.spec, self.pid_file = base / "process.json", base / "pid"
        self._out, self._err = base / "stdout", base / "stderr"
        self.spec.write_text(json.dumps(process))

    def __enter__(self) -> _ExecFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()

    def open_outputs(self) -> tuple[IO[bytes], IO[bytes]]:
        return open(self._out, "wb"), open(self._err, "wb")

    def started(self) -> bool:
        """Whether runc started the process (it writes the pid file only then)."""
        return self.pid_file.exists()

    def output(self) -> tuple[bytes, bytes]:
        with open(self._out, "rb") as out, open(self._err, "rb") as err:
            return out.read(MAX_EXEC_OUTPUT), err.read(MAX_EXEC_OUTPUT)


class Runc:
    """One runc state directory (`--root`) and the containers in it."""

    def __init__(self, root: Path, binary: str = "runc") -> None:
        self.root = root
        self.binary = shutil.which(binary) or binary

    def _argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.root), *args]

    async def _run(self, cid: str, *args: str, input: bytes | None = None) -> bytes:
        """Run a runc subcommand about `cid`; "container does not exist" becomes `NotFound`."""
        try:
            return (await run(self._argv(*args), input=input)).stdout
        except CommandFailed as e:
            if _NOT_FOUND in e.stderr:
                raise NotFound(f"runc has no container {cid!r}") from e
            raise

    async def state(self, cid: str) -> dict[str, Any] | None:
        """runc's view (`status`: created, running, paused, stopped; `pid`), or None when runc doesn't know `cid`."""
        try:
            return json.loads(await self._run(cid, "state", cid))
        except NotFound:
            return None

    async def start(self, cid: str) -> None:
        """Start a created container's process (it was waiting in `runc init` since create)."""
        try:
            await self._run(cid, "start", cid)
        except CommandFailed as e:
            raise FailedPrecondition(f"cannot start container {cid}: {e}") from e

    async def kill(self, cid: str, signal: int, all_processes: bool = False) -> None:
        """Send `signal` to the container's init (or, with `all_processes`, to every process in it).

        A container that has already stopped is not an error: stopping races with exiting.
        """
        args = ["kill", "--all"] if all_processes else ["kill"]
        try:
            await self._run(cid, *args, cid, str(int(signal)))
        except CommandFailed as e:
            if not any(s in e.stderr for s in _NOT_RUNNING):
                raise

    async def delete(self, cid: str, force: bool = False) -> None:
        """Forget the container and remove its cgroup leaf; `force` kills it first. Unknown `cid` is success."""
        if await asyncio.to_thread(self._delete_stopped, cid):
            return
        try:
            await self._run(cid, "delete", *(["--force"] if force else []), cid)
        except NotFound:
            pass
        except CommandFailed as e:
            raise FailedPrecondition(f"cannot delete container {cid}: {e}") from e

    def kill_cgroup(self, cid: str, timeout: float = 1.0) -> bool:
        """SIGKILL every process in the container's cgroup without running runc: whether that was possible.

        What `runc kill --all` does, less the freezing: rounds of reading
        cgroup.procs and killing what is new, until a round finds nothing new
        (a killed process forks no more; children made before are in the next
        read). False (the caller falls back to runc) without runc's state or
        past `timeout` seconds.
        """
        try:
            paths = json.loads((self.root / cid / "state.json").read_text())["cgroup_paths"] or {}
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return False
        path = paths.get("pids") or paths.get("memory") or paths.get("")
        if not path:
            return False
        procs = Path(path) / "cgroup.procs"
        deadline = time.monotonic() + timeout
        killed: set[int] = set()
        while True:
            try:
                found = {int(p) for p in procs.read_text().split()}
            except FileNotFoundError:
                return True
            if not (new := found - killed):
                return True
            for pid in new:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signals.SIGKILL)
            killed |= new
            if time.monotonic() > deadline:
                return False

    def _delete_stopped(self, cid: str) -> bool:
        """What `runc delete` does for a stopped container, without running runc (~20 ms): whether it did it.

        Only when nothing of the container is left: its init is dead (pid and
        start time of runc's state), it has no hooks nor RDT group, and each of
        its cgroups can be removed (an rmdir fails while any process remains).
        Otherwise the caller leaves it to runc.
        """
        state_dir = self.root / cid
        try:
            state = json.loads((state_dir / "state.json").read_text())
            pid, started = int(state["init_process_pid"]), int(state["init_process_start"])
        except FileNotFoundError:
            return not state_dir.exists()  # unknown to runc: nothing to delete
        except (ValueError, KeyError, TypeError):
            return False
        if (state.get("config") or {}).get("hooks") or state.get("intel_rdt_path"):
            return False
        if ProcessIdentity(pid, started).exists():
            return False  # still running (or a zombie not yet reaped)
        for path in sorted(set((state.get("cgroup_paths") or {}).values())):
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError:
                return False
        shutil.rmtree(state_dir, ignore_errors=True)
        return True

    async def update(self, cid: str, resources: Resources) -> None:
        """Apply an OCI `linux.resources` object to the running container (`runc update -r -`)."""
        await self._run(cid, "update", "--resources", "-", cid, input=json.dumps(resources).encode())

    async def exec_sync(self, cid: str, process: dict[str, Any], timeout: float) -> ExecResult:
        """Run `process` (an OCI process object) in the container and collect its output and exit code.

        A non-zero exit is a result, not an error. Like `docker exec` and
        containerd, this returns once the command exited *and* everything that
        inherited its stdout/stderr closed them (runc copies output until EOF):
        a background child that keeps stdout open runs into the timeout.

        Past `timeout` seconds (none when <= 0) the exec'd process, its
        descendants and any process still holding its output are killed and
        `DeadlineExceeded` is raised, so nothing is left running (critest
        checks). Killed orphans the container's init does not reap stay zombies.

        This does not use `core.proc.run` but `spawn`: run's timeout kills runc alone, which
        leaves the command running in the container, while finding the exec's
        processes needs runc alive (its pid and pipes); and output is capped on
        disk instead of being buffered whole in memory.
        """
        with _ExecFiles(process) as files:
            argv = self._argv("exec", "--process", str(files.spec), "--pid-file", str(files.pid_file), cid)
            out, err = files.open_outputs()
            try:
                proc = await spawn(argv, stdout=out, stderr=err)
            finally:
                out.close()
                err.close()
            try:
                code = await asyncio.wait_for(proc.wait(), timeout if timeout > 0 else None)
            except (TimeoutError, asyncio.CancelledError) as e:
                await self._end_exec(proc)
                if isinstance(e, TimeoutError):
                    raise DeadlineExceeded(f"command in container {cid} timed out after {timeout:g}s") from None
                raise
            stdout, stderr = files.output()
            if not files.started():
                # runc itself failed (exit 255) before the process started: stderr is runc's.
                message = stderr.decode(errors="replace")
                if _NOT_FOUND in message:
                    raise NotFound(f"runc has no container {cid!r}")
                if "stopped container" in message or "not running" in message:
                    raise FailedPrecondition(f"container {cid} is not running")
                raise CommandFailed(argv, code, message)
            return ExecResult(code, stdout, stderr)

    @staticmethod
    async def _end_exec(proc: asyncio.subprocess.Process) -> None:
        """Kill the exec's processes, then runc itself if it lingers, and reap it."""
        _kill_exec(proc.pid)
        try:
            await asyncio.wait_for(proc.wait(), _KILL_GRACE)
        except TimeoutError:
            proc.kill()
            await proc.wait()
