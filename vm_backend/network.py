"""A pod VM's network: a tap beside the CNI veth, joined to it by tc redirects (Kata's tcfilter model).

CNI configures the pod's netns exactly as for a runc pod. Then, inside that
netns, every frame arriving on the veth is redirected out of the tap (to QEMU,
so the guest) and every frame the guest sends is redirected out of the veth.
The netns keeps only that L2 plumbing: its IP configuration moves into the
guest, whose NIC takes over the veth's MAC so that what the CNI bridge and the
host's neighbour table learned about the pod stays true.

Nothing here moves a thread of the daemon into a pod's netns: netlink sockets
and tap file descriptors are opened on a throwaway thread that enters the
netns and then ends, and a socket keeps the namespace it was created in.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import os
import secrets
import socket
import struct
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from core.errors import FailedPrecondition, Unavailable
from sandbox import netns as netns_mod

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
_NETLINK_ROUTE = 0

# linux/if_tun.h
_TUNSETIFF = 0x400454CA
_TUNSETPERSIST = 0x400454CB
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000

_ETH_P_ALL = 0x0003
_INGRESS = 0xFFFF0000  # the ingress qdisc's handle, "ffff:"
_FLOWID = 0x10001  # u32 wants a class id; "1:1" as Kata uses, meaningless on ingress

# rtnetlink constants (linux/rtnetlink.h)
_RT_TABLE_MAIN = 254
_RTN_UNICAST = 1
_RTPROT_KERNEL = 2
_RT_SCOPE_LINK = 253

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Interface:
    """The guest NIC, as agent.proto's Interface: found in the guest by `mac`."""

    name: str
    mac: str
    addresses: list[str]  # CIDR, e.g. 10.88.0.5/16
    mtu: int


@dataclass(frozen=True)
class Route:
    """A guest route, as agent.proto's Route: `gateway` empty for on-link."""

    destination: str  # CIDR; 0.0.0.0/0 or ::/0 for a default route
    gateway: str
    device: str


@dataclass(frozen=True)
class GuestNetwork:
    """What SetupPod must give the guest, and the tap QEMU must open (`-netdev tap,ifname=...`)."""

    interfaces: list[Interface]
    routes: list[Route]
    tap_name: str


def random_mac() -> str:
    """A random unicast, locally administered MAC: cannot collide with any vendor-assigned one."""
    raw = bytearray(secrets.token_bytes(6))
    raw[0] = (raw[0] | 0x02) & 0xFE
    return ":".join(f"{b:02x}" for b in raw)


def addresses_from(addrs: Iterable[Mapping[str, Any]]) -> list[str]:
    """The guest's CIDRs from RTM_NEWADDR messages (pyroute2's or dicts with its keys).

    Link-local and host-scoped addresses stay behind: the guest kernel makes its own IPv6 link-local.
    """
    found: list[str] = []
    for msg in addrs:
        if msg.get("scope", 0) >= _RT_SCOPE_LINK:
            continue
        address = msg.get("local") or msg.get("address")  # IFA_LOCAL is the own address; IFA_ADDRESS a p2p peer
        if not address:
            continue
        cidr = str(ipaddress.ip_interface(f"{address}/{msg.get('prefixlen')}"))
        if cidr not in found:
            found.append(cidr)
    return found


def routes_from(routes: Iterable[Mapping[str, Any]], ifindex: int, device: str) -> list[Route]:
    """The guest's routes from RTM_NEWROUTE messages of the main table that leave through `ifindex`.

    Routes the kernel made for an address (proto kernel) are left out, as the guest's kernel makes
    them again when the agent adds the address. On-link routes come first, so that every gateway is
    reachable by the time a route through it is added.
    """
    found: list[Route] = []
    for msg in routes:
        if (
            msg.get("table") != _RT_TABLE_MAIN
            or msg.get("type") != _RTN_UNICAST
            or msg.get("proto") == _RTPROT_KERNEL
            or msg.get("oif") != ifindex
            or msg.get("family") not in (socket.AF_INET, socket.AF_INET6)
        ):
            continue
        dst = msg.get("dst") or ("0.0.0.0" if msg.get("family") == socket.AF_INET else "::")
        network = str(ipaddress.ip_network(f"{dst}/{msg.get('dst_len', 0)}", strict=False))
        route = Route(network, str(msg.get("gateway") or ""), device)
        if route not in found:
            found.append(route)
    return sorted(found, key=lambda r: bool(r.gateway))


def _enter_netns(netns: Path) -> None:
    """Move the calling thread, and only it, into the network namespace pinned at `netns`."""
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(netns))
    finally:
        os.close(fd)


async def _in_netns(netns: Path, fn: Callable[[], T]) -> T:
    """`fn()` on a thread of its own inside `netns`; that thread then ends, so no pooled thread is ever left there."""

    def call() -> T:
        _enter_netns(netns)
        return fn()

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-netns")
    try:
        return await asyncio.wrap_future(pool.submit(call))
    finally:
        pool.shutdown(wait=False)


def _netlink_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_ROUTE)


def _create_tap(name: str) -> None:
    """A persistent tap as QEMU's `-netdev tap,ifname=NAME` opens it: one queue, no packet info header.

    The flags QEMU adds when it opens the tap (IFF_VNET_HDR) may differ; only IFF_MULTI_QUEUE has to match.
    """
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI))
        fcntl.ioctl(fd, _TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def _open_tap(name: str) -> int:
    """A queue of the persistent tap `name`, opened as QEMU's `-netdev tap,ifname=` would: with virtio-net headers."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR))
    except BaseException:
        os.close(fd)
        raise
    return fd


async def open_tap(netns: Path, name: str) -> int:
    """An open file descriptor of the tap `name` in `netns`, for QEMU (`-netdev tap,fd=N`): QEMU itself then
    needs neither /dev/net/tun nor CAP_NET_ADMIN. The caller closes it once QEMU has it."""
    try:
        return await _in_netns(netns, lambda: _open_tap(name))
    except OSError as e:
        raise Unavailable(f"cannot open {name} in {netns}: {e}") from e


async def _link(ipr: AsyncIPRoute, name: str) -> Any | None:
    """Link `name` in the socket's netns as pyroute2's RTM_NEWLINK message, None if there is none."""
    try:
        (link,) = await ipr.link("get", ifname=name)
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise
    return link


async def _redirect(ipr: AsyncIPRoute, src: int, dst: int) -> None:
    """Send every frame that arrives on `src` out of `dst`: an ingress qdisc and a match-all u32 filter.

    u32 rather than matchall, which not every kernel is built with.
    """
    await ipr.tc("add", "ingress", index=src)
    await ipr.tc(
        "add-filter",
        "u32",
        index=src,
        parent=_INGRESS,
        protocol=_ETH_P_ALL,
        target=_FLOWID,
        keys=["0x0/0x0+0"],
        action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": dst},
    )


async def _unplumb(ipr: AsyncIPRoute, veth: str, tap: str) -> None:
    """Remove the veth's ingress qdisc (its filter goes with it) and the tap (its qdisc and filter go with it)."""
    link = await _link(ipr, veth)
    if link is not None:
        try:
            await ipr.tc("del", "ingress", index=link["index"])
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise
    link = await _link(ipr, tap)
    if link is not None:
        try:
            await ipr.link("del", index=link["index"])
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise


async def make_tap(netns: Path, tap: str = "tap0") -> None:
    """A persistent tap in `netns`, for a warm VM's QEMU to open before its pod (and its veth) exists."""
    try:
        await _in_netns(netns, lambda: _create_tap(tap))
    except OSError as e:
        raise Unavailable(f"cannot create {tap} in {netns}: {e}") from e


async def attach_tap(netns: Path, *, veth: str = "eth0", tap: str = "tap0", made: bool = False) -> GuestNetwork:
    """Join a tap to the pod's CNI veth in `netns` and hand the veth's IP configuration to the guest.

    Run after CNI ADD, before QEMU starts (a new tap) or, with `made`, with the tap `make_tap` made before
    (a warm VM's QEMU holds it already). The returned Interface carries the veth's original MAC, which the
    guest NIC must use; the veth gets a random one. Refused, changing nothing, when the veth is missing or
    has no address, or the tap exists (attached already) or, with `made`, does not. If joining fails half-way
    the tap and qdiscs are removed again, but the veth may have lost its addresses: tear the pod's network down.
    """
    try:
        sock = await _in_netns(netns, _netlink_socket)
    except OSError as e:
        raise FailedPrecondition(f"cannot enter network namespace {netns}: {e}") from e
    async with AsyncIPRoute(use_socket=sock) as ipr:
        try:
            link = await _link(ipr, veth)
            if link is None:
                raise FailedPrecondition(f"no {veth} in {netns}: CNI ADD must run first")
            index, mac, mtu = int(link["index"]), str(link.get("address")), int(link.get("mtu"))
            addresses = addresses_from([a async for a in await ipr.addr("dump", index=index)])
            if not addresses:
                raise FailedPrecondition(f"{veth} in {netns} has no address: CNI ADD must run first")
            if (await _link(ipr, tap) is not None) != made:
                state = "exists" if not made else "is missing"
                raise FailedPrecondition(f"{tap} {state} in {netns}: the pod's VM network is not what it should be")
            routes = routes_from([r async for r in await ipr.route("dump")], index, veth)
        except NetlinkError as e:
            raise Unavailable(f"cannot read {veth} in {netns}: {e}") from e
        try:
            if not made:
                await _in_netns(netns, lambda: _create_tap(tap))
            (tap_link,) = await ipr.link("get", ifname=tap)
            await ipr.link("set", index=tap_link["index"], mtu=mtu, state="up")
            await _redirect(ipr, index, tap_link["index"])
            await _redirect(ipr, tap_link["index"], index)
            await ipr.link("set", index=index, address=random_mac())
            # Last: with its addresses the kernel also drops the netns's routes through the veth.
            await ipr.flush_addr(index=index)
        except BaseException as e:
            with contextlib.suppress(NetlinkError, OSError):
                await _unplumb(ipr, veth, tap)
            if isinstance(e, NetlinkError | OSError):
                raise Unavailable(f"cannot join {tap} to {veth} in {netns}: {e}") from e
            raise
    return GuestNetwork([Interface(veth, mac, addresses, mtu)], routes, tap)


async def detach_tap(netns: Path, tap: str = "tap0", *, veth: str = "eth0") -> None:
    """Remove what attach_tap added (filters, qdiscs, the tap); nothing happens if it or the netns is gone.

    Run after QEMU has exited and before CNI DEL.
    """
    if not netns_mod.exists(netns):
        return
    try:
        sock = await _in_netns(netns, _netlink_socket)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EINVAL):  # unmounted since the check
            return
        raise Unavailable(f"cannot enter network namespace {netns}: {e}") from e
    async with AsyncIPRoute(use_socket=sock) as ipr:
        try:
            await _unplumb(ipr, veth, tap)
        except NetlinkError as e:
            raise Unavailable(f"cannot remove {tap} from {netns}: {e}") from e
