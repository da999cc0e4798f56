"""SetupPod: give the guest the pod's identity, network, sysctls and clock, and the files its containers mount.

Files go to `<run>/pod/`: `hostname`, `resolv.conf`, `hosts` and `shm/` (a
tmpfs), which the host's specs bind-mount at /etc/hostname, /etc/resolv.conf,
/etc/hosts and /dev/shm. The pod's shared directory (virtio-fs) is mounted at
`<run>/share`. Everything that changes the machine goes through `System`, so
that `--dry-setup` (the agent run on a real host, in tests) logs instead.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from protos import agent_pb2

from . import syscalls
from .errors import Fail
from .netlink import NetlinkError, Rtnetlink

log = logging.getLogger("tandem.agent.pod")

SHM_OPTIONS = "mode=1777,size=65536k"  # containerd's and CRI-O's default /dev/shm
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


class System:
    """The machine-changing operations of SetupPod, done for real (inside the guest)."""

    def __init__(self, net_dir: Path = Path("/sys/class/net"), proc_sys: Path = Path("/proc/sys")) -> None:
        self.net_dir = net_dir
        self.proc_sys = proc_sys

    def nic_by_mac(self, mac: str) -> str | None:
        """The current name of the network interface with this MAC (read-only: dry runs use it too)."""
        for nic in sorted(os.listdir(self.net_dir)):
            try:
                if (self.net_dir / nic / "address").read_text().strip().lower() == mac:
                    return nic
            except OSError:
                continue
        return None

    def configure_network(self, plan: Sequence[NetworkChange]) -> None:
        with Rtnetlink() as rtnl:
            apply_network_plan(rtnl, plan)

    def sethostname(self, name: str) -> None:
        socket.sethostname(name)

    def sysctl(self, name: str, value: str) -> None:
        sysctl_path(name, self.proc_sys).write_text(value)

    def set_clock(self, unix_ns: int) -> None:
        time.clock_settime_ns(time.CLOCK_REALTIME, unix_ns)

    def mount(self, source: str, target: Path, fstype: str, flags: int = 0, options: str = "") -> None:
        target.mkdir(parents=True, exist_ok=True)
        if not os.path.ismount(target):
            syscalls.mount(source, str(target), fstype, flags, options)


class DrySystem(System):
    """Logs what SetupPod would change and changes nothing: for the agent run on a real host in tests."""

    def configure_network(self, plan: Sequence[NetworkChange]) -> None:
        for change in plan:
            log.info("dry setup: would make %s", change)

    def sethostname(self, name: str) -> None:
        log.info("dry setup: would set the hostname to %s", name)

    def sysctl(self, name: str, value: str) -> None:
        log.info("dry setup: would write %s to %s", value, sysctl_path(name, self.proc_sys))

    def set_clock(self, unix_ns: int) -> None:
        log.info("dry setup: would set the clock to %d ns", unix_ns)

    def mount(self, source: str, target: Path, fstype: str, flags: int = 0, options: str = "") -> None:
        target.mkdir(parents=True, exist_ok=True)
        log.info("dry setup: would mount %s %s on %s", fstype, source, target)


def sysctl_path(name: str, proc_sys: Path = Path("/proc/sys")) -> Path:
    """Where a sysctl lives: dots separate components, unless the name uses slashes (then dots are literal)."""
    parts = name.split("/") if "/" in name else name.split(".")
    if any(p in ("", ".", "..") for p in parts):
        raise Fail(agent_pb2.INVALID_ARGUMENT, f"invalid sysctl name {name!r}")
    return proc_sys.joinpath(*parts)


def _check_interface(iface: agent_pb2.Interface) -> None:
    if not _IFNAME.fullmatch(iface.name):
        raise Fail(agent_pb2.INVALID_ARGUMENT, f"invalid interface name {iface.name!r}")
    for mac in (iface.mac, iface.current_mac) if iface.current_mac else (iface.mac,):
        if not _MAC.fullmatch(mac.lower()):
            raise Fail(agent_pb2.INVALID_ARGUMENT, f"invalid MAC address {mac!r}")
    try:
        for address in iface.addresses:
            ipaddress.ip_interface(address)
    except ValueError as e:
        raise Fail(agent_pb2.INVALID_ARGUMENT, f"interface {iface.name}: {e}") from None


def _check_route(route: agent_pb2.Route) -> None:
    try:
        ipaddress.ip_network(route.destination, strict=False)
        if route.gateway:
            ipaddress.ip_address(route.gateway)
    except ValueError as e:
        raise Fail(agent_pb2.INVALID_ARGUMENT, f"route to {route.destination!r}: {e}") from None
    if route.device and not _IFNAME.fullmatch(route.device):
        raise Fail(agent_pb2.INVALID_ARGUMENT, f"invalid route device {route.device!r}")


@dataclass(frozen=True)
class SetLink:
    name: str
    up: bool | None = None
    mtu: int | None = None
    new_name: str | None = None
    mac: str | None = None


@dataclass(frozen=True)
class AddAddress:
    name: str
    cidr: str


@dataclass(frozen=True)
class ReplaceRoute:
    destination: str
    gateway: str = ""
    device: str = ""


NetworkChange = SetLink | AddAddress | ReplaceRoute


def network_plan(
    interfaces: Sequence[tuple[str, agent_pb2.Interface]], routes: Sequence[agent_pb2.Route]
) -> list[NetworkChange]:
    """The changes for (current NIC name, wanted interface) pairs and routes, in order.

    An interface with `current_mac` is the NIC found by that MAC, which takes `mac`
    (a warm VM's NIC, booted before its pod's network existed), while it is down.

    Netlink, not busybox `ip`: under TCG each `ip` is a process start of about
    50 ms, and a pod needs five or more. The plan is safe to repeat (a retried
    SetupPod): a NIC already renamed is not renamed again, routes are replaced,
    and an address that exists is skipped.
    """
    plan: list[NetworkChange] = [SetLink("lo", up=True)]
    for current, iface in interfaces:
        new_mac = iface.current_mac and iface.current_mac.lower() != iface.mac.lower()
        if current != iface.name or new_mac:  # a NIC can only be renamed while down (before Linux 6.2)
            plan.append(SetLink(current, up=False))
        if new_mac:
            plan.append(SetLink(current, mac=iface.mac.lower()))
        if current != iface.name:
            plan.append(SetLink(current, new_name=iface.name))
        if iface.mtu:
            plan.append(SetLink(iface.name, mtu=iface.mtu))
        plan += [AddAddress(iface.name, address) for address in iface.addresses]
        plan.append(SetLink(iface.name, up=True))
    plan += [ReplaceRoute(r.destination, r.gateway, r.device) for r in routes]
    return plan


def apply_network_plan(rtnl: Rtnetlink, plan: Sequence[NetworkChange]) -> None:
    """Apply `plan` in order; an address that exists already is skipped, any other refusal fails SetupPod."""
    for change in plan:
        try:
            if isinstance(change, SetLink):
                rtnl.set_link(change.name, up=change.up, mtu=change.mtu, new_name=change.new_name, mac=change.mac)
            elif isinstance(change, AddAddress):
                rtnl.add_address(change.name, change.cidr)
            else:
                rtnl.replace_route(change.destination, gateway=change.gateway, device=change.device)
        except NetlinkError as e:
            if not (isinstance(change, AddAddress) and e.errno == errno.EEXIST):
                raise Fail(agent_pb2.INTERNAL, f"network setup failed: {e}") from None


class PodSetup:
    """Applies SetupPod to the guest through `system`."""

    def __init__(self, system: System, pod_dir: Path, share_dir: Path) -> None:
        self.system = system
        self.pod_dir = pod_dir
        self.share_dir = share_dir

    async def apply(self, request: agent_pb2.SetupPod) -> None:
        """Clock first (everything after is timestamped), then files and mounts, then the network."""
        for iface in request.interfaces:
            _check_interface(iface)
        for route in request.routes:
            _check_route(route)
        for name in request.sysctls:
            sysctl_path(name)
        if request.host_time_unix_ns:
            self.system.set_clock(request.host_time_unix_ns)
        self.pod_dir.mkdir(parents=True, exist_ok=True)
        # Written in place, not replaced: containers bind-mount these inodes.
        (self.pod_dir / "hostname").write_text(f"{request.hostname}\n" if request.hostname else "")
        (self.pod_dir / "resolv.conf").write_bytes(request.resolv_conf)
        (self.pod_dir / "hosts").write_bytes(request.hosts)
        flags = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
        self.system.mount("shm", self.pod_dir / "shm", "tmpfs", flags, SHM_OPTIONS)
        if request.shared_dir_tag:
            self.system.mount(request.shared_dir_tag, self.share_dir, "virtiofs")
        if request.hostname:
            self.system.sethostname(request.hostname)
        for name, value in sorted(request.sysctls.items()):
            self.system.sysctl(name, value)
        self._network(request)

    def _network(self, request: agent_pb2.SetupPod) -> None:
        pairs = []
        for iface in request.interfaces:
            current = self.system.nic_by_mac(iface.current_mac.lower()) if iface.current_mac else None
            if current is None:  # no MAC to change, or changed already (a retried SetupPod)
                iface = agent_pb2.Interface(name=iface.name, mac=iface.mac, addresses=iface.addresses, mtu=iface.mtu)
                current = self.system.nic_by_mac(iface.mac.lower())
            if current is None:
                raise Fail(agent_pb2.NOT_FOUND, f"no network interface has MAC {iface.mac}")
            pairs.append((current, iface))
        self.system.configure_network(network_plan(pairs, request.routes))
