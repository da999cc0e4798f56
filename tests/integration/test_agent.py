"""The guest agent for real, but on the host: `python -m vm_backend.agent --socket` with upb protobuf as in the guest,
driving this host's runc against a busybox rootfs (the guest runs crun: same command line), talked to through
`AgentClient`.

SetupPod runs with `--dry-setup` (it must not rename the host's NICs or set its
clock). Containers get new pid/ipc/uts/mount namespaces but share the host's
network namespace, so port-forwarding to 127.0.0.1 reaches them. Each test gets
its own run dir and cgroup parent; teardown shuts the agent down and fails the
test if a container, process or cgroup outlived it (after removing them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from core import cgroups, errors
from protos import agent_pb2 as pb
from tests.support.wait import eventually
from vm_backend.agent.framing import Decoder
from vm_backend.channel import INTAKE_BYTES, AgentClient, AgentError
from vm_backend.events import PodEvents
from vm_backend.flow import WINDOW as WINDOW_HOST
from vm_backend.processes import VmExec

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PATH_ENV = "PATH=/bin"
IDLE = ["sleep", "1000"]
WINDOW = 2**20  # credit for the few bytes the exec and port tests move


def busybox_rootfs(root: Path) -> None:
    for d in ("bin", "proc", "dev", "sys", "tmp", "etc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")


def process(args: list[str], terminal: bool = False) -> dict[str, Any]:
    return {"terminal": terminal, "user": {"uid": 0, "gid": 0}, "args": args, "env": [PATH_ENV], "cwd": "/"}


def spec(args: list[str], cgroups_path: str, terminal: bool = False) -> dict[str, Any]:
    """A minimal spec as the host would send it; root.path is the agent's to fill in. No network namespace."""
    return {
        "ociVersion": "1.0.2",
        "process": process(args, terminal),
        "root": {"path": "replaced-by-the-agent", "readonly": True},
        "hostname": "agent-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
            "cgroupsPath": cgroups_path,
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        },
    }


class Events:
    """The client's event callback: keeps every event and wakes waiters."""

    def __init__(self) -> None:
        self.items: list[pb.Event] = []
        self.watchers: list[Callable[[pb.Event], None]] = []
        self._changed = asyncio.Event()

    def __call__(self, event: pb.Event) -> None:
        self.items.append(event)
        for watch in self.watchers:
            watch(event)
        self._changed.set()

    async def wait_for(self, check: Callable[[], Any], timeout: float = 15.0) -> Any:
        async with asyncio.timeout(timeout):
            while not (result := check()):
                self._changed.clear()
                await self._changed.wait()
        return result

    def output(self, cid: str, process_id: str = "", stream: int | None = None) -> bytes:
        return b"".join(
            e.output.data
            for e in self.items
            if e.HasField("output")
            and e.output.container_id == cid
            and e.output.process_id == process_id
            and (stream is None or e.output.stream == stream)
        )

    def exit_of(self, cid: str, process_id: str = "") -> pb.ProcessExited | None:
        for e in self.items:
            if e.HasField("process_exited") and (e.process_exited.container_id, e.process_exited.process_id) == (
                cid,
                process_id,
            ):
                return e.process_exited
        return None

    async def exit(self, cid: str, process_id: str = "") -> pb.ProcessExited:
        return await self.wait_for(lambda: self.exit_of(cid, process_id))

    def port_eof(self, stream_id: str) -> bool:
        return any(e.port_data.eof for e in self.items if e.port_data.stream_id == stream_id)

    def port(self, stream_id: str) -> tuple[bytes, pb.PortClosed | None]:
        data = b"".join(e.port_data.data for e in self.items if e.port_data.stream_id == stream_id)
        closed = [
            e.port_closed for e in self.items if e.HasField("port_closed") and e.port_closed.stream_id == stream_id
        ]
        return data, closed[0] if closed else None


@dataclass
class Harness:
    run_dir: Path
    socket: Path
    parent: str  # cgroup parent of every container of the test
    agent: subprocess.Popen[bytes]
    events: Events
    client: AgentClient
    clients: list[AgentClient] = field(default_factory=list)

    def cgroups_path(self, cid: str) -> str:
        return f"{self.parent}/{cid}"

    async def create(self, args: list[str], *, terminal: bool = False, stdin: bool = False) -> str:
        cid = f"c{secrets.token_hex(6)}"
        await self.client.create_container(
            cid, spec(args, self.cgroups_path(cid), terminal), "rootfs", terminal=terminal, stdin=stdin
        )
        return cid

    async def run(self, args: list[str], **options: Any) -> str:
        cid = await self.create(args, **options)
        await self.client.start_container(cid)
        return cid

    async def connect(self, path: Path | None = None, **options: Any) -> tuple[AgentClient, Events]:
        """Another client (as after a daemon restart), closed at teardown."""
        events = Events()
        client = AgentClient(path or self.socket, events, **options)
        self.clients.append(client)
        await client.start(10)
        return client, events

    def runc(self, *args: str) -> str:
        return subprocess.run(
            ["runc", "--root", str(self.run_dir / "oci"), *args], capture_output=True, text=True, check=True
        ).stdout

    def runc_list(self) -> list[str]:
        return self.runc("list", "-q").split()


def removed(parent: str) -> bool:
    try:
        cgroups.remove(parent)
    except errors.FailedPrecondition:
        return False
    return True


def stopped(h: Harness, cid: str) -> bool:
    """The container's process has exited (runc's view; the agent may not have reported it yet)."""
    return json.loads(h.runc("state", cid))["status"] == "stopped"


def processes_in(parent: str) -> list[int]:
    """Processes in any cgroup below `parent`, in any hierarchy."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/cgroup").read_text()
            except OSError:
                continue
            if f"{parent}/" in text:
                found.append(int(entry))
    return found


def start_agent(sock: Path, run_dir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """The agent as the guest runs it, but on a socket, with the host's runc, and SetupPod dry."""
    env = dict(os.environ, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="upb")
    with open(log_path, "wb") as agent_log:
        return subprocess.Popen(
            [sys.executable, "-m", "vm_backend.agent", "--socket", str(sock), "--run-dir", str(run_dir),
             "--runtime", "runc", "--dry-setup", "--log-level", "debug"],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=agent_log, stderr=agent_log, start_new_session=True,
        )  # fmt: skip


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    run_dir = Path(tempfile.mkdtemp(prefix="ta-", dir="/tmp"))  # console socket paths must stay short
    busybox_rootfs(run_dir / "share" / "rootfs")
    sock = run_dir / "agent.sock"
    agent = start_agent(sock, run_dir, tmp_path / "agent.log")
    events = Events()
    client = AgentClient(sock, events)
    h = Harness(run_dir, sock, f"/tandem-agent-test-{secrets.token_hex(4)}", agent, events, client)
    try:
        await client.start(30)
        yield h
    finally:
        for c in [client, *h.clients]:
            await c.close()
        leaks: list[str] = []
        if agent.poll() is None:
            shutting = AgentClient(sock, lambda event: None)
            with contextlib.suppress(errors.TandemError):
                await shutting.start(10)
                await shutting.shutdown()
            await shutting.close()
        try:
            await asyncio.to_thread(agent.wait, 15)
        except subprocess.TimeoutExpired:
            leaks.append("the agent did not exit on Shutdown")
            agent.kill()
            agent.wait()
        for cid in h.runc_list():
            leaks.append(f"runc container {cid}")
            with contextlib.suppress(subprocess.CalledProcessError):
                h.runc("delete", "--force", cid)
        for pid in processes_in(h.parent):
            leaks.append(f"process {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:  # killed processes take a moment to leave their cgroups
            await eventually(lambda: removed(h.parent), 5, f"cgroup {h.parent} to go")
        except AssertionError:
            leaks.append(f"cgroup {h.parent}")
        leaks += [f"bundle {b}" for b in os.listdir(run_dir / "bundles")] if (run_dir / "bundles").exists() else []
        shutil.rmtree(run_dir, ignore_errors=True)
        print((tmp_path / "agent.log").read_text(errors="replace")[-5000:])
        assert not leaks, f"left behind: {leaks}"
        assert agent.returncode == 0, f"agent exited with {agent.returncode}"


def lines(data: bytes) -> list[str]:
    return data.decode().splitlines()


# ---------------------------------------------------------------- containers


async def test_output_then_exit_in_order(harness: Harness) -> None:
    cid = await harness.run(["sh", "-c", "echo out1; echo err1 >&2; echo out2; exit 7"])
    exited = await harness.events.exit(cid)
    assert exited.exit_code == 7 and exited.finished_unix_ns > 0 and not exited.oom_killed
    assert harness.events.output(cid, stream=pb.STDOUT) == b"out1\nout2\n"
    assert harness.events.output(cid, stream=pb.STDERR) == b"err1\n"
    ours = [e for e in harness.events.items if e.output.container_id == cid or e.process_exited.container_id == cid]
    assert ours[-1].HasField("process_exited")  # output first, the exit last
    assert [e.seq for e in ours] == sorted(e.seq for e in ours)
    assert all(0 < e.output.timestamp_unix_ns <= exited.finished_unix_ns for e in ours[:-1])


async def test_terminal_container(harness: Harness) -> None:
    cid = await harness.run(["sh", "-c", "tty; echo done"], terminal=True)
    assert (await harness.events.exit(cid)).exit_code == 0
    out = harness.events.output(cid)
    assert b"/dev/pts/" in out and b"done\r\n" in out  # a pty: \n becomes \r\n


async def test_create_errors(harness: Harness) -> None:
    cid = await harness.create(IDLE)
    assert harness.runc_list() == []  # created, not started: the runtime runs at StartContainer
    with pytest.raises(errors.AlreadyExists):
        await harness.client.create_container(cid, spec(IDLE, harness.cgroups_path(cid)), "rootfs")
    with pytest.raises(errors.FailedPrecondition, match="not started"):
        await harness.client.exec_sync(cid, process(["true"]), 10)
    missing = await harness.create(["/bin/no-such-program"])
    with pytest.raises(AgentError, match="no-such-program"):  # the runtime finds it missing when it runs
        await harness.client.start_container(missing)
    with pytest.raises(errors.NotFound):
        await harness.client.start_container("c-unknown")
    for created in (cid, missing):
        await harness.client.remove_container(created)
    assert harness.runc_list() == []
    assert os.listdir(harness.run_dir / "bundles") == []


async def test_a_created_container_takes_signals_and_resources_before_it_starts(harness: Harness) -> None:
    cid = await harness.create(IDLE)
    await harness.client.signal(cid, signal.SIGKILL)  # nothing runs yet: nothing to kill, and no error
    await harness.client.update_resources(cid, {"pids": {"limit": 77}})
    assert cid not in await harness.client.pod_stats(timeout=10)  # no cgroup until it starts
    await harness.client.start_container(cid)
    assert cid in await harness.client.pod_stats(timeout=10)
    pids_dir = "" if cgroups.detect_mode() == "v2" else "pids"
    pids_max = Path(cgroups.CGROUP_ROOT) / pids_dir / harness.cgroups_path(cid).lstrip("/") / "pids.max"
    assert pids_max.read_text().strip() == "77"  # the spec it started with had them
    with pytest.raises(errors.FailedPrecondition, match="started already"):
        await harness.client.start_container(cid)


async def test_remove_leaves_nothing(harness: Harness) -> None:
    cid = await harness.run(IDLE)
    await harness.client.start_exec(cid, "e1", process(IDLE), window=WINDOW)
    pid = json.loads(harness.runc("state", cid))["pid"]
    await harness.client.remove_container(cid)
    assert (await harness.events.exit(cid)).exit_code == 128 + signal.SIGKILL
    await harness.events.exit(cid, "e1")
    assert harness.runc_list() == []
    assert not (harness.run_dir / "bundles" / cid).exists()
    assert not Path(f"/proc/{pid}").exists()
    assert processes_in(harness.parent) == []
    assert [h for h in cgroups.hierarchies() if (h / harness.cgroups_path(cid).lstrip("/")).exists()] == []
    await harness.client.remove_container(cid)  # again: idempotent
    assert cid not in await harness.client.pod_stats(10)


async def test_shutdown_stops_everything(harness: Harness) -> None:
    await harness.run(IDLE)
    await harness.client.shutdown()
    assert await asyncio.to_thread(harness.agent.wait, 15) == 0
    assert harness.runc_list() == []
    assert processes_in(harness.parent) == []


# ---------------------------------------------------------------- exec


async def test_exec_sync(harness: Harness) -> None:
    cid = await harness.run(IDLE)
    result = await harness.client.exec_sync(cid, process(["sh", "-c", "echo hi; echo oops >&2; exit 3"]), 10)
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"hi\n", b"oops\n")
    big = await harness.client.exec_sync(cid, process(["sh", "-c", "head -c 300000 /dev/zero"]), 10)
    assert big.exit_code == 0 and big.stdout == b"\0" * 300000

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(errors.DeadlineExceeded):
        await harness.client.exec_sync(cid, process(["sh", "-c", "sleep 30 & sleep 31"]), 1)
    assert loop.time() - started < 10
    ps = await harness.client.exec_sync(cid, process(["ps", "-o", "args"]), 10)
    assert b"sleep 3" not in ps.stdout  # the timed-out command's whole tree is gone

    with pytest.raises(errors.NotFound):
        await harness.client.exec_sync("c-unknown", process(["true"]), 10)
    assert harness.events.exit_of(cid) is None  # execs never touch the container's own events


async def test_streaming_exec(harness: Harness) -> None:
    cid = await harness.run(IDLE)
    await harness.client.start_exec(
        cid, "e1", process(["sh", "-c", "read x; echo got $x; echo bye >&2; exit 5"]), stdin=True, window=WINDOW
    )
    await harness.client.write_stdin(cid, "e1", b"hello\n", close=True)
    assert (await harness.events.exit(cid, "e1")).exit_code == 5
    assert harness.events.output(cid, "e1", pb.STDOUT) == b"got hello\n"
    assert harness.events.output(cid, "e1", pb.STDERR) == b"bye\n"
    with pytest.raises(errors.NotFound):  # gone once it exited
        await harness.client.write_stdin(cid, "e1", b"more")

    await harness.client.start_exec(
        cid, "t1", process(["sh", "-c", "read x; stty size"], True), terminal=True, stdin=True, window=WINDOW
    )
    await harness.client.resize_terminal(cid, "t1", width=100, height=40)
    await harness.client.write_stdin(cid, "t1", b"go\n")
    assert (await harness.events.exit(cid, "t1")).exit_code == 0
    assert b"40 100" in harness.events.output(cid, "t1")


# ---------------------------------------------------------------- signals, stats, resources


async def test_signal_stats_and_update(harness: Harness) -> None:
    script = (
        'i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; trap "exit 42" TERM; echo ready; while :; do sleep 0.1; done'
    )
    cid = await harness.run(["sh", "-c", script])
    await harness.events.wait_for(lambda: b"ready" in harness.events.output(cid))

    other = await harness.run(IDLE)
    every = await harness.client.pod_stats(10)
    assert set(every) == {cid, other}  # one round trip answers for every container of the pod
    stats = every[cid]
    assert stats.cpu_usage_ns > 0
    unified = cgroups.hierarchies()[0] if cgroups.detect_mode() == "v2" else Path(cgroups.CGROUP_ROOT) / "unified"
    leaf = unified / harness.cgroups_path(cid).lstrip("/")
    if (leaf / "memory.current").exists():  # a v2 memory controller (the guest's case; hybrid hosts lack it)
        assert stats.memory_usage_bytes > 0 and stats.memory_working_set_bytes > 0
    if (leaf / "pids.current").exists():
        assert stats.pids >= 1

    await harness.client.update_resources(cid, {"pids": {"limit": 77}})
    pids_dir = "" if cgroups.detect_mode() == "v2" else "pids"
    pids_max = Path(cgroups.CGROUP_ROOT) / pids_dir / harness.cgroups_path(cid).lstrip("/") / "pids.max"
    assert pids_max.read_text().strip() == "77"
    with pytest.raises(errors.InvalidArgument):
        await harness.client.call(
            pb.Request(update_resources=pb.UpdateResources(container_id=cid, resources_json=b"[1]"))
        )

    await harness.client.signal(cid, signal.SIGTERM)
    assert (await harness.events.exit(cid)).exit_code == 42
    await harness.client.signal(cid, signal.SIGTERM)  # stopped already: not an error
    with pytest.raises(errors.NotFound):
        await harness.client.signal("c-unknown", signal.SIGTERM)
    with pytest.raises(errors.InvalidArgument):
        await harness.client.signal(cid, 0)


# ---------------------------------------------------------------- port forwarding


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """Whether a TCP socket listens on `port` in this (the containers') network namespace; nothing connects."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:] + Path("/proc/net/tcp6").read_text().splitlines()[1:]
    return any(f":{port:04X}" == r.split()[1][-5:] and r.split()[3] == "0A" for r in rows)  # 0A: LISTEN


async def open_when_listening(client: AgentClient, stream_id: str, port: int) -> None:
    await eventually(lambda: listening(port), what=f"a listener on port {port}")
    await client.open_port(stream_id, port, window=WINDOW)


async def test_port_forward(harness: Harness) -> None:
    echo_port, hello_port = free_port(), free_port()
    echo = await harness.run(["nc", "-l", "-p", str(echo_port), "-e", "cat"])
    hello = await harness.run(["nc", "-l", "-p", str(hello_port), "-e", "echo", "hello"])

    await open_when_listening(harness.client, "s1", echo_port)
    await harness.client.write_port("s1", b"ping\n")
    await harness.events.wait_for(lambda: harness.events.port("s1")[0] == b"ping\n")
    await harness.client.close_port("s1")
    assert (await harness.events.exit(echo)).exit_code == 0  # cat saw EOF, nc ended

    await open_when_listening(harness.client, "s2", hello_port)
    await harness.events.wait_for(lambda: harness.events.port_eof("s2"))  # the guest side ended its direction
    assert harness.events.port("s2") == (b"hello\n", None)  # the stream stays open for the host's side
    await harness.events.exit(hello)
    await harness.client.write_port("s2", b"", eof=True)
    _, closed = await harness.events.wait_for(lambda: (p := harness.events.port("s2"))[1] and p)
    assert closed.error == ""  # both directions ended: PortClosed
    with pytest.raises(errors.NotFound):
        await harness.client.write_port("s2", b"late")


async def test_port_credit_and_half_close(harness: Harness) -> None:
    echo_port = free_port()
    echo = await harness.run(["nc", "-l", "-p", str(echo_port), "-e", "cat"])
    await eventually(lambda: listening(echo_port), what=f"a listener on port {echo_port}")
    await harness.client.open_port("s3", echo_port, window=3)
    await harness.client.write_port("s3", b"half-closed\n", eof=True)  # cat reads it, then end of file
    await harness.events.exit(echo)  # cat ended once its input did; nc with it
    await harness.events.wait_for(lambda: harness.events.port("s3")[0] == b"hal")  # as much as the credit allows
    assert not harness.events.port_eof("s3")
    await harness.client.port_credit("s3", 6)
    await harness.events.wait_for(lambda: harness.events.port("s3")[0] == b"half-c")
    await harness.client.port_credit("s3", 1000)
    data, closed = await harness.events.wait_for(lambda: (p := harness.events.port("s3"))[1] and p)
    assert data == b"half-closed\n" and harness.events.port_eof("s3") and closed.error == ""


# ---------------------------------------------------------------- flow control


async def test_exec_output_comes_within_its_credit(harness: Harness) -> None:
    cid = await harness.run(IDLE)
    size = 300_000
    limits = {pb.STDOUT: 1000, pb.STDERR: 10}
    received = {pb.STDOUT: 0, pb.STDERR: 0}
    overruns: list[int] = []

    def check(event: pb.Event) -> None:  # every event, as it arrives: never past the credit granted
        if event.output.process_id == "e1":
            received[event.output.stream] += len(event.output.data)
            if received[event.output.stream] > limits[event.output.stream]:
                overruns.append(event.seq)

    harness.events.watchers.append(check)
    script = f"head -c {size} /dev/zero; echo err >&2"
    await harness.client.start_exec(cid, "e1", process(["sh", "-c", script]), window=1000)
    await harness.events.wait_for(lambda: received[pb.STDOUT] == 1000)
    for limit in range(51_000, size, 50_000):  # the host's client consumes, credit follows
        limits[pb.STDOUT] = limit
        await harness.client.exec_credit(cid, "e1", limit, 10)
        await harness.events.wait_for(lambda limit=limit: received[pb.STDOUT] == limit)
    assert harness.events.exit_of(cid, "e1") is None  # its output is not all out: no exit yet
    limits[pb.STDOUT] = size + 1
    await harness.client.exec_credit(cid, "e1", size + 1, 10)  # room for the end of file to be read
    await harness.events.wait_for(lambda: harness.events.output(cid, "e1", pb.STDERR) == b"err\n")
    assert (await harness.events.exit(cid, "e1")).exit_code == 0
    assert harness.events.output(cid, "e1", pb.STDOUT) == b"\0" * size and overruns == []


async def test_a_new_host_abandons_the_streaming_execs_of_the_last(harness: Harness) -> None:
    cid = await harness.run(IDLE)
    await harness.client.start_exec(cid, "e1", process(["cat"]), stdin=True, window=16)
    await harness.client.write_stdin(cid, "e1", b"x" * 100_000)  # cat's output waits for credit that never comes
    await harness.events.wait_for(lambda: len(harness.events.output(cid, "e1")) == 16)
    await harness.client.close()
    client, events = await harness.connect()  # another daemon: cat's stdin closes, its output is dropped
    assert (await events.exit(cid, "e1")).exit_code == 0
    assert len(harness.events.output(cid, "e1")) + len(events.output(cid, "e1")) == 16
    harness.client = client


async def test_100_mib_through_cat_with_a_slow_reader_stays_bounded(harness: Harness) -> None:
    """The host's side for real (its event router, VmExec, the credit it grants) with stdin and stdout both
    streaming: the client stops reading three times until the agent has used up its credit. Nothing deadlocks
    (credit requests are answered while a WriteStdin waits for cat), and the host never holds more than the
    window for the stream, or the bounded intake for the connection."""
    cid = await harness.run(IDLE)
    await harness.client.close()  # the agent serves one host: this pod's router takes over
    router = PodEvents("p" * 64, lambda container_id, status: None, 2**20)
    router.add_container(cid, "", 0, create_log=False)
    client = AgentClient(harness.socket, router)
    harness.client = client
    await client.start(10)
    cat = router.execs["big"] = VmExec(client, cid, "big", tty=False)
    await client.start_exec(cid, "big", process(["cat"]), stdin=True, window=cat.window)
    size, chunk = 100 * 2**20, 2**20
    sent, received = hashlib.sha256(), hashlib.sha256()
    peak = 0

    async def feed() -> None:
        for i in range(size // chunk):
            data = bytes([i % 251]) * chunk
            sent.update(data)
            await cat.write_stdin(data)
        await cat.close_stdin()

    async def read() -> int:
        nonlocal peak
        total = 0
        stalls = [10 * 2**20, 40 * 2**20, 70 * 2**20]
        while data := await cat.read_stdout():
            total += len(data)
            received.update(data)
            peak = max(peak, cat.stdout.buffered + len(data))
            if stalls and total >= stalls[0]:
                stalls.pop(0)
                await eventually(lambda: cat.stdout.received == cat.stdout.limit, what="the credit to be used up")
                peak = max(peak, cat.stdout.buffered)
        return total

    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        _, total = await asyncio.wait_for(asyncio.gather(feed(), read()), 600)
        traced = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert await asyncio.wait_for(cat.wait(), 30) == 0
    assert total == size and received.digest() == sent.digest()
    print(f"cat 100 MiB: peak buffered {peak / 1024:.0f} KiB, intake peak {client.intake.peak_bytes / 1024:.0f} KiB, "
          f"traced peak {traced / 2**20:.1f} MiB")  # fmt: skip
    assert peak <= WINDOW_HOST and client.intake.peak_bytes <= INTAKE_BYTES
    assert traced < 16 * 2**20  # the write chunk, the window, the intake's Python side: no copy of the stream
    assert router.dropped == 0 and router.overruns == 0


# ---------------------------------------------------------------- reconnection


class Proxy:
    """A unix-socket relay between a client and the agent that the test can cut; it records the frames it relays."""

    def __init__(self, upstream: Path, path: Path) -> None:
        self.upstream, self.path = upstream, path
        self.refuse = False
        self.connections: list[tuple[list[int], list[int]]] = []  # per connection: (acks relayed, event seqs relayed)
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_unix_server(self._relay, str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_unix_connection(str(self.upstream))
        self._writers += [writer, up_writer]
        acks: list[int] = []
        seqs: list[int] = []
        self.connections.append((acks, seqs))

        async def pump(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: Callable[[pb.Frame], None]
        ) -> None:
            decoder = Decoder()
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    for frame in decoder.feed(data):
                        record(frame)
            dst.transport.abort()

        def to_agent(frame: pb.Frame) -> None:
            if frame.request.HasField("ack"):
                acks.append(frame.request.ack.seq)

        def to_client(frame: pb.Frame) -> None:
            if frame.HasField("event"):
                seqs.append(frame.event.seq)

        await asyncio.gather(pump(reader, up_writer, to_agent), pump(up_reader, writer, to_client))


LINES = ["sh", "-c", "for i in $(seq 1 40); do echo line $i; sleep 0.05; done"]


async def test_dropped_connection_loses_nothing(harness: Harness) -> None:
    await harness.client.close()  # the agent serves one host at a time: the proxied client is the host now
    async with Proxy(harness.socket, harness.run_dir / "proxy.sock") as proxy:
        harness.client, events = await harness.connect(proxy.path)
        cid = await harness.run(LINES)
        await events.wait_for(lambda: len(lines(events.output(cid))) >= 5)
        proxy.refuse = True
        proxy.cut()
        await eventually(lambda: stopped(harness, cid), what="the container to finish while no host listens")
        proxy.refuse = False
        exited = await events.exit(cid)
        assert lines(events.output(cid)) == [f"line {i}" for i in range(1, 41)]  # all of it, once, in order
        assert exited.exit_code == 0 and events.items[-1].HasField("process_exited")
        (first_acks, first_seqs), *later = proxy.connections
        resent = [seq for _, seqs in later for seq in seqs]
        assert first_acks and min(resent) > max(first_acks)  # acked events are not resent
        assert max(resent) > max(first_seqs)  # what happened while away came after reconnecting


async def test_new_client_gets_what_the_old_one_did_not_ack(harness: Harness) -> None:
    cid = await harness.run(LINES)
    await harness.events.wait_for(lambda: len(lines(harness.events.output(cid))) >= 5)
    await harness.client.close()  # acks what it handled, as a daemon shutting down would
    seen = len(lines(harness.events.output(cid)))
    await eventually(lambda: stopped(harness, cid), what="the container to finish while no host listens")
    _, events = await harness.connect()
    await events.exit(cid)
    assert lines(harness.events.output(cid)) + lines(events.output(cid)) == [f"line {i}" for i in range(1, 41)]
    assert len(lines(events.output(cid))) == 40 - seen


# ---------------------------------------------------------------- pod setup


async def test_setup_pod_writes_pod_files(harness: Harness) -> None:
    hostname = socket.gethostname()
    await harness.client.setup_pod(
        pb.SetupPod(
            hostname="pod-a",
            resolv_conf=b"nameserver 10.96.0.10\n",
            hosts=b"127.0.0.1 localhost\n",
            sysctls={"net.ipv4.ping_group_range": "0 0"},
            host_time_unix_ns=1,
        )
    )
    pod_dir = harness.run_dir / "pod"
    assert (pod_dir / "hostname").read_text() == "pod-a\n"
    assert (pod_dir / "resolv.conf").read_bytes() == b"nameserver 10.96.0.10\n"
    assert (pod_dir / "hosts").read_bytes() == b"127.0.0.1 localhost\n"
    assert (pod_dir / "shm").is_dir()
    assert socket.gethostname() == hostname  # dry: the host was not touched
    with pytest.raises(errors.InvalidArgument):
        await harness.client.setup_pod(pb.SetupPod(sysctls={"../x": "1"}))
