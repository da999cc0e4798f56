"""A tiny synchronous rtnetlink client: the few link, address and route changes SetupPod makes.

The guest has busybox `ip`, but under TCG every process start costs about
50 ms and SetupPod needs around five of them; one netlink socket does the same
work in microseconds. Standard library only (the agent's rule): `socket` speaks
AF_NETLINK and `struct` lays out the messages.

Requests are blocking: rtnetlink handles a request inside sendmsg, so its
acknowledgement is already queued when `send` returns.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import socket
import struct
from types import TracebackType

# <linux/netlink.h>
_NLMSG_ERROR = 2
_NLM_F_REQUEST, _NLM_F_ACK = 0x1, 0x4
_NLM_F_REPLACE, _NLM_F_EXCL, _NLM_F_CREATE = 0x100, 0x200, 0x400
_NLM_F_ACK_TLVS = 0x200  # flag of an NLMSG_ERROR reply
_NLMSGERR_ATTR_MSG = 1
_SOL_NETLINK = 270  # not exported by Python's socket module
_NETLINK_CAP_ACK, _NETLINK_EXT_ACK = 10, 11
# <linux/rtnetlink.h>, <linux/if_link.h>, <linux/if_addr.h>, <linux/if.h>
_RTM_NEWLINK, _RTM_NEWADDR, _RTM_NEWROUTE = 16, 20, 24
_IFLA_ADDRESS, _IFLA_IFNAME, _IFLA_MTU = 1, 3, 4
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_RTA_DST, _RTA_OIF, _RTA_GATEWAY = 1, 4, 5
_RT_TABLE_MAIN, _RTPROT_BOOT, _RTN_UNICAST = 254, 3, 1
_RT_SCOPE_UNIVERSE, _RT_SCOPE_LINK, _RT_SCOPE_HOST = 0, 253, 254
_IFF_UP = 0x1

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_NLMSGERR = struct.Struct("=i")  # followed by the request's header (only that: NETLINK_CAP_ACK)
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst/src length, tos, table, protocol, scope, type, flags
_RTATTR = struct.Struct("=HH")  # length, type


def _align(length: int) -> int:
    """NLMSG_ALIGN / RTA_ALIGN: netlink messages and attributes start on 4-byte boundaries."""
    return (length + 3) & ~3


def _attr(kind: int, value: bytes) -> bytes:
    """One route attribute, padded so that the next one is aligned."""
    length = _RTATTR.size + len(value)
    return _RTATTR.pack(length, kind) + value + bytes(_align(length) - length)


def _family(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


class NetlinkError(Exception):
    """The kernel refused a request: `errno` is the positive errno, the message names the operation."""

    def __init__(self, code: int, operation: str, detail: str = "") -> None:
        self.errno = code
        self.operation = operation
        self.detail = detail
        reason = os.strerror(code) + (f" ({detail})" if detail else "")
        super().__init__(f"{operation}: {reason}")


class Rtnetlink:
    """One NETLINK_ROUTE socket in the caller's network namespace; use as a context manager."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            # Errors then carry the kernel's own explanation and do not echo the whole request back.
            self._sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
            self._sock.setsockopt(_SOL_NETLINK, _NETLINK_EXT_ACK, 1)
            self._sock.bind((0, 0))  # the kernel picks the port id
        except BaseException:
            self._sock.close()
            raise
        self._seq = itertools.count(1)

    def __enter__(self) -> Rtnetlink:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def link_index(self, name: str) -> int:
        """The index of the interface called `name` (requests address links by index, names can change)."""
        try:
            return socket.if_nametoindex(name)
        except OSError:
            raise NetlinkError(errno.ENODEV, f"find interface {name}") from None

    def set_link(
        self,
        name: str,
        *,
        up: bool | None = None,
        mtu: int | None = None,
        new_name: str | None = None,
        mac: str | None = None,
    ) -> None:
        """Change what is given of `name`'s state, MTU, MAC and name in one request.

        The kernel applies the MTU and the name before the flags, and kernels
        before 6.2 rename only a link that is down: take it down in an earlier call.
        """
        index = self.link_index(name)
        flags, change = (0, 0) if up is None else (_IFF_UP if up else 0, _IFF_UP)
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)
        if mtu is not None:
            body += _attr(_IFLA_MTU, struct.pack("=I", mtu))
        if mac:
            body += _attr(_IFLA_ADDRESS, bytes.fromhex(mac.replace(":", "")))
        if new_name:
            body += _attr(_IFLA_IFNAME, new_name.encode() + b"\0")
        self._request(_RTM_NEWLINK, 0, body, f"set link {name}")

    def add_address(self, name: str, cidr: str) -> None:
        """Add an IPv4 or IPv6 address such as 10.0.0.2/24; NetlinkError with EEXIST if it is there already."""
        interface = ipaddress.ip_interface(cidr)
        index = self.link_index(name)
        scope = _RT_SCOPE_HOST if interface.is_loopback else _RT_SCOPE_UNIVERSE
        packed = interface.ip.packed
        body = _IFADDRMSG.pack(_family(interface.version), interface.network.prefixlen, 0, scope, index)
        body += _attr(_IFA_LOCAL, packed) + _attr(_IFA_ADDRESS, packed)
        self._request(_RTM_NEWADDR, _NLM_F_CREATE | _NLM_F_EXCL, body, f"add address {cidr} to {name}")

    def replace_route(self, destination: str, *, gateway: str = "", device: str = "") -> None:
        """Create or replace the main-table route to `destination`, as `ip route replace` would.

        Host bits of the destination are dropped (CNI results may carry them).
        Without a gateway an IPv4 route is scoped to the link, like iproute2's.
        """
        network = ipaddress.ip_network(destination, strict=False)
        operation = f"replace route to {destination}" + (f" via {gateway}" if gateway else "")
        operation += f" dev {device}" if device else ""
        attrs = b""
        if network.prefixlen:
            attrs += _attr(_RTA_DST, network.network_address.packed)
        if gateway:
            via = ipaddress.ip_address(gateway)
            if via.version != network.version:
                raise ValueError(f"{operation}: the gateway is not an IPv{network.version} address")
            attrs += _attr(_RTA_GATEWAY, via.packed)
        if device:
            attrs += _attr(_RTA_OIF, struct.pack("=i", self.link_index(device)))
        scope = _RT_SCOPE_LINK if network.version == 4 and not gateway else _RT_SCOPE_UNIVERSE
        family = _family(network.version)
        header = _RTMSG.pack(family, network.prefixlen, 0, 0, _RT_TABLE_MAIN, _RTPROT_BOOT, scope, _RTN_UNICAST, 0)
        self._request(_RTM_NEWROUTE, _NLM_F_CREATE | _NLM_F_REPLACE, header + attrs, operation)

    def _request(self, kind: int, flags: int, body: bytes, operation: str) -> None:
        """Send one request and wait for its acknowledgement, skipping anything else the socket holds."""
        seq = next(self._seq)
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, _NLM_F_REQUEST | _NLM_F_ACK | flags, seq, 0)
        self._sock.send(header + body)
        while True:
            data = self._sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, reply, reply_flags, reply_seq, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    break  # malformed: drop the rest of this datagram
                if reply == _NLMSG_ERROR and reply_seq == seq:
                    (error,) = _NLMSGERR.unpack_from(data, offset + _NLMSGHDR.size)
                    if error == 0:
                        return
                    message = data[offset : offset + length]
                    raise NetlinkError(-error, operation, _ack_message(message, reply_flags))
                offset += _align(length)


def _ack_message(message: bytes, flags: int) -> str:
    """The kernel's extended-ack text (NLMSGERR_ATTR_MSG) in an NLMSG_ERROR reply, or ""."""
    if not flags & _NLM_F_ACK_TLVS:
        return ""
    offset = _NLMSGHDR.size + _NLMSGERR.size + _NLMSGHDR.size  # NETLINK_CAP_ACK: only the request's header
    while offset + _RTATTR.size <= len(message):
        length, kind = _RTATTR.unpack_from(message, offset)
        if length < _RTATTR.size:
            break
        if kind == _NLMSGERR_ATTR_MSG:
            return message[offset + _RTATTR.size : offset + length].split(b"\0", 1)[0].decode(errors="replace")
        offset += _align(length)
    return ""
