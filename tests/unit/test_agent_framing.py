"""The agent channel without a VM or runc: framing, the event log, sessions over a socket, SetupPod's commands.

The agent runs in-process here (its Reaper not installed: nothing is spawned);
`tests/integration/test_agent.py` runs it for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import struct
import subprocess
import sys
import tempfile
import tty
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from core import errors
from protos import agent_pb2 as pb
from tests.support.wait import eventually
from vm_backend import channel
from vm_backend.agent import pod
from vm_backend.agent.errors import Fail
from vm_backend.agent.events import EventLog
from vm_backend.agent.framing import MAX_FRAME, Decoder, FramingError, encode
from vm_backend.agent.netlink import NetlinkError, Rtnetlink
from vm_backend.agent.procs import Reaper
from vm_backend.agent.server import Agent, serve_port, serve_socket
from vm_backend.channel import AgentClient

REPO = Path(__file__).resolve().parents[2]


def output(cid: str, data: bytes, process_id: str = "") -> pb.Event:
    return pb.Event(output=pb.Output(container_id=cid, process_id=process_id, data=data, timestamp_unix_ns=7))


def exited(cid: str, code: int = 0) -> pb.Event:
    return pb.Event(process_exited=pb.ProcessExited(container_id=cid, exit_code=code))


def request(request_id: int, **kind: Any) -> pb.Frame:
    return pb.Frame(id=request_id, request=pb.Request(**kind))


SAMPLE = [
    request(1, hello=pb.Hello(host_version="test")),
    request(2, write_stdin=pb.WriteStdin(container_id="c", data=b"x" * 70_000)),
    pb.Frame(id=2, response=pb.Response(code=pb.NOT_FOUND, error="no container")),
    pb.Frame(event=output("c", b"hello\n")),
]


# ---------------------------------------------------------------- framing


def test_frames_survive_any_split() -> None:
    wire = b"".join(encode(f) for f in SAMPLE)
    decoder = Decoder()
    got = [frame for i in range(len(wire)) for frame in decoder.feed(wire[i : i + 1])]
    assert got == SAMPLE
    for size in (3, 1000, 65536):
        decoder = Decoder()
        assert [f for i in range(0, len(wire), size) for f in decoder.feed(wire[i : i + size])] == SAMPLE


def test_many_frames_in_one_read() -> None:
    frames = [pb.Frame(event=output("c", str(i).encode())) for i in range(500)]
    assert Decoder().feed(b"".join(encode(f) for f in frames)) == frames


def test_size_limit() -> None:
    big = pb.Frame(event=output("c", b"x" * (MAX_FRAME - 100)))
    assert len(big.SerializeToString()) <= MAX_FRAME
    assert Decoder().feed(encode(big)) == [big]
    with pytest.raises(FramingError):
        encode(pb.Frame(event=output("c", b"x" * MAX_FRAME)))
    with pytest.raises(FramingError, match="limit"):  # refused on the header alone, before 4 MiB arrive
        Decoder().feed(struct.pack(">I", MAX_FRAME + 1) + b"\0")


@pytest.mark.parametrize(
    "wire",
    [
        struct.pack(">I", 3) + b"\xff\xff\xff",  # not protobuf
        struct.pack(">I", 0),  # an empty frame: no body
        struct.pack(">I", 2) + b"\x08\x01",  # an id and nothing else
    ],
)
def test_malformed_frames(wire: bytes) -> None:
    with pytest.raises(FramingError):
        Decoder().feed(wire)


def test_works_with_pure_python_protobuf() -> None:
    """The guest has only the pure-Python protobuf, and nothing of Tandem's but the agent and the stubs."""
    script = """
import sys
from google.protobuf.internal import api_implementation
import vm_backend.agent.__main__
from vm_backend.agent.framing import Decoder, encode
from protos import agent_pb2 as pb
assert api_implementation.Type() == "python", api_implementation.Type()
frame = pb.Frame(event=pb.Event(seq=5, output=pb.Output(container_id="c", data=b"x" * 100000)))
assert Decoder().feed(encode(frame)) == [frame]
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("core", "cri", "sandbox", "images", "runc_backend",
                                                              "vm_backend", "protos"))
print(" ".join(ours))
"""
    env = dict(os.environ, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    modules = result.stdout.split()
    assert all(m.startswith(("vm_backend.agent", "protos")) or m == "vm_backend" for m in modules), modules


# ---------------------------------------------------------------- event log


def seqs(log: EventLog) -> list[int]:
    found, entry = [], log.first_from(0)
    while entry is not None:
        found.append(entry.seq)
        entry = log.first_from(entry.seq + 1)
    return found


def decoded(log: EventLog) -> list[pb.Event]:
    events, entry = [], log.first_from(0)
    while entry is not None:
        (frame,) = Decoder().feed(entry.frame)
        events.append(frame.event)
        entry = log.first_from(entry.seq + 1)
    return events


def test_events_are_numbered_and_kept_until_acked() -> None:
    log = EventLog()
    assert [log.append(output("c", b"a")) for _ in range(5)] == [1, 2, 3, 4, 5]
    log.ack(3)
    assert seqs(log) == [4, 5]
    log.ack(2)  # a stale ack changes nothing
    assert seqs(log) == [4, 5]
    assert log.first_from(5).seq == 5  # type: ignore[union-attr]
    log.ack(5)
    assert len(log) == 0 and log.size == 0


def test_overflow_drops_oldest_output_and_leaves_one_marker() -> None:
    log = EventLog(limit=8192)
    log.append(output("c1", b"first\n"))
    log.append(exited("c0", 3))
    for _ in range(200):
        log.append(output("c1", b"x" * 99 + b"\n"))
    assert log.size <= log.limit
    events = decoded(log)
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert events[0].WhichOneof("kind") == "process_exited" and events[0].seq == 2  # exits are never dropped
    marker = events[1].output
    assert marker.container_id == "c1" and marker.stream == pb.STDERR and b"dropped" in marker.data
    lost = int(marker.data.split(b"output buffer full, ")[1].split()[0])
    kept = sum(len(e.output.data) for e in events[2:])
    assert lost + kept == len(b"first\n") + 200 * 100  # every byte is either kept or counted
    # Later overflows merge into a single marker per process.
    for _ in range(200):
        log.append(output("c1", b"y" * 99 + b"\n"))
    events = decoded(log)
    markers = [e for e in events if e.HasField("output") and b"output buffer full" in e.output.data]
    assert len(markers) == 1
    lost = int(markers[0].output.data.split(b"output buffer full, ")[1].split()[0])
    kept = sum(len(e.output.data) for e in events if e.HasField("output") and e is not markers[0])
    assert lost + kept == len(b"first\n") + 400 * 100


async def parked(task: asyncio.Task[None]) -> bool:
    """Whether `task`, after running its first step, is waiting: the loop runs callbacks in the order they
    were scheduled, so a callback scheduled after the task's creation runs after that step."""
    loop = asyncio.get_running_loop()
    checked: asyncio.Future[bool] = loop.create_future()
    loop.call_soon(lambda: checked.set_result(not task.done()))
    return await checked


async def test_wait_for_room_until_acked() -> None:
    log = EventLog(limit=1000)
    last = log.append(pb.Event(port_data=pb.PortData(stream_id="s", data=b"p" * 900)))
    waiting = asyncio.create_task(log.wait_for_room())
    assert await parked(waiting)  # the log is full: it waits
    log.ack(last)
    await asyncio.wait_for(waiting, 1)


# ---------------------------------------------------------------- sessions


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with short paths (unix sockets are limited to 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="tau-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
async def agent(short_dir: Path) -> AsyncIterator[Agent]:
    agent = Agent(run_dir=short_dir / "run", runtime="runc", system=pod.DrySystem(), reaper=Reaper())
    server = await serve_socket(agent, short_dir / "agent.sock")
    yield agent
    server.close()
    await agent.disconnect()


class Raw:
    """A bare connection to the agent: frames in, frames out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.decoder, self.frames = reader, writer, Decoder(), list[pb.Frame]()

    @classmethod
    async def connect(cls, path: Path) -> Raw:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()

    async def send(self, frame: pb.Frame) -> None:
        self.writer.write(encode(frame))
        await self.writer.drain()

    async def receive(self, count: int) -> list[pb.Frame]:
        while len(self.frames) < count:
            data = await asyncio.wait_for(self.reader.read(65536), 5)
            assert data, "the agent closed the connection"
            self.frames += self.decoder.feed(data)
        got, self.frames = self.frames[:count], self.frames[count:]
        return got


async def test_hello_resends_unacked_events_in_order(agent: Agent, short_dir: Path) -> None:
    for i in range(3):
        agent.events.append(output("c", f"line {i}\n".encode()))
    raw = await Raw.connect(short_dir / "agent.sock")
    await raw.send(request(1, hello=pb.Hello()))
    hello, *events = await raw.receive(4)
    assert hello.id == 1 and hello.response.hello.agent_version and hello.response.hello.instance_id
    assert [e.event.seq for e in events] == [1, 2, 3]
    await raw.send(request(2, ack=pb.Ack(seq=2)))
    (ack,) = await raw.receive(1)
    assert ack.id == 2 and ack.response.code == pb.OK
    await raw.close()

    again = await Raw.connect(short_dir / "agent.sock")
    agent.events.append(output("c", b"while away\n"))
    await again.send(request(1, hello=pb.Hello()))
    hello, *events = await again.receive(3)
    assert hello.response.hello.instance_id == agent.instance_id
    assert [e.event.seq for e in events] == [3, 4]  # acked ones are not resent
    agent.events.append(output("c", b"live\n"))
    (live,) = await again.receive(1)
    assert live.event.seq == 5 and live.event.output.data == b"live\n"
    await again.close()


def opened_elsewhere(fd: int) -> bool:
    """Whether this process holds the terminal behind `fd` open through another descriptor too."""
    target = os.readlink(f"/proc/self/fd/{fd}")
    count = 0
    for other in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            count += os.readlink(f"/proc/self/fd/{other}") == target
    return count > 1


async def test_virtio_serial_port(short_dir: Path) -> None:
    """The port path, with a raw pty standing in for the virtio-serial device (both are character devices)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    agent = Agent(run_dir=short_dir / "run", runtime="runc", system=pod.DrySystem(), reaper=Reaper())
    agent.events.append(output("c", b"x" * 100_000))  # one frame larger than a single 32 KiB port write
    serving = asyncio.create_task(serve_port(agent, Path(os.ttyname(slave))))
    host = Decoder()
    frames: list[pb.Frame] = []
    try:
        # the agent opens the port and polls for a host: it is there (reads would block), so it waits for data
        await eventually(lambda: opened_elsewhere(slave), what="the agent to open the port")
        os.write(master, encode(request(1, hello=pb.Hello())))
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(master, ready.set)
        try:
            async with asyncio.timeout(5):
                while len(frames) < 2:
                    await ready.wait()
                    ready.clear()
                    with contextlib.suppress(BlockingIOError):
                        frames += host.feed(os.read(master, 65536))
        finally:
            loop.remove_reader(master)
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        os.close(master)
        os.close(slave)
    hello, event = frames
    assert hello.id == 1 and hello.response.hello.instance_id == agent.instance_id
    assert event.event.seq == 1 and event.event.output.data == b"x" * 100_000


async def test_malformed_frame_closes_the_connection(agent: Agent, short_dir: Path) -> None:
    raw = await Raw.connect(short_dir / "agent.sock")
    raw.writer.write(struct.pack(">I", 5) + b"\xff" * 5)
    assert await asyncio.wait_for(raw.reader.read(), 5) == b""
    await raw.close()
    raw = await Raw.connect(short_dir / "agent.sock")  # the agent serves the next connection
    await raw.send(request(9, hello=pb.Hello()))
    (hello,) = await raw.receive(1)
    assert hello.id == 9 and hello.response.code == pb.OK
    await raw.close()


async def test_errors_map_to_domain_exceptions(agent: Agent, short_dir: Path) -> None:
    client = AgentClient(short_dir / "agent.sock", lambda event: None)
    await client.start(5)
    try:
        with pytest.raises(errors.NotFound):
            await client.start_container("nope")
        with pytest.raises(errors.InvalidArgument, match="JSON"):
            await client.call(pb.Request(create_container=pb.CreateContainer(container_id="c", oci_spec_json=b"{")))
        with pytest.raises(errors.InvalidArgument, match="shared dir"):
            await client.create_container("c", {"root": {}, "process": {}}, "../../etc")
        with pytest.raises(errors.InvalidArgument, match="container id"):
            await client.create_container("../c", {"root": {}, "process": {}}, "rootfs")
        with pytest.raises(errors.InvalidArgument, match="empty request"):
            await client.call(pb.Request())
        with pytest.raises(errors.FailedPrecondition, match="cannot connect"):
            await client.open_port("s1", 1, window=1024)
    finally:
        await client.close()


def test_agent_error_text_is_bounded_and_printable() -> None:
    hostile = "\x1b[2J\x1b]0;owned\x07line one\nline two\r\x00" + "x" * 2**20
    error = channel.error_for(pb.Response(code=pb.NOT_FOUND, error=hostile))
    assert isinstance(error, errors.NotFound)
    text = str(error)
    assert len(text) <= channel.MAX_GUEST_TEXT + 100 and text.isprintable()
    assert text.startswith("agent: \\x1b[2J") and "line one\\nline two" in text
    assert text.endswith(f"... (cut; {len(hostile)} characters in all)")
    assert str(channel.error_for(pb.Response(code=pb.INTERNAL, error="crun: exit 1"))) == "agent: crun: exit 1"


async def test_client_delivers_once_in_order_across_reconnects(agent: Agent, short_dir: Path) -> None:
    got: list[pb.Event] = []
    client = AgentClient(short_dir / "agent.sock", got.append)
    await client.start(5)
    try:
        for i in range(5):
            agent.events.append(output("c", f"{i}\n".encode()))
        await eventually(lambda: len(got) == 5 and len(agent.events) == 0)  # delivered and acked
        await agent.disconnect()  # the connection drops; the client reconnects on its own
        for i in range(5, 8):
            agent.events.append(output("c", f"{i}\n".encode()))
        await eventually(lambda: len(got) == 8 and len(agent.events) == 0)
        assert [e.seq for e in got] == list(range(1, 9))
        assert [e.output.data for e in got] == [f"{i}\n".encode() for i in range(8)]
    finally:
        await client.close()


async def test_client_notices_an_agent_restart(short_dir: Path) -> None:
    """A new agent numbers from 1 again: the client must not skip its events as already delivered."""
    got: list[pb.Event] = []
    client = AgentClient(short_dir / "agent.sock", got.append)
    for generation in range(2):
        agent = Agent(run_dir=short_dir / "run", runtime="runc", system=pod.DrySystem(), reaper=Reaper())
        server = await serve_socket(agent, short_dir / "agent.sock")
        for i in range(3):
            agent.events.append(output("c", f"{generation}.{i}".encode()))
        if generation == 0:
            await client.start(5)
        expected = 3 * (generation + 1)
        await eventually(lambda: len(got) == expected)  # noqa: B023 (used within this iteration only)
        server.close()
        await agent.disconnect()
    await client.close()
    assert [e.output.data for e in got] == [b"0.0", b"0.1", b"0.2", b"1.0", b"1.1", b"1.2"]


async def test_close_acks_what_was_delivered(agent: Agent, short_dir: Path) -> None:
    got: list[pb.Event] = []
    client = AgentClient(short_dir / "agent.sock", got.append, ack_delay=60)  # acks only on close
    await client.start(5)
    agent.events.append(output("c", b"a"))
    agent.events.append(output("c", b"b"))
    await eventually(lambda: len(got) == 2)
    assert len(agent.events) == 2
    await client.close()
    assert len(agent.events) == 0


# ---------------------------------------------------------------- SetupPod


async def test_ack_loop_stops_when_cancelled_as_its_ack_is_answered(short_dir: Path) -> None:
    """Python 3.11's wait_for returns the inner result when a cancellation races it (gh-86296); the
    ack loop then waited forever and close() with it (seen as a hung agent test)."""
    client = AgentClient(short_dir / "none.sock", lambda event: None)
    conn = channel._Connection(cast(asyncio.StreamReader, None), cast(asyncio.StreamWriter, None))
    client._conn = conn
    client._delivered = 5

    async def answered_as_close_cancels(conn: channel._Connection, request: pb.Request) -> pb.Response:
        await asyncio.sleep(0)  # the behaviour under test: the answer arrives one loop step after the request
        acking.cancel()  # close() cancels the loop in the very step the agent's answer arrives
        return pb.Response()

    client._send = answered_as_close_cancels  # type: ignore[method-assign]
    acking = asyncio.create_task(client._ack_loop())
    client._ack_wanted.set()
    done, _ = await asyncio.wait([acking], timeout=2)
    assert done, "the ack loop swallowed its cancellation"


def test_network_plan() -> None:
    iface = pb.Interface(name="eth0", mac="02:00:00:00:00:01", addresses=["10.88.0.5/16", "fd00::5/64"], mtu=1450)
    routes = [
        pb.Route(destination="0.0.0.0/0", gateway="10.88.0.1"),
        pb.Route(destination="10.96.0.0/12", device="eth0"),
        pb.Route(destination="::/0", gateway="fd00::1", device="eth0"),
    ]
    assert pod.network_plan([("ens3", iface)], routes) == [
        pod.SetLink("lo", up=True),
        pod.SetLink("ens3", up=False),
        pod.SetLink("ens3", new_name="eth0"),
        pod.SetLink("eth0", mtu=1450),
        pod.AddAddress("eth0", "10.88.0.5/16"),
        pod.AddAddress("eth0", "fd00::5/64"),
        pod.SetLink("eth0", up=True),
        pod.ReplaceRoute("0.0.0.0/0", gateway="10.88.0.1"),
        pod.ReplaceRoute("10.96.0.0/12", device="eth0"),
        pod.ReplaceRoute("::/0", gateway="fd00::1", device="eth0"),
    ]
    # Already named (a retried SetupPod): no rename, and no MTU change when none is asked for.
    plain = pb.Interface(name="eth0", mac="02:00:00:00:00:01", addresses=["10.0.0.2/24"])
    assert pod.network_plan([("eth0", plain)], []) == [
        pod.SetLink("lo", up=True),
        pod.AddAddress("eth0", "10.0.0.2/24"),
        pod.SetLink("eth0", up=True),
    ]


def test_sysctl_paths() -> None:
    root = Path("/proc/sys")
    assert pod.sysctl_path("net.ipv4.ip_forward") == root / "net/ipv4/ip_forward"
    assert pod.sysctl_path("net/ipv4/conf/eth0.100/forwarding") == root / "net/ipv4/conf/eth0.100/forwarding"
    for bad in ("", "net..ipv4", "net/../../etc/passwd", "../x"):
        with pytest.raises(Fail):
            pod.sysctl_path(bad)


class Recorder(pod.DrySystem):
    """Records what SetupPod asks of the system; `nics` stands in for /sys/class/net."""

    def __init__(self, nics: dict[str, str], address_errno: int = 0) -> None:
        super().__init__()
        self.nics, self.address_errno, self.calls = nics, address_errno, list[tuple[object, ...]]()

    def nic_by_mac(self, mac: str) -> str | None:
        return self.nics.get(mac)

    def configure_network(self, plan: Sequence[pod.NetworkChange]) -> None:
        pod.apply_network_plan(cast(Rtnetlink, self), plan)

    # Rtnetlink's part, recorded; adding an address fails with `address_errno` when set.
    def set_link(
        self, name: str, *, up: bool | None = None, mtu: int | None = None, new_name: str | None = None
    ) -> None:
        self.calls.append(("link", name, up, mtu, new_name))

    def add_address(self, name: str, cidr: str) -> None:
        self.calls.append(("address", name, cidr))
        if self.address_errno:
            raise NetlinkError(self.address_errno, f"add address {cidr} to {name}")

    def replace_route(self, destination: str, *, gateway: str = "", device: str = "") -> None:
        self.calls.append(("route", destination, gateway, device))

    def sethostname(self, name: str) -> None:
        self.calls.append(("hostname", name))

    def sysctl(self, name: str, value: str) -> None:
        self.calls.append(("sysctl", name, value))

    def set_clock(self, unix_ns: int) -> None:
        self.calls.append(("clock", unix_ns))

    def mount(self, source: str, target: Path, fstype: str, flags: int = 0, options: str = "") -> None:
        self.calls.append(("mount", fstype, source, target.name, options))


SETUP = pb.SetupPod(
    hostname="web-1",
    resolv_conf=b"nameserver 10.96.0.10\n",
    hosts=b"127.0.0.1 localhost\n",
    interfaces=[pb.Interface(name="eth0", mac="02:AA:00:00:00:01", addresses=["10.88.0.5/16"])],
    routes=[pb.Route(destination="0.0.0.0/0", gateway="10.88.0.1")],
    sysctls={"net.ipv4.ping_group_range": "0 2147483647", "kernel.shm_rmid_forced": "1"},
    host_time_unix_ns=1_700_000_000_000_000_000,
    shared_dir_tag="pod-share",
)


async def test_setup_pod(tmp_path: Path) -> None:
    system = Recorder({"02:aa:00:00:00:01": "ens3"})
    setup = pod.PodSetup(system, tmp_path / "pod", tmp_path / "share")
    await setup.apply(SETUP)
    assert (tmp_path / "pod/hostname").read_text() == "web-1\n"
    assert (tmp_path / "pod/resolv.conf").read_bytes() == SETUP.resolv_conf
    assert (tmp_path / "pod/hosts").read_bytes() == SETUP.hosts
    assert system.calls == [
        ("clock", SETUP.host_time_unix_ns),
        ("mount", "tmpfs", "shm", "shm", pod.SHM_OPTIONS),
        ("mount", "virtiofs", "pod-share", "share", ""),
        ("hostname", "web-1"),
        ("sysctl", "kernel.shm_rmid_forced", "1"),
        ("sysctl", "net.ipv4.ping_group_range", "0 2147483647"),
        ("link", "lo", True, None, None),
        ("link", "ens3", False, None, None),
        ("link", "ens3", None, None, "eth0"),
        ("address", "eth0", "10.88.0.5/16"),
        ("link", "eth0", True, None, None),
        ("route", "0.0.0.0/0", "10.88.0.1", ""),
    ]


async def test_setup_pod_failures(tmp_path: Path) -> None:
    # Repeating it is fine: an address that exists already is not an error ...
    await pod.PodSetup(Recorder({"02:aa:00:00:00:01": "eth0"}, errno.EEXIST), tmp_path, tmp_path).apply(SETUP)
    # ... but other failures are.
    with pytest.raises(Fail, match=r"add address 10\.88\.0\.5/16 to eth0: Operation not permitted"):
        system = Recorder({"02:aa:00:00:00:01": "eth0"}, errno.EPERM)
        await pod.PodSetup(system, tmp_path, tmp_path).apply(SETUP)
    with pytest.raises(Fail, match="no network interface") as missing:
        await pod.PodSetup(Recorder({}), tmp_path, tmp_path).apply(SETUP)
    assert missing.value.code == pb.NOT_FOUND
    bad = pb.SetupPod()
    bad.CopyFrom(SETUP)
    bad.interfaces[0].addresses.append("10.88.0.300/16")
    system = Recorder({"02:aa:00:00:00:01": "eth0"})
    with pytest.raises(Fail) as invalid:
        await pod.PodSetup(system, tmp_path, tmp_path).apply(bad)
    assert invalid.value.code == pb.INVALID_ARGUMENT and system.calls == []  # checked before changing anything
