"""Untrusted pods end to end: a real daemon running each pod in its own QEMU micro-VM (TCG here) on a CNI bridge.

Each boot costs ~4 s of TCG, so one VM carries the whole story: lifecycle, logs,
the guest kernel, networking, isolation from the host's files, refusals, and a
daemon killed with SIGKILL and restarted while the VM runs.
"""

from __future__ import annotations

import hashlib
import os
import pty
import re
import secrets
import socket
import subprocess
import sys
import termios
from pathlib import Path

import grpc
import pytest

from protos import cri_pb2 as pb
from tests.support.crictl import Crictl
from tests.support.pods import container_config, log_entries, next_event, pod_config, pod_leftovers
from tests.support.streams import communicate, open_command, open_port_forward
from tests.support.wait import wait_for
from vm_backend.qemu import BOOT_MARKER

pytestmark = pytest.mark.integration


@pytest.fixture
def env(vm_pod_env, guest_assets):
    return vm_pod_env.daemon, vm_pod_env.image, vm_pod_env.tmp, guest_assets


def leftovers(daemon, tmp: Path) -> list[str]:
    """A VM pod's remains: mounts, netns files, QEMU and virtiofsd processes naming the test's dir."""
    return pod_leftovers(daemon, ("qemu", "virtiofsd"), (str(tmp),))


def ready(daemon, pod_id) -> pb.PodSandboxStatus:
    return daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))


def exec_sync(daemon, cid, *cmd, timeout=60):
    return daemon.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=timeout))


def test_vm_pod_lifecycle_isolation_and_restart(env, vm_pod_env):
    daemon, image, tmp, assets = env
    pod = pod_config("untrusted", tmp / "logs")
    pod_id = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod, runtime_handler="vm")).pod_sandbox_id
    status = ready(daemon, pod_id)
    assert status.status.state == pb.SANDBOX_READY
    ip = status.status.network.ip
    assert vm_pod_env.network.holds(ip)
    assert '"backend": "vm"' in status.info["info"]

    config = container_config("app", image, "sh", "-c", "echo hello; echo oops >&2; sleep 3600")
    cid = daemon.runtime.CreateContainer(
        pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
    ).container_id
    daemon.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
    log_file = tmp / "logs" / "app.log"
    entries = wait_for(
        lambda: log_file.exists() and len(log_entries(log_file)) >= 2 and log_entries(log_file),
        timeout=60,
        what="two log lines",
    )
    parsed = [entry[1:] for entry in entries]
    assert ("stdout", "F", "hello") in parsed and ("stderr", "F", "oops") in parsed

    uname = exec_sync(daemon, cid, "uname", "-r")
    assert uname.exit_code == 0, uname.stderr
    assert uname.stdout.decode().strip() == assets.kernel_release != os.uname().release
    hostname = exec_sync(daemon, cid, "sh", "-c", "hostname; cat /etc/resolv.conf; exit 7")
    assert hostname.exit_code == 7
    assert hostname.stdout.startswith(b"untrusted\n") and b"nameserver 10.0.0.10" in hostname.stdout

    ping = subprocess.run(["ping", "-c1", "-W5", ip], capture_output=True)
    assert ping.returncode == 0, ping.stdout

    # A file on the host, outside the pod's share: the guest has no way to name it.
    name = f"host-secret-{secrets.token_hex(6)}"
    secret = tmp / name
    secret.write_text("host secret\n")
    assert exec_sync(daemon, cid, "cat", str(secret)).exit_code != 0
    assert exec_sync(daemon, cid, "ls", str(secret)).exit_code != 0
    script = f"touch /tmp/{name}-inside; find / -name '{name}*' 2>/dev/null; true"
    found = exec_sync(daemon, cid, "sh", "-c", script, timeout=120)
    assert (found.exit_code, found.stdout) == (0, f"/tmp/{name}-inside\n".encode())  # find works, and sees no host file

    # Host devices never reach a VM pod.
    refused = container_config("dev", image, "sleep", "1")
    refused.devices.append(pb.Device(container_path="/dev/xnull", host_path="/dev/null", permissions="rwm"))
    with pytest.raises(grpc.RpcError) as err:
        daemon.runtime.CreateContainer(
            pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=refused, sandbox_config=pod)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # An exit reaches GetContainerEvents from the agent, with no status call to find it.
    events = daemon.runtime.GetContainerEvents(pb.GetEventsRequest(), timeout=120)
    quick = daemon.runtime.CreateContainer(
        pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=container_config("quick", image, "sh", "-c", "exit 5"), sandbox_config=pod
        )
    ).container_id
    daemon.runtime.StartContainer(pb.StartContainerRequest(container_id=quick))
    stopped = next_event(events, quick, pb.CONTAINER_STOPPED_EVENT)
    events.cancel()
    (reported,) = [c for c in stopped.containers_statuses if c.id == quick]
    assert (reported.state, reported.exit_code) == (pb.CONTAINER_EXITED, 5)

    # The daemon dies; the VM and its containers keep running, and the next daemon takes them over: what a
    # container wrote and how it ended while no daemon listened reach its log and its status. The container
    # waits for the test's go-ahead (a file in a host directory it mounts), given once the daemon is dead, and
    # says on the way out that it is exiting.
    signals = tmp / "signals"
    signals.mkdir()
    script = "while [ ! -e /signals/go ]; do sleep 0.1; done; echo while-down; touch /signals/exiting; exit 4"
    brief_config = container_config("brief", image, "sh", "-c", script)
    brief_config.mounts.append(pb.Mount(container_path="/signals", host_path=str(signals)))
    brief = daemon.runtime.CreateContainer(
        pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=brief_config, sandbox_config=pod)
    ).container_id
    daemon.runtime.StartContainer(pb.StartContainerRequest(container_id=brief))
    daemon.kill()
    (signals / "go").touch()
    wait_for(lambda: (signals / "exiting").exists(), timeout=60, what="the container to finish while no daemon runs")
    daemon.start()
    ended = wait_for(
        lambda: (
            (s := daemon.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=brief)).status).state
            == pb.CONTAINER_EXITED
            and s
        ),
        timeout=30,
        what="the exit that happened while the daemon was down",
    )
    assert ended.exit_code == 4
    assert "stdout F while-down" in (tmp / "logs" / "brief.log").read_text()
    (listed,) = daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
    assert (listed.id, listed.state) == (pod_id, pb.SANDBOX_READY)
    after = daemon.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status
    assert after.state == pb.CONTAINER_RUNNING
    assert exec_sync(daemon, cid, "echo", "still here").stdout == b"still here\n"

    daemon.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=2))
    stopped = daemon.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status
    assert stopped.state == pb.CONTAINER_EXITED and stopped.exit_code in (137, 143)
    daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items == []
    assert leftovers(daemon, tmp) == []


def start_streaming_pod(daemon, image, tmp: Path, request) -> tuple[str, str, str]:
    """A VM pod with an echo server (a read-only host volume and a termination-log file mounted) and a shell
    reading its stdin: (pod, echo, shell)."""
    pod = pod_config("streams", tmp / "logs")
    pod_id = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod, runtime_handler="vm")).pod_sandbox_id

    def start(config: pb.ContainerConfig) -> str:
        create = pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
        cid = daemon.runtime.CreateContainer(create).container_id
        daemon.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
        return cid

    volume = tmp / "volume"
    (volume / "tmpfs").mkdir(parents=True)
    (volume / "data.txt").write_text("from a host volume\n")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(volume / "tmpfs")], check=True)
    request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(volume / "tmpfs")], check=False))
    (tmp / "termination-log").touch()
    echo_config = container_config("echo", image, "nc", "-ll", "-p", "80", "-e", "/bin/cat")
    echo_config.mounts.extend(
        [
            pb.Mount(container_path="/data", host_path=str(volume), readonly=True),
            pb.Mount(container_path="/dev/termination-log", host_path=str(tmp / "termination-log")),
        ]
    )
    echo = start(echo_config)
    shell_config = container_config("shell", image, "sh")
    shell_config.stdin = shell_config.stdin_once = True
    return pod_id, echo, start(shell_config)


def state_of(daemon, cid: str) -> int:
    return daemon.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status.state


async def test_vm_pod_volumes_stats_and_streaming(env, request):
    """Host volumes, stats and resources, then exec (with and without a terminal), attach and port-forward
    through the streaming server into the guest, with the clients `make setup` installs."""
    daemon, image, tmp, _ = env
    pod_id, echo, shell = start_streaming_pod(daemon, image, tmp, request)

    volume_read = exec_sync(daemon, echo, "sh", "-c", "cat /data/data.txt; echo bye > /dev/termination-log")
    assert volume_read.stdout == b"from a host volume\n", volume_read.stderr
    assert (tmp / "termination-log").read_text() == "bye\n"
    assert exec_sync(daemon, echo, "touch", "/data/new").exit_code != 0  # read-only
    submount = exec_sync(daemon, echo, "touch", "/data/tmpfs/new")  # not recursively read-only, as with runc
    assert submount.exit_code == 0, submount.stderr
    assert (tmp / "volume" / "tmpfs" / "new").exists()

    stats = daemon.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=echo)).stats
    assert stats.memory.working_set_bytes.value > 0 and stats.cpu.usage_core_nano_seconds.value > 0
    assert stats.writable_layer.used_bytes.value >= 0
    daemon.runtime.UpdateContainerResources(
        pb.UpdateContainerResourcesRequest(
            container_id=echo, linux=pb.LinuxContainerResources(cpu_quota=50_000, cpu_period=100_000)
        )
    )
    quota = exec_sync(daemon, echo, "cat", "/sys/fs/cgroup/cpu.max")
    assert quota.stdout == b"50000 100000\n", quota.stderr
    daemon.runtime.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=echo))

    def exec_url(*cmd: str, stdin: bool = False, tty: bool = False) -> str:
        exec_request = pb.ExecRequest(
            container_id=echo, cmd=list(cmd), stdin=stdin, stdout=True, stderr=not tty, tty=tty
        )
        return daemon.runtime.Exec(exec_request).url

    for transport in ("spdy", "websockets"):
        url = exec_url("sh", "-c", "echo out; echo err >&2; exit 3")
        failed = await communicate(
            await open_command(transport, url, stdin=False, stdout=True, stderr=True, tty=False), None
        )
        assert (failed.stdout, failed.stderr, failed.exit_code) == (b"out\n", b"err\n", 3), transport
    data = bytes(range(256)) * 400  # 100 KiB through stdin and back
    echoed = await communicate(
        await open_command("spdy", exec_url("cat", stdin=True), stdin=True, stdout=True, stderr=True, tty=False), data
    )
    assert echoed.stdout == data, echoed.stderr

    script = "tty; stty size; read line; echo got $line"
    terminal = await open_command(
        "websocket", exec_url("sh", "-c", script, stdin=True, tty=True), stdin=True, stdout=True, stderr=False, tty=True
    )
    await terminal.resize(100, 40)
    await terminal.read_until(b"40 100\r")
    await terminal.write(b"hello\r")
    assert b"got hello" in (await terminal.wait()).stdout

    attach = pb.AttachRequest(container_id=shell, stdin=True, stdout=True, stderr=True)
    attached = await communicate(
        await open_command("spdy", daemon.runtime.Attach(attach).url, stdin=True, stdout=True, stderr=True, tty=False),
        b"echo hello-attach\necho to-err >&2\n",
    )
    assert (attached.stdout, attached.stderr) == (b"hello-attach\n", b"to-err\n")
    wait_for(lambda: state_of(daemon, shell) == pb.CONTAINER_EXITED, what="sh to exit once its stdin closed")

    listening = ["sh", "-c", "netstat -ltn | grep -q ':80 '"]
    wait_for(lambda: exec_sync(daemon, echo, *listening).exit_code == 0, timeout=60, what="nc to listen")
    for transport in ("spdy", "websockets"):
        url = daemon.runtime.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod_id, port=[80])).url
        forward = await open_port_forward(transport, url, [80])
        try:
            for i in range(2):
                message = f"ping {i} into the guest over {transport}\n".encode()
                assert await forward.roundtrip(80, message) == message
        finally:
            await forward.close()

    daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert leftovers(daemon, tmp) == []


@pytest.mark.crictl
def test_vm_pod_streaming_with_crictl(env, request):
    """The same streaming paths into the guest, driven by crictl (client-go) as a second opinion."""
    daemon, image, tmp, _ = env
    crictl = Crictl(daemon, tmp)
    pod_id, echo, shell = start_streaming_pod(daemon, image, tmp, request)

    volume_read = crictl.run("exec", echo, "cat", "/data/data.txt")
    assert volume_read.stdout == b"from a host volume\n", volume_read.stderr
    ws = crictl.run("exec", "-r", "websocket", echo, "sh", "-c", "echo over-websocket")
    assert (ws.returncode, ws.stdout) == (0, b"over-websocket\n"), ws.stderr
    failed = crictl.run("exec", echo, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert failed.returncode == 1
    assert failed.stdout == b"out\n"
    assert b"err\n" in failed.stderr and b"command terminated with exit code 3" in failed.stderr
    data = bytes(range(256)) * 400  # 100 KiB through stdin and back
    echoed = crictl.run("exec", "-i", echo, "cat", input=data)
    assert echoed.stdout == data, echoed.stderr

    session = crictl.on_pty("exec", "-it", echo, "sh", "-c", "tty; stty size; read line; echo got $line", width=100,
                            height=40)  # fmt: skip
    try:
        session.read_until(b"40 100\r")
        session.write(b"hello\r")
        session.read_until(b"got hello")
        assert session.wait() == 0
    finally:
        session.close()

    attached = crictl.run("attach", "-i", shell, input=b"echo hello-attach\necho to-err >&2\n")
    assert attached.returncode == 0, attached.stderr
    assert attached.stdout == b"hello-attach\n" and b"to-err\n" in attached.stderr
    wait_for(lambda: state_of(daemon, shell) == pb.CONTAINER_EXITED, what="sh to exit once its stdin closed")

    forward = crictl.background("port-forward", pod_id, "0:80", log=tmp / "forward.log")
    try:
        line = wait_for(lambda: re.search(rb"Forwarding from 127\.0\.0\.1:(\d+)", (tmp / "forward.log").read_bytes()))
        for i in range(2):
            with socket.create_connection(("127.0.0.1", int(line.group(1))), timeout=20) as conn:
                message = f"ping {i} into the guest\n".encode()
                conn.sendall(message)
                received = b""
                while len(received) < len(message):
                    received += conn.recv(100) or b"!"
                assert received == message
    finally:
        forward.terminate()
        forward.wait(10)

    daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert leftovers(daemon, tmp) == []


@pytest.mark.parametrize("deadline", [1.0, 2.0, 3.0])
def test_a_pod_start_given_up_by_its_client_leaves_nothing(env, deadline):
    """kubelet's RunPodSandbox deadline can fire mid-boot: the cancelled start must clean up after itself."""
    daemon, _, tmp, _ = env
    request = pb.RunPodSandboxRequest(config=pod_config("given-up", tmp / "logs"), runtime_handler="vm")
    with pytest.raises(grpc.RpcError) as err:
        daemon.runtime.RunPodSandbox(request, timeout=deadline)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: not daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items, what="the pod to go")
    wait_for(lambda: leftovers(daemon, tmp) == [], timeout=30, what="no QEMU, virtiofsd, mount or netns left")


def test_a_daemon_killed_mid_boot_leaves_a_pod_that_removes_cleanly(env):
    daemon, _, tmp, _ = env
    request = pb.RunPodSandboxRequest(config=pod_config("cut-short", tmp / "logs"), runtime_handler="vm")
    with pytest.raises(grpc.RpcError):
        daemon.runtime.RunPodSandbox(request, timeout=2.0)
    daemon.kill()
    daemon.start()
    for pod in daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items:
        assert pod.state == pb.SANDBOX_NOTREADY
        daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod.id))
        daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
    wait_for(lambda: leftovers(daemon, tmp) == [], timeout=30, what="no QEMU, virtiofsd, mount or netns left")


def start_sleeper(daemon, image, tmp: Path, name: str, *, privileged: bool = False) -> tuple[str, str]:
    """A VM pod running one sleeping container, both privileged if asked: (pod id, container id)."""
    pod = pod_config(name, tmp / "logs")
    pod.linux.security_context.privileged = privileged
    pod_id = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod, runtime_handler="vm")).pod_sandbox_id
    config = container_config("sleeper", image, "sleep", "3600")
    config.linux.security_context.privileged = privileged
    request = pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
    cid = daemon.runtime.CreateContainer(request).container_id
    daemon.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
    return pod_id, cid


def remove_pods(daemon, *pod_ids: str) -> None:
    for pod_id in pod_ids:
        daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


def console(daemon, pod_id: str) -> subprocess.Popen[bytes]:
    """`tandem console` on a pod, stdin a pipe."""
    argv = [sys.executable, "-m", "cri.cli", "console", pod_id, "--config", str(daemon.config_path)]
    argv += ["--state-dir", str(daemon.state_dir)]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_vm_dying_under_its_pod_shows_as_notready_with_its_containers_exited(env):
    daemon, image, tmp, _ = env
    pod_id, cid = start_sleeper(daemon, image, tmp, "doomed")
    events = daemon.runtime.GetContainerEvents(pb.GetEventsRequest(), timeout=60)
    watching = console(daemon, pod_id[:8])
    assert watching.stderr.readline().strip().endswith(b"Ctrl-] detaches]")  # connected
    pidfile = daemon.socket.parent / "vm" / pod_id[:16] / "qemu.pid"
    os.kill(int(pidfile.read_text().split()[0]), 9)  # the pidfile holds the pid and its start time
    assert watching.wait(timeout=30) == 1  # stdin stays open: only the VM's end ends the session
    assert b"the VM stopped" in watching.stderr.read()
    watching.stdin.close()
    watching.stdout.close()
    watching.stderr.close()
    next_event(events, cid, pb.CONTAINER_STOPPED_EVENT)  # the end of QEMU is an exit, pushed like any other
    events.cancel()

    status = wait_for(
        lambda: (
            (s := daemon.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status).state
            == pb.CONTAINER_EXITED
            and s
        ),
        timeout=30,
        what="the container to be marked exited",
    )
    assert (status.exit_code, status.reason) == (255, "VMDied")
    assert f"tandem-{pod_id[:12]}" in status.message
    assert ready(daemon, pod_id).status.state == pb.SANDBOX_NOTREADY
    remove_pods(daemon, pod_id)
    assert daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items == []
    wait_for(lambda: leftovers(daemon, tmp) == [], timeout=30, what="no QEMU, virtiofsd, mount or netns left")


def test_several_vm_pods_survive_a_daemon_crash(env):
    daemon, image, tmp, _ = env
    pods = dict(start_sleeper(daemon, image, tmp, f"survivor-{i}") for i in range(3))
    daemon.kill()
    daemon.start()
    listed = {p.id: p.state for p in daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items}
    assert listed == dict.fromkeys(pods, pb.SANDBOX_READY)
    for cid in pods.values():
        result = exec_sync(daemon, cid, "true")
        assert result.exit_code == 0, result.stderr
    remove_pods(daemon, *pods)
    assert daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items == []
    wait_for(lambda: leftovers(daemon, tmp) == [], timeout=30, what="no QEMU, virtiofsd, mount or netns left")


def test_console(env):
    """`tandem console`: the boot log, then the live serial console until Ctrl-]; runc pods have none."""
    daemon, _, tmp, _ = env
    pod_id = daemon.runtime.RunPodSandbox(
        pb.RunPodSandboxRequest(config=pod_config("consoled", tmp / "logs"), runtime_handler="vm")
    ).pod_sandbox_id
    for _ in range(2):  # QEMU takes the next client once one detaches
        session = console(daemon, pod_id[:10])
        out, err = session.communicate(b"\n\x1d", timeout=30)
        assert session.returncode == 0, err
        assert BOOT_MARKER.encode() in out
        assert b"Ctrl-] detaches" in err and b"[tandem: detached]" in err

    # On a terminal: raw mode while connected (Ctrl-] arrives as a byte, not a signal), the modes restored after.
    primary, secondary = pty.openpty()
    before = termios.tcgetattr(secondary)
    argv = [sys.executable, "-m", "cri.cli", "console", pod_id, "--config", str(daemon.config_path), "--no-log"]
    argv += ["--state-dir", str(daemon.state_dir)]
    session = subprocess.Popen(argv, stdin=secondary, stdout=secondary, stderr=secondary)
    try:
        seen = b""
        while b"detaches]" not in seen:
            seen += os.read(primary, 1024)
        assert not termios.tcgetattr(secondary)[3] & termios.ICANON  # raw
        os.write(primary, b"\x1d")
        assert session.wait(timeout=30) == 0
        assert termios.tcgetattr(secondary) == before
    finally:
        session.kill()
        os.close(primary)
        os.close(secondary)

    trusted = daemon.runtime.RunPodSandbox(
        pb.RunPodSandboxRequest(config=pod_config("trusted", tmp / "logs"))
    ).pod_sandbox_id
    refused = console(daemon, trusted)
    _, err = refused.communicate(b"", timeout=30)
    assert refused.returncode == 2 and b"not in a VM" in err, err
    unknown = console(daemon, "ffffffffffffffff")
    _, err = unknown.communicate(b"", timeout=30)
    assert unknown.returncode == 2 and b"not found" in err, err
    remove_pods(daemon, pod_id, trusted)
    assert leftovers(daemon, tmp) == []


def test_a_privileged_container_builds_a_bridge_inside_its_vm(env):
    """Privileged means privileged in the guest: what a node allows (here `brctl addbr`) works there too."""
    daemon, image, tmp, _ = env
    pod_id, cid = start_sleeper(daemon, image, tmp, "privileged", privileged=True)
    result = exec_sync(daemon, cid, "sh", "-c", "busybox brctl addbr foobar && cat /sys/class/net/foobar/ifindex")
    assert result.exit_code == 0, result.stderr
    remove_pods(daemon, pod_id)
    wait_for(lambda: leftovers(daemon, tmp) == [], timeout=30, what="no leftovers")


def test_no_guest_can_change_the_userland_image_every_vm_maps(env):
    """The image is mapped into every VM: a guest's root (here a privileged container) writing to it changes
    neither what the guest reads back nor the file on the host. (The blocks written are the image's last, free
    ones: overwriting its file system's metadata would only make the guest's own ext4 fail, and kill its agent.)"""
    daemon, image, tmp, assets = env
    before = hashlib.sha256(assets.userland.read_bytes()).hexdigest()
    last_blocks = hashlib.md5(assets.userland.read_bytes()[-16 * 4096 :]).hexdigest()
    pod_id, cid = start_sleeper(daemon, image, tmp, "hostile-image", privileged=True)
    script = (  # direct I/O: past the guest's page cache, to the memory QEMU maps
        'mknod /tmp/pmem b $(tr : " " < /sys/block/pmem0/dev) && end=$(($(cat /sys/block/pmem0/size) / 8 - 16)) '
        "&& dd if=/dev/urandom of=/tmp/pmem bs=4096 seek=$end count=16 oflag=direct 2>/dev/null "
        "&& dd if=/tmp/pmem bs=4096 skip=$end count=16 iflag=direct 2>/dev/null | md5sum"
    )
    result = exec_sync(daemon, cid, "sh", "-c", script)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.decode().split()[0] == last_blocks  # the writes went nowhere
    assert hashlib.sha256(assets.userland.read_bytes()).hexdigest() == before
    remove_pods(daemon, pod_id)
    wait_for(lambda: leftovers(daemon, tmp) == [], timeout=30, what="no leftovers")


def test_the_guest_kernel_is_locked_down(env):
    """Every VM's kernel runs with lockdown=confidentiality (qemu.py says why): even a privileged container's
    root finds the kernel's debugging doors shut, and tracefs holds none of the event files it would have made
    in every guest's RAM."""
    daemon, image, tmp, _ = env
    pod_id, cid = start_sleeper(daemon, image, tmp, "locked-down", privileged=True)
    script = (
        "mkdir -p /tmp/security /tmp/trace && mount -t securityfs none /tmp/security && cat /tmp/security/lockdown "
        "&& mount -t tracefs none /tmp/trace && ls /tmp/trace | wc -l && cat /dev/mem > /dev/null"
    )
    result = exec_sync(daemon, cid, "sh", "-c", script)
    lines = result.stdout.decode().split("\n")
    assert lines[0] == "none integrity [confidentiality]", result
    assert lines[1].strip() == "0", result  # no trace files at all
    assert result.exit_code != 0 and b"/dev/mem" in result.stderr, result  # even root cannot read the guest's memory
    remove_pods(daemon, pod_id)
    wait_for(lambda: leftovers(daemon, tmp) == [], timeout=30, what="no leftovers")
