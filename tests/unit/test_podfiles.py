import os

import pytest

from core.errors import InvalidArgument
from protos import cri_pb2 as pb
from sandbox import podfiles


def test_hostname_is_the_pods_or_the_nodes():
    assert podfiles.hostname(pb.PodSandboxConfig(hostname="web-0")) == "web-0"
    assert podfiles.hostname(pb.PodSandboxConfig()) == os.uname().nodename


def test_a_hostname_the_kernel_would_refuse_is_invalid():
    with pytest.raises(InvalidArgument, match="longer than 64 bytes"):
        podfiles.hostname(pb.PodSandboxConfig(hostname="x" * 65))


def test_resolv_conf_and_hosts():
    dns = pb.DNSConfig(servers=["10.0.0.10"], searches=["ns.svc"], options=["ndots:5"])
    assert podfiles.resolv_conf(dns) == b"nameserver 10.0.0.10\nsearch ns.svc\noptions ndots:5\n"
    assert b"10.1.0.7\tweb-0" in podfiles.hosts("web-0", ["10.1.0.7"])
