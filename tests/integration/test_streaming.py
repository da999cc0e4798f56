"""Exec, attach and port-forward on trusted pods, driven by crictl over SPDY and over WebSocket.

crictl (cri-tools 1.36) is the client here, as critest and kubelet's clients
would be: the same client-go code paths. For streaming exec it exits 1 on any
failure and names the remote exit code in its message ("command terminated with
exit code N"), which client-go decodes from Tandem's error channel.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.error
import urllib.request

import grpc
import pytest

from protos import cri_pb2 as pb
from tests.support.crictl import Crictl
from tests.support.daemon import TandemDaemon
from tests.support.pods import (
    container_config,
    delete_bridge,
    pod_config,
    remove_pods_and_stop,
    wait_for,
    write_bridge_network,
)

pytestmark = pytest.mark.integration

TRANSPORTS = ["spdy", "websocket"]


@pytest.fixture
def env(tmp_path, busybox_ref):
    bridge = write_bridge_network(tmp_path / "net.d", 202)
    daemon = TandemDaemon.isolated(tmp_path).start()
    try:
        crictl = Crictl(daemon, tmp_path)
    except FileNotFoundError as e:
        daemon.stop()
        delete_bridge(bridge)
        pytest.fail(str(e))
    daemon.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=busybox_ref)))
    yield daemon, crictl, busybox_ref, tmp_path
    remove_pods_and_stop(daemon, tmp_path, bridge)


def start_pod(daemon: TandemDaemon, tmp, image: str, command: str, **container: bool) -> tuple[str, str]:
    """A pod with one running busybox container (`sh -c command`, or a bare `sh`); returns (pod, container)."""
    config = pod_config(f"streams-{time.monotonic_ns()}", tmp / "logs")
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


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_output_input_and_exit_codes(env, transport):
    daemon, crictl, image, tmp = env
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


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exec_with_a_terminal_and_a_resize(env, transport):
    daemon, crictl, image, tmp = env
    _, cid = start_pod(daemon, tmp, image, "sleep 3600")
    script = 'tty; stty size; read line; stty size; echo "got $line"; exit 5'
    session = crictl.on_pty("exec", "-it", "-r", transport, cid, "sh", "-c", script, width=100, height=40)
    try:
        session.read_until(b"40 100\r")  # the command started at the client's size
        session.resize(120, 50)
        time.sleep(0.5)
        session.write(b"hello\r")
        session.read_until(b"got hello")
        assert session.wait() == 1
        shown = session.output.replace(b"\r\r\n", b"\r\n")  # runc's ONLCR race on the first lines; looks the same
        assert re.search(rb"/dev/pts/\d+\r\n40 100\r\nhello\r\n50 120\r\ngot hello\r\n", shown), session.output
        assert b"command terminated with exit code 5" in session.output
    finally:
        session.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_attach_to_a_container_reading_stdin(env, transport):
    daemon, crictl, image, tmp = env
    _, cid = start_pod(daemon, tmp, image, "", stdin=True, stdin_once=True)
    attached = crictl.run("attach", "-i", "-r", transport, cid, input=b"echo hello-attach\necho to-err >&2\n")
    assert attached.returncode == 0, attached.stderr
    assert attached.stdout == b"hello-attach\n"
    assert b"to-err\n" in attached.stderr
    wait_for(lambda: state_of(daemon, cid) == pb.CONTAINER_EXITED, what="sh to exit once its stdin closed")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_attach_to_a_container_with_a_terminal(env, transport):
    daemon, crictl, image, tmp = env
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


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_port_forward_to_a_tcp_echo_server_in_the_pod(env, transport):
    daemon, crictl, image, tmp = env
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


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_port_forward_to_a_closed_port_reports_it(env, transport):
    daemon, crictl, image, tmp = env
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
    daemon, _, image, tmp = env
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
    daemon, _, image, tmp = env
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
