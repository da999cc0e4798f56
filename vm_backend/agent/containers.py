"""Containers inside the guest, run by an OCI runtime with runc's command line (crun in the guest).

crun, not runc: under TCG every process start pays for translating its code, and
runc's Go runtime starts three times per container (create, init, start): 1.3 s
against crun's 0.4 s for a CreateContainer in the guest. The host's runc drives the
agent in the agent's own tests.

CreateContainer only checks the spec and writes the bundle; StartContainer runs
the runtime once, `run --detach` (create and start in one process), as
containerd's CRI plugin makes its task only at StartContainer. Under TCG each
runtime process costs ~0.1-0.2 s, and a created container costs nothing in the
guest until it starts. What moves: errors the runtime finds (a mount that fails,
an executable that is missing) surface at StartContainer, which the host records
as a start error (EXITED, reason StartError, as containerd does); the specs the
host sends carry no OCI hooks (CRI has none), so no hook runs at another time.

Files under the run dir (default /run/tandem):
  share/                     the pod's shared directory (virtio-fs); container rootfs paths are relative to it
  bundles/<id>/config.json   the host's spec with root.path rewritten to share/<rootfs>
  bundles/<id>/runtime.log   the runtime's own log, kept out of the container's stdio
  oci/                       the runtime's state root (`--root`)
  sock/                      console sockets for terminal processes (short paths)

Every process (a container's init, an exec) is started detached, with its stdio
wired straight to the agent: pipes, or a pty whose master the runtime hands over
on a console socket. Being a subreaper, the agent reaps the process itself; its exit
becomes a ProcessExited event once its output has reached EOF, so output always
precedes the exit. A streaming exec's output goes out only within the host's
credit (`flow.Gate`); a container's own output is bounded by the event log.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import itertools
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import struct
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protos import agent_pb2

from .cgroup import cgroup2_root, container_stats, oom_killed
from .errors import Fail
from .events import EventLog
from .flow import Gate
from .framing import EXEC_OUTPUT_LIMIT
from .process import Process
from .procs import (
    Reaper,
    input_pipe,
    kill_tree,
    output_pipe,
    pipe_names,
    read_fd,
    receive_fd,
    run,
    spawn,
    write_all,
)
from .runtime_errors import code_for, logged_error, runtime_message

log = logging.getLogger("tandem.agent.containers")

CREATE_TIMEOUT = 240.0  # seconds for `create` (CRI-O's ContainerCreateTimeout; TCG is slow)
RUNTIME_TIMEOUT = 60.0
REMOVE_WAIT = 10.0
MODULES_LOADING = Path("/run/tandem-modules-loading")
"""Exists while the guest's init loads the kernel modules nothing needs before the agent answers (bridge,
overlay, ...): StartContainer waits for them, a container may need one. Never there outside a guest."""
MODULES_WAIT = 30.0

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")

OutputSink = Callable[["agent_pb2.OutputStream", bytes], None]  # (stream, data)


def _check_id(value: str, what: str) -> None:
    if not _ID.fullmatch(value):
        raise Fail(agent_pb2.INVALID_ARGUMENT, f"invalid {what} {value!r}")


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError as e:
        raise Fail(agent_pb2.INVALID_ARGUMENT, f"{what} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise Fail(agent_pb2.INVALID_ARGUMENT, f"{what} is not a JSON object")
    return value


@dataclass(eq=False)
class Container:
    id: str
    bundle: Path
    terminal: bool = False
    stdin: bool = False
    init: Process | None = None  # None until StartContainer ran it
    cgroup: Path | None = None
    execs: dict[str, Process] = field(default_factory=dict)
    starting: set[str] = field(default_factory=set)  # exec ids being started
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Containers:
    """Every container in the guest, by id."""

    def __init__(self, *, run_dir: Path, runtime: str, reaper: Reaper, events: EventLog) -> None:
        self.share_dir = run_dir / "share"
        self.bundles = run_dir / "bundles"
        self.runtime_root = run_dir / "oci"
        self.sock_dir = run_dir / "sock"
        self.runtime = runtime
        self.runtime_name = os.path.basename(runtime)
        self.reaper = reaper
        self.events = events
        self.cgroup_root = cgroup2_root()
        self._containers: dict[str, Container] = {}
        self._counter = itertools.count(1)

    # ------------------------------------------------------------------ lifecycle

    async def create(self, request: agent_pb2.CreateContainer) -> None:
        """Check the spec and write the bundle: the runtime runs at `start` (the module's docstring says why)."""
        cid = request.container_id
        _check_id(cid, "container id")
        spec = _json_object(request.oci_spec_json, "the OCI spec")
        if not isinstance(spec.get("root"), dict) or not isinstance(spec.get("process"), dict):
            raise Fail(agent_pb2.INVALID_ARGUMENT, "the OCI spec has no root or process object")
        spec["root"]["path"] = str(self._rootfs(request.rootfs))
        spec["process"]["terminal"] = request.terminal
        bundle = self.bundles / cid
        if cid in self._containers or bundle.exists():
            raise Fail(agent_pb2.ALREADY_EXISTS, f"container {cid} already exists")
        try:
            bundle.mkdir(parents=True)
            (bundle / "config.json").write_text(json.dumps(spec))
        except BaseException:
            shutil.rmtree(bundle, ignore_errors=True)
            raise
        self._containers[cid] = Container(cid, bundle, terminal=request.terminal, stdin=request.stdin)

    async def start(self, cid: str) -> None:
        container = self._created(cid)
        async with container.lock:
            if container.init is not None:
                raise Fail(agent_pb2.FAILED_PRECONDITION, f"container {cid} was started already")
            await _modules_loaded()
            try:
                process = await self._launch(
                    container,
                    "",
                    ["run", "--detach", "--bundle", str(container.bundle)],
                    container.bundle / "init.pid",
                    terminal=container.terminal,
                    stdin=container.stdin,
                    sink=self._emitter(cid, ""),
                    timeout=CREATE_TIMEOUT,
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    await self._delete(cid)
                raise
            container.init = process
            container.cgroup = self._cgroup_of(process.pid)
            process.monitor = asyncio.create_task(self._monitor(container, process))

    async def signal(self, request: agent_pb2.SignalProcess) -> None:
        if not 0 < request.signal < 65:
            raise Fail(agent_pb2.INVALID_ARGUMENT, f"invalid signal {request.signal}")
        container = self._created(request.container_id)
        if container.init is None:
            return  # created, never started: nothing runs that a signal could reach
        if request.process_id:
            process = self._process(container, request.process_id)
            if not process.exited.done():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, request.signal)
            return
        args = ["kill", "--all"] if request.all_processes else ["kill"]
        if not request.all_processes and container.init is not None and container.init.exited.done():
            return  # already stopped: stopping races with exiting
        try:
            await self._runtime_call(*args, container.id, str(request.signal))
        except Fail as e:
            if e.code != agent_pb2.FAILED_PRECONDITION:  # already stopped: stopping races with exiting
                raise

    async def remove(self, cid: str) -> None:
        """Kill the container if it runs, forget it, remove its bundle; an unknown id is success (idempotent)."""
        _check_id(cid, "container id")
        container = self._containers.get(cid)
        if container is None:
            await self._delete(cid)
            shutil.rmtree(self.bundles / cid, ignore_errors=True)
            return
        async with container.lock:
            await self._delete(cid)
            processes = [p for p in (container.init, *container.execs.values()) if p is not None]
            monitors = [p.monitor for p in processes if p.monitor is not None]
            if monitors:
                _, late = await asyncio.wait(monitors, timeout=REMOVE_WAIT)
                for task in late:
                    task.cancel()
            for process in processes:
                process.close()
            shutil.rmtree(container.bundle, ignore_errors=True)
            if self._containers.get(cid) is container:
                del self._containers[cid]

    async def remove_all(self) -> None:
        for cid in list(self._containers):
            try:
                await self.remove(cid)
            except Exception:
                log.exception("could not remove container %s", cid)

    async def update(self, request: agent_pb2.UpdateResources) -> None:
        container = self._created(request.container_id)
        resources = _json_object(request.resources_json, "resources")
        async with container.lock:
            if container.init is None:  # not started: the spec it will start with takes them
                config = container.bundle / "config.json"
                spec = json.loads(config.read_text())
                spec.setdefault("linux", {}).setdefault("resources", {}).update(resources)
                config.write_text(json.dumps(spec))
                return
            path = container.bundle / "resources.json"
            path.write_text(json.dumps(resources))
            await self._runtime_call("update", "--resources", str(path), container.id)

    # ------------------------------------------------------------------ exec

    async def exec_sync(self, request: agent_pb2.ExecSync) -> agent_pb2.ExecSyncResult:
        """Run a process to completion and return its output; past the timeout its whole tree is killed."""
        container = self._get(request.container_id)
        spec = _json_object(request.process_json, "the process")
        spec["terminal"] = False
        output = {agent_pb2.STDOUT: bytearray(), agent_pb2.STDERR: bytearray()}

        def collect(stream: agent_pb2.OutputStream, data: bytes) -> None:
            buffer = output[stream]
            buffer += data[: EXEC_OUTPUT_LIMIT - len(buffer)]

        timeout = request.timeout_ms / 1000 if request.timeout_ms else None
        process: Process | None = None
        try:
            async with asyncio.timeout(timeout):
                # "_" cannot start a host-chosen exec id, so its files cannot clash with a StartExec's
                name = f"_sync{next(self._counter)}"
                process = await self._exec(container, name, spec, False, False, collect)
                code = await asyncio.shield(process.exited)  # a timeout must not cancel the reaper's future
                await process.drain()
        except TimeoutError:
            if process is not None:
                kill_tree(process.pid, process.pipes)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(process.exited), 5.0)
            raise Fail(agent_pb2.DEADLINE_EXCEEDED, f"command timed out after {timeout:g}s") from None
        finally:
            if process is not None:
                process.close()
        return agent_pb2.ExecSyncResult(
            exit_code=code, stdout=bytes(output[agent_pb2.STDOUT]), stderr=bytes(output[agent_pb2.STDERR])
        )

    async def start_exec(self, request: agent_pb2.StartExec) -> None:
        container = self._get(request.container_id)
        _check_id(request.exec_id, "exec id")
        spec = _json_object(request.process_json, "the process")
        spec["terminal"] = request.terminal
        if request.exec_id in container.execs or request.exec_id in container.starting:
            raise Fail(agent_pb2.ALREADY_EXISTS, f"exec {request.exec_id} already exists in {container.id}")
        emit = self._emitter(container.id, request.exec_id)
        gates: dict[int, Gate] = {
            stream: Gate(request.window, functools.partial(emit, stream))
            for stream in (agent_pb2.STDOUT, agent_pb2.STDERR)
        }
        container.starting.add(request.exec_id)
        try:
            process = await self._exec(
                container, request.exec_id, spec, request.terminal, request.stdin, lambda s, d: gates[s].send(d)
            )
        finally:
            container.starting.discard(request.exec_id)
        process.gates = gates
        for stream, transport in process.transports.items():
            gates[stream].attach(transport)
        container.execs[request.exec_id] = process
        process.monitor = asyncio.create_task(self._monitor(container, process))

    def credit(self, request: agent_pb2.ExecCredit) -> None:
        """More credit for a streaming exec's output, or none needed any more (`discard`)."""
        process = self._process(self._get(request.container_id), request.exec_id)
        if not process.gates:
            raise Fail(agent_pb2.FAILED_PRECONDITION, f"process {request.exec_id!r} is not a streaming exec")
        for stream, limit in ((agent_pb2.STDOUT, request.stdout_limit), (agent_pb2.STDERR, request.stderr_limit)):
            if request.discard:
                process.gates[stream].discard()
            else:
                process.gates[stream].grant(limit)

    def abandon_execs(self) -> None:
        """The host that started the streaming execs is gone: their clients went with it."""
        for container in self._containers.values():
            for process in container.execs.values():
                process.abandon()

    async def _exec(
        self, container: Container, name: str, spec: dict[str, Any], terminal: bool, stdin: bool, sink: OutputSink
    ) -> Process:
        process_file = container.bundle / f"exec-{name}.json"
        pid_file = container.bundle / f"exec-{name}.pid"
        process_file.write_text(json.dumps(spec))
        try:
            return await self._launch(
                container,
                name,
                ["exec", "--detach", "--process", str(process_file)],  # the file's `terminal` decides
                pid_file,
                terminal=terminal,
                stdin=stdin,
                sink=sink,
                timeout=RUNTIME_TIMEOUT,
            )
        finally:
            process_file.unlink(missing_ok=True)
            pid_file.unlink(missing_ok=True)

    async def write_stdin(self, request: agent_pb2.WriteStdin) -> None:
        process = self._process(self._get(request.container_id), request.process_id)
        async with process.stdin_lock:
            fd = process.stdin_fd
            if fd is None:
                raise Fail(agent_pb2.FAILED_PRECONDITION, "the process has no open stdin")
            if request.data:
                try:
                    await write_all(fd, request.data)
                except OSError as e:  # EPIPE, or EIO on a pty: the process is gone
                    raise Fail(agent_pb2.FAILED_PRECONDITION, f"cannot write to the process's stdin: {e}") from None
            if request.close:
                process.stdin_fd = None
                if fd != process.console_fd:
                    os.close(fd)  # a pty stays open for output; only the pipe is closed

    def resize(self, request: agent_pb2.ResizeTerminal) -> None:
        process = self._process(self._get(request.container_id), request.process_id)
        if process.console_fd is None:
            raise Fail(agent_pb2.FAILED_PRECONDITION, "the process has no terminal")
        fcntl.ioctl(process.console_fd, termios.TIOCSWINSZ, struct.pack("HHHH", request.height, request.width, 0, 0))

    # ------------------------------------------------------------------ stats

    def pod_stats(self) -> agent_pb2.PodStats:
        """Every container's usage from its cgroup v2 files, by id; figures a cgroup lacks stay 0.

        A container appears once its cgroup is known (it was created). The writable layer is
        the host's (the rootfs comes over virtio-fs), so the host measures it.
        """
        return agent_pb2.PodStats(
            containers={
                cid: container_stats(container.cgroup)
                for cid, container in self._containers.items()
                if container.init is not None and container.cgroup is not None
            }
        )

    # ------------------------------------------------------------------ internals

    def _created(self, cid: str) -> Container:
        """A container CreateContainer made, started or not."""
        container = self._containers.get(cid)
        if container is None:
            raise Fail(agent_pb2.NOT_FOUND, f"no container {cid!r}")
        return container

    def _get(self, cid: str) -> Container:
        """A started container: processes can be run in it, written to, resized."""
        container = self._created(cid)
        if container.init is None:
            raise Fail(agent_pb2.FAILED_PRECONDITION, f"container {cid} is created, not started")
        return container

    @staticmethod
    def _process(container: Container, process_id: str) -> Process:
        process = container.execs.get(process_id) if process_id else container.init
        if process is None:
            raise Fail(agent_pb2.NOT_FOUND, f"no process {process_id!r} in container {container.id}")
        return process

    def _rootfs(self, rootfs: str) -> Path:
        """The rootfs inside the share: a relative path that must not climb out of it."""
        clean = posixpath.normpath(rootfs) if rootfs else ""
        if not clean or clean.startswith(("/", "..")) or clean == ".":
            raise Fail(agent_pb2.INVALID_ARGUMENT, f"rootfs {rootfs!r} must be a path inside the pod's shared dir")
        return self.share_dir / clean

    def _cgroup_of(self, pid: int) -> Path | None:
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            if line.startswith("0::") and self.cgroup_root is not None:
                return self.cgroup_root / line[3:].lstrip("/")
        return None

    def _emitter(self, cid: str, process_id: str) -> OutputSink:
        def emit(stream: agent_pb2.OutputStream, data: bytes) -> None:
            output = agent_pb2.Output(
                container_id=cid, process_id=process_id, stream=stream, data=data, timestamp_unix_ns=time.time_ns()
            )
            self.events.append(agent_pb2.Event(output=output))

        return emit

    async def _runtime_call(self, *args: str) -> None:
        argv = [self.runtime, "--root", str(self.runtime_root), *args]
        try:
            result = await run(self.reaper, argv, timeout=RUNTIME_TIMEOUT)
        except FileNotFoundError:
            raise Fail(agent_pb2.INTERNAL, f"{self.runtime} is not installed in the guest") from None
        except TimeoutError:
            message = f"{self.runtime_name} {args[0]} did not finish in {RUNTIME_TIMEOUT:g}s"
            raise Fail(agent_pb2.DEADLINE_EXCEEDED, message) from None
        if result.code != 0:
            message = runtime_message(result.stderr) or f"exit code {result.code}"
            raise Fail(code_for(message), f"{self.runtime_name} {args[0]}: {message}")

    async def _delete(self, cid: str) -> None:
        """Delete the runtime's container if it has one (both runtimes keep their state in <root>/<id>)."""
        if (self.runtime_root / cid).exists():
            await self._runtime_call("delete", "--force", cid)

    async def _launch(
        self,
        container: Container,
        process_id: str,
        args: list[str],
        pid_file: Path,
        *,
        terminal: bool,
        stdin: bool,
        sink: OutputSink,
        timeout: float,
    ) -> Process:
        """Run `run --detach` or `exec --detach` with the new process's stdio wired to us; return it started.

        The runtime's own log goes to the bundle, so its stdio carries only what
        the process writes, plus the runtime's final error line if it fails.
        """
        loop = asyncio.get_running_loop()
        ours: list[int] = []  # our ends: closed on failure
        theirs: list[int] = []  # the child's ends: closed once the runtime has them
        listener: socket.socket | None = None
        accepting: asyncio.Future[tuple[socket.socket, Any]] | None = None
        process: Process | None = None
        try:
            null = os.open(os.devnull, os.O_RDWR)
            theirs.append(null)
            err_r, err_w = output_pipe()
            ours.append(err_r)
            theirs.append(err_w)
            extra: list[str] = []
            if terminal:
                self.sock_dir.mkdir(parents=True, exist_ok=True)
                sock_path = self.sock_dir / f"{next(self._counter)}.sock"
                sock_path.unlink(missing_ok=True)
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(str(sock_path))
                listener.listen(1)
                listener.setblocking(False)
                accepting = asyncio.ensure_future(loop.sock_accept(listener))
                extra = ["--console-socket", str(sock_path)]
                stdio, out_r, in_w = (null, null, err_w), -1, -1
            else:
                out_r, out_w = output_pipe()
                ours.append(out_r)
                theirs.append(out_w)
                in_r, in_w = input_pipe() if stdin else (null, -1)
                if stdin:
                    ours.append(in_w)
                    theirs.append(in_r)
                stdio = (in_r, out_w, err_w)
            pipes = frozenset() if terminal else pipe_names(out_r, err_r)
            log_path = container.bundle / "runtime.log"
            argv = [
                self.runtime, "--root", str(self.runtime_root), "--log", str(log_path), "--log-format", "json",
                *args, *extra, "--pid-file", str(pid_file), container.id,
            ]  # fmt: skip
            since = time.monotonic()
            try:
                runtime_pid = spawn(argv, *stdio)
            except FileNotFoundError:
                raise Fail(agent_pb2.INTERNAL, f"{self.runtime} is not installed in the guest") from None
            for fd in theirs:
                os.close(fd)
            theirs.clear()
            runtime_exited = self.reaper.watch(runtime_pid, since)
            name = f"{self.runtime_name} {args[0]}"
            try:
                code = await asyncio.wait_for(runtime_exited, timeout)
            except BaseException as e:  # the runtime and whatever it started must not outlive the request
                kill_tree(runtime_pid, pipes)
                if isinstance(e, TimeoutError):
                    raise Fail(agent_pb2.DEADLINE_EXCEEDED, f"{name} did not finish in {timeout:g}s") from None
                raise
            if code != 0:
                try:
                    message = runtime_message(os.read(err_r, 65536))
                except BlockingIOError:
                    message = ""
                message = message or logged_error(log_path)
                if not message.startswith(self.runtime_name):
                    message = f"{name} failed: {message or f'exit code {code}'}"
                raise Fail(code_for(message), message)
            pid = int(pid_file.read_text())
            process = Process(container.id, process_id, pid, self.reaper.watch(pid, since), pipes)
            if accepting is not None:
                connection, _ = await asyncio.wait_for(accepting, 10.0)
                with connection:
                    master = await receive_fd(connection)
                ours.append(master)
                process.console_fd = os.dup(master)
                if stdin:
                    process.stdin_fd = process.console_fd
                outputs = [(master, agent_pb2.STDOUT)]
                ours.remove(err_r)
                os.close(err_r)  # it carried the runtime's errors only
            else:
                outputs = [(out_r, agent_pb2.STDOUT), (err_r, agent_pb2.STDERR)]
                if stdin:
                    ours.remove(in_w)
                    process.stdin_fd = in_w
            for fd, stream in outputs:
                ours.remove(fd)  # the reader owns it from here
                reader = await read_fd(fd, functools.partial(sink, stream))
                process.readers.append(reader)
                process.transports[stream] = reader[0]
            return process
        except BaseException:
            if process is not None:  # started, but we could not take hold of its terminal
                kill_tree(process.pid, pipes)
            for fd in ours:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
            if accepting is not None and not accepting.done():
                accepting.cancel()
            if listener is not None:
                Path(listener.getsockname()).unlink(missing_ok=True)
                listener.close()

    async def _monitor(self, container: Container, process: Process) -> None:
        """Report the process's exit once its output is drained; forget an exec once reported."""
        code = await process.exited
        finished = time.time_ns()
        await process.drain()
        oom = False
        if not process.process_id and container.cgroup is not None:
            oom = oom_killed(container.cgroup)
        exited = agent_pb2.ProcessExited(
            container_id=container.id,
            process_id=process.process_id,
            exit_code=code,
            finished_unix_ns=finished,
            oom_killed=oom,
        )
        self.events.append(agent_pb2.Event(process_exited=exited))
        if process.process_id:
            process.close()
            container.execs.pop(process.process_id, None)


async def _modules_loaded() -> None:
    """Until the guest's late kernel modules are in (at most MODULES_WAIT: without them most containers run)."""
    deadline = time.monotonic() + MODULES_WAIT
    while MODULES_LOADING.exists():
        if time.monotonic() > deadline:
            log.warning("kernel modules still loading after %gs: starting the container anyway", MODULES_WAIT)
            return
        await asyncio.sleep(0.05)
