"""Exec, attach and port-forward on trusted pods through Tandem's streaming server.

Every path runs twice over: with the clients of tests/support/streams.py (Tandem's own SPDY and
WebSocket clients, and the independent `websockets` library), which need nothing but `make setup`,
and with crictl (cri-tools 1.36), as critest and kubelet's clients would drive it: the same client-go
code paths, a second opinion that is skipped where crictl is not installed. For streaming exec crictl
exits 1 on any failure and names the remote exit code in its message ("command terminated with exit
code N"), which client-go decodes from Tandem's error channel.
"""

from __future__ import annotations

import re
import secrets
import socket
import urllib.error
import urllib.request

import grpc
import pytest

from protos import cri_pb2 as pb
from tests.support.crictl import Crictl
from tests.support.daemon import TandemDaemon
from tests.support.pods import container_config, pod_config
from tests.support.streams import TRANSPORTS, communicate, open_command, open_port_forward
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

CRICTL_TRANSPORTS = ["spdy", "websocket"]
# The terminal test's script: print the size, wait for a line, then for the resize to arrive (a bounded poll
# inside the container: the resize travels apart from the line, so either may come first), print the size again.
TERMINAL_SCRIPT = (
    'tty; stty size; read line; i=0; while [ "$(stty size)" = "40 100" ] && [ $i -lt 300 ]; do '
    'sleep 0.1; i=$((i+1)); done; stty size; echo "got $line"; exit 5'
)


@pytest.fixture
def env(pod_env):
    e = pod_env()
    return e.daemon, e.image, e.tmp


@pytest.fixture
def crictl_env(env):
    daemon, image, tmp = env
    return daemon, Crictl(daemon, tmp), image, tmp


def start_pod(daemon: TandemDaemon, tmp, image: str, command: str, **container: bool) -> tuple[str, str]:
    """A pod with one running busybox container (`sh -c command`, or a bare `sh`); returns (pod, container)."""
    config = pod_config(f"streams-{secrets.token_hex(4)}", tmp / "logs")
    pod = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config)).pod_sandbox_id
    spec = container_config("app", image, *(["sh", "-c", command] if command else ["sh"]))
    for field, value in container.items():
        setattr(spec, field, value)
    request = pb.CreateContainerRequest(pod_sandbox_id=pod, config=spec, sandbox_config=config)
    cid = daemon.runtime.CreateContainer(request).container_id
    daemon.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
    return pod, cid


def state_of(daemon: TandemDaemon, cid: str) -> int:
    return daemon.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status.state


def exec_url(daemon: TandemDaemon, cid: str, *cmd: str, stdin: bool = False, tty: bool = False) -> str:
    request = pb.ExecRequest(container_id=cid, cmd=list(cmd), stdin=stdin, stdout=True, stderr=not tty, tty=tty)
    return daemon.runtime.Exec(request).url


async def run_exec(transport: str, daemon: TandemDaemon, cid: str, *cmd: str, stdin: bytes | None = None):
    """Exec `cmd` (stdout and stderr apart), feeding `stdin` if given; its outcome."""
    url = exec_url(daemon, cid, *cmd, stdin=stdin is not None)
    command = await open_command(transport, url, stdin=stdin is not None, stdout=True, stderr=True, tty=False)
    return await communicate(command, stdin)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_exec_output_input_and_exit_codes(env, transport):
    daemon, image, tmp = env
    _, cid = start_pod(daemon, tmp, image, "sleep 3600")

    failed = await run_exec(transport, daemon, cid, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (failed.stdout, failed.stderr, failed.exit_code) == (b"out\n", b"err\n", 3)
    assert failed.status["message"] == "command terminated with non-zero exit code: exit status 3"
    ok = await run_exec(transport, daemon, cid, "true")
    assert (ok.stdout, ok.exit_code) == (b"", 0)

    data = bytes(range(256)) * 1200  # 300 KiB each way: well past SPDY's 64 KiB default window
    counted = await run_exec(transport, daemon, cid, "sh", "-c", "wc -c", stdin=data)
    assert counted.stdout.split() == [str(len(data)).encode()], counted.stderr
    echoed = await run_exec(transport, daemon, cid, "cat", stdin=data)
    assert echoed.stdout == data and echoed.exit_code == 0
    big = await run_exec(transport, daemon, cid, "sh", "-c", "head -c 4000000 /dev/zero")
    assert big.stdout == bytes(4_000_000)
    missing = await run_exec(transport, daemon, cid, "/no/such/program")
    assert missing.exit_code != 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_exec_with_a_terminal_and_a_resize(env, transport):
    daemon, image, tmp = env
    _, cid = start_pod(daemon, tmp, image, "sleep 3600")
    url = exec_url(daemon, cid, "sh", "-c", TERMINAL_SCRIPT, stdin=True, tty=True)
    command = await open_command(transport, url, stdin=True, stdout=True, stderr=False, tty=True)
    await command.resize(100, 40)  # before anything else, as an interactive client does
    await command.read_until(b"40 100\r")  # the command started at the client's size
    await command.resize(120, 50)
    await command.write(b"hello\r")
    outcome = await command.wait()
    assert re.search(rb"/dev/pts/\d+\r\n40 100\r\nhello\r\n50 120\r\ngot hello\r\n", outcome.stdout), outcome
    assert outcome.exit_code == 5


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_attach_to_a_container_reading_stdin(env, transport):
    daemon, image, tmp = env
    _, cid = start_pod(daemon, tmp, image, "", stdin=True, stdin_once=True)
    request = pb.AttachRequest(container_id=cid, stdin=True, stdout=True, stderr=True)
    command = await open_command(transport, daemon.runtime.Attach(request).url, stdin=True, stdout=True,
                                 stderr=True, tty=False)  # fmt: skip
    outcome = await communicate(command, b"echo hello-attach\necho to-err >&2\n")
    assert (outcome.stdout, outcome.stderr) == (b"hello-attach\n", b"to-err\n")
    wait_for(lambda: state_of(daemon, cid) == pb.CONTAINER_EXITED, what="sh to exit once its stdin closed")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_attach_to_a_container_with_a_terminal(env, transport):
    daemon, image, tmp = env
    _, cid = start_pod(daemon, tmp, image, "", stdin=True, stdin_once=True, tty=True)
    request = pb.AttachRequest(container_id=cid, stdin=True, stdout=True, tty=True)
    command = await open_command(transport, daemon.runtime.Attach(request).url, stdin=True, stdout=True,
                                 stderr=False, tty=True)  # fmt: skip
    await command.resize(90, 30)
    await command.write(b"stty size; echo attached-$((6*7))\r")
    await command.read_until(b"30 90\r\nattached-42")
    await command.write(b"exit\r")
    outcome = await command.wait()
    assert outcome.exit_code == 0
    wait_for(lambda: state_of(daemon, cid) == pb.CONTAINER_EXITED, what="the attached shell to exit")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_port_forward_to_a_tcp_echo_server_in_the_pod(env, transport):
    daemon, image, tmp = env
    pod, cid = start_pod(daemon, tmp, image, "nc -ll -p 80 -e /bin/cat")
    listening = pb.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "netstat -ltn | grep -q ':80 '"], timeout=10)
    wait_for(lambda: daemon.runtime.ExecSync(listening).exit_code == 0, what="nc to listen")
    url = daemon.runtime.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod, port=[80])).url
    forward = await open_port_forward(transport, url, [80])
    try:
        for i in range(3):  # each connection (SPDY: request ID) gets its own streams
            message = f"ping {i} over {transport}\n".encode()
            assert await forward.roundtrip(80, message) == message
    finally:
        await forward.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_port_forward_to_a_closed_port_reports_it(env, transport):
    daemon, image, tmp = env
    pod, _ = start_pod(daemon, tmp, image, "sleep 3600")
    url = daemon.runtime.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod, port=[81])).url
    forward = await open_port_forward(transport, url, [81])
    try:
        error = await forward.refused(81)
    finally:
        await forward.close()
    assert error.startswith("error forwarding port 81 to pod") and "Connection refused" in error, error


@pytest.mark.crictl
@pytest.mark.parametrize("transport", CRICTL_TRANSPORTS)
def test_crictl_exec_output_input_and_exit_codes(crictl_env, transport):
    daemon, crictl, image, tmp = crictl_env
    _, cid = start_pod(daemon, tmp, image, "sleep 3600")

    failed = crictl.run("exec", "-r", transport, cid, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert failed.returncode == 1
    assert failed.stdout == b"out\n"
    assert b"err\n" in failed.stderr and b"command terminated with exit code 3" in failed.stderr

    ok = crictl.run("exec", "-r", transport, cid, "true")
    assert (ok.returncode, ok.stdout) == (0, b"")

    data = bytes(range(256)) * 1200  # 300 KiB each way: well past SPDY's 64 KiB default window
    counted = crictl.run("exec", "-i", "-r", transport, cid, "sh", "-c", "wc -c", input=data)
    assert counted.stdout.split() == [str(len(data)).encode()], counted.stderr
    echoed = crictl.run("exec", "-i", "-r", transport, cid, "cat", input=data)
    assert echoed.stdout == data
    big = crictl.run("exec", "-r", transport, cid, "sh", "-c", "head -c 4000000 /dev/zero")
    assert big.stdout == bytes(4_000_000)


@pytest.mark.crictl
@pytest.mark.parametrize("transport", CRICTL_TRANSPORTS)
def test_crictl_exec_with_a_terminal_and_a_resize(crictl_env, transport):
    daemon, crictl, image, tmp = crictl_env
    _, cid = start_pod(daemon, tmp, image, "sleep 3600")
    session = crictl.on_pty("exec", "-it", "-r", transport, cid, "sh", "-c", TERMINAL_SCRIPT, width=100, height=40)
    try:
        session.read_until(b"40 100\r")  # the command started at the client's size
        session.resize(120, 50)
        session.write(b"hello\r")
        session.read_until(b"got hello")
        assert session.wait() == 1
        shown = session.output.replace(b"\r\r\n", b"\r\n")  # runc's ONLCR race on the first lines; looks the same
        assert re.search(rb"/dev/pts/\d+\r\n40 100\r\nhello\r\n50 120\r\ngot hello\r\n", shown), session.output
        assert b"command terminated with exit code 5" in session.output
    finally:
        session.close()


@pytest.mark.crictl
@pytest.mark.parametrize("transport", CRICTL_TRANSPORTS)
def test_crictl_attach_to_a_container_reading_stdin(crictl_env, transport):
    daemon, crictl, image, tmp = crictl_env
    _, cid = start_pod(daemon, tmp, image, "", stdin=True, stdin_once=True)
    attached = crictl.run("attach", "-i", "-r", transport, cid, input=b"echo hello-attach\necho to-err >&2\n")
    assert attached.returncode == 0, attached.stderr
    assert attached.stdout == b"hello-attach\n"
    assert b"to-err\n" in attached.stderr
    wait_for(lambda: state_of(daemon, cid) == pb.CONTAINER_EXITED, what="sh to exit once its stdin closed")


@pytest.mark.crictl
@pytest.mark.parametrize("transport", CRICTL_TRANSPORTS)
def test_crictl_attach_to_a_container_with_a_terminal(crictl_env, transport):
    daemon, crictl, image, tmp = crictl_env
    _, cid = start_pod(daemon, tmp, image, "", stdin=True, stdin_once=True, tty=True)
    session = crictl.on_pty("attach", "-it", "-r", transport, cid, width=90, height=30)
    try:
        session.write(b"stty size; echo attached-$((6*7))\r")
        session.read_until(b"30 90\r\nattached-42")
        session.write(b"exit\r")
        assert session.wait() == 0
    finally:
        session.close()
    wait_for(lambda: state_of(daemon, cid) == pb.CONTAINER_EXITED, what="the attached shell to exit")


@pytest.mark.crictl
@pytest.mark.parametrize("transport", CRICTL_TRANSPORTS)
def test_crictl_port_forward_to_a_tcp_echo_server_in_the_pod(crictl_env, transport):
    daemon, crictl, image, tmp = crictl_env
    pod, _ = start_pod(daemon, tmp, image, "nc -ll -p 80 -e /bin/cat")
    forward = crictl.background("port-forward", "-r", transport, pod, "0:80", log=tmp / "forward.log")
    try:
        line = wait_for(lambda: re.search(rb"Forwarding from 127\.0\.0\.1:(\d+)", (tmp / "forward.log").read_bytes()))
        port = int(line.group(1))
        for i in range(3):  # each connection gets its own stream pair
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                message = f"ping {i} over {transport}\n".encode()
                conn.sendall(message)
                received = b""
                while len(received) < len(message):
                    received += conn.recv(100) or b"!"
                assert received == message
    finally:
        forward.terminate()
        forward.wait(10)


@pytest.mark.crictl
@pytest.mark.parametrize("transport", CRICTL_TRANSPORTS)
def test_crictl_port_forward_to_a_closed_port_reports_it(crictl_env, transport):
    daemon, crictl, image, tmp = crictl_env
    pod, _ = start_pod(daemon, tmp, image, "sleep 3600")
    forward = crictl.background("port-forward", "-r", transport, pod, "0:81", log=tmp / "forward.log")
    try:
        line = wait_for(lambda: re.search(rb"Forwarding from 127\.0\.0\.1:(\d+)", (tmp / "forward.log").read_bytes()))
        with socket.create_connection(("127.0.0.1", int(line.group(1))), timeout=10) as conn:
            assert conn.recv(100) == b""
        log = wait_for(lambda: re.search(rb"error forwarding port 81 to pod.*", (tmp / "forward.log").read_bytes()))
        assert b"Connection refused" in log.group(0)
    finally:
        forward.terminate()
        forward.wait(10)


def test_streaming_urls_are_loopback_and_work_once(env):
    daemon, image, tmp = env
    _, cid = start_pod(daemon, tmp, image, "sleep 3600")
    url = daemon.runtime.Exec(pb.ExecRequest(container_id=cid[:12], cmd=["true"], stdout=True)).url
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/exec/[A-Za-z0-9_-]{32}", url)
    codes = []
    for _ in range(2):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=10)
        codes.append(err.value.code)
    assert codes == [400, 404]  # the first use spends the token, even without an upgrade


def test_streaming_calls_are_validated(env):
    daemon, image, tmp = env
    pod, cid = start_pod(daemon, tmp, image, "exit 0")
    wait_for(lambda: state_of(daemon, cid) == pb.CONTAINER_EXITED, what="the container to exit")
    _, running = start_pod(daemon, tmp, image, "sleep 3600")
    cases = [
        (daemon.runtime.Exec, pb.ExecRequest(container_id=running, cmd=[], stdout=True), "INVALID_ARGUMENT"),
        (daemon.runtime.Exec, pb.ExecRequest(container_id=running, cmd=["ls"]), "INVALID_ARGUMENT"),
        (
            daemon.runtime.Exec,
            pb.ExecRequest(container_id=running, cmd=["ls"], tty=True, stderr=True),
            "INVALID_ARGUMENT",
        ),
        (daemon.runtime.Exec, pb.ExecRequest(container_id=cid, cmd=["ls"], stdout=True), "FAILED_PRECONDITION"),
        (daemon.runtime.Exec, pb.ExecRequest(container_id="f" * 64, cmd=["ls"], stdout=True), "NOT_FOUND"),
        (daemon.runtime.Attach, pb.AttachRequest(container_id=cid, stdout=True), "FAILED_PRECONDITION"),
        (daemon.runtime.PortForward, pb.PortForwardRequest(pod_sandbox_id="f" * 64), "NOT_FOUND"),
        (daemon.runtime.PortForward, pb.PortForwardRequest(pod_sandbox_id=pod, port=[70000]), "INVALID_ARGUMENT"),
    ]
    for call, request, code in cases:
        with pytest.raises(grpc.RpcError) as err:
            call(request)
        assert err.value.code().name == code, (request, err.value.details())
