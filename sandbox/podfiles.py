"""A pod's hostname, /etc/resolv.conf and /etc/hosts: the same rules for both backends."""

from __future__ import annotations

import os
from pathlib import Path

from core.errors import InvalidArgument
from protos import cri_pb2 as pb

MAX_HOSTNAME_BYTES = 64  # the kernel's limit (sethostname fails with EINVAL beyond it)


def hostname(config: pb.PodSandboxConfig) -> str:
    """The pod's hostname: the one it asked for, else the node's, as containerd does."""
    name = config.hostname or os.uname().nodename
    if len(name.encode()) > MAX_HOSTNAME_BYTES:
        raise InvalidArgument(f"pod hostname {name!r} is longer than {MAX_HOSTNAME_BYTES} bytes")
    return name


def resolv_conf(dns: pb.DNSConfig) -> bytes:
    """The pod's resolv.conf: its DNS config, or the host's file when the pod gave none."""
    if not dns.servers and not dns.searches and not dns.options:
        return Path("/etc/resolv.conf").read_bytes() if Path("/etc/resolv.conf").exists() else b""
    lines = [f"nameserver {s}" for s in dns.servers]
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return ("\n".join(lines) + "\n").encode()


def hosts(hostname: str, ips: list[str]) -> bytes:
    """The pod's hosts file: localhost, and the hostname at each of the pod's IPs."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{ip}\t{hostname}" for ip in ips]
    return ("\n".join(lines) + "\n").encode()
