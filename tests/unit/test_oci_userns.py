"""User namespaces in the OCI layer: the CRI's userns_options checked and mapped into infra and container specs."""

import pytest

from core.errors import InvalidArgument, Unimplemented
from protos import cri_pb2 as pb
from sandbox.oci.namespaces import NEW, Namespaces
from sandbox.oci.spec import infra_spec
from sandbox.oci.userns import IdMappings, IdRange, check_container_user_namespace, pod_user_namespace
from tests.support.specs import SC, config, fake_host, fake_mountinfo, fake_pod_files, fake_rootfs, mount_at, spec_maker

MAPPING = [pb.IDMapping(container_id=0, host_id=65536, length=65536)]
MAPPINGS = IdMappings(IdRange(0, 65536, 65536), IdRange(0, 65536, 65536))
USER_NS = Namespaces(
    network="/run/pod/net",
    ipc="/run/pod/ipc",
    uts="/run/pod/uts",
    pid=NEW,
    user="/run/pod/user",
    id_mappings=MAPPINGS,
)


def options(mode=pb.POD, uids=MAPPING, gids=MAPPING, **namespaces) -> pb.NamespaceOption:
    return pb.NamespaceOption(userns_options=pb.UserNamespace(mode=mode, uids=uids, gids=gids), **namespaces)


def userns_pod() -> pb.PodSandboxConfig:
    pod = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="web", uid="uid-1", namespace="default"), hostname="web-0"
    )
    pod.linux.security_context.namespace_options.CopyFrom(options())
    return pod


@pytest.fixture
def make(tmp_path):
    return spec_maker(fake_rootfs(tmp_path), fake_host(tmp_path, fake_mountinfo(tmp_path)), fake_pod_files(tmp_path))


def test_the_pods_mappings():
    assert pod_user_namespace(options()) == MAPPINGS
    assert MAPPINGS.root == (65536, 65536)
    assert MAPPINGS.uids.to_host(0) == 65536 and MAPPINGS.uids.to_host(65535) == 131071
    assert MAPPINGS.uids.to_host(65536) is None
    assert MAPPINGS.uids.line() == "0 65536 65536\n"


@pytest.mark.parametrize(
    "asked",
    [pb.NamespaceOption(), options(mode=pb.NODE, uids=[], gids=[]), pb.NamespaceOption(network=pb.NODE)],
)
def test_the_hosts_user_namespace(asked):
    assert pod_user_namespace(asked) is None


@pytest.mark.parametrize(
    ("asked", "message"),
    [
        (options(mode=pb.NODE), "NODE is the host's user namespace: it takes no mappings"),
        (options(mode=pb.CONTAINER, uids=[], gids=[]), "mode CONTAINER is not supported"),
        (options(mode=pb.TARGET, uids=[], gids=[]), "mode TARGET is not supported"),
        (options(uids=MAPPING * 2), "exactly one UID mapping, got 2"),
        (options(gids=[]), "exactly one GID mapping, got 0"),
        (options(uids=[pb.IDMapping(container_id=1, host_id=1000, length=100000)]), "must map container ID 0"),
        (options(gids=[pb.IDMapping(host_id=1000, length=0)]), "GID mapping has length 0"),
        (options(uids=[pb.IDMapping(host_id=2**32 - 10, length=65536)]), "ends past the last ID"),
        (options(network=pb.NODE), "host's network namespace"),
        (options(pid=pb.NODE), "host's PID namespace"),
        (options(ipc=pb.NODE), "host's IPC namespace"),
    ],
)
def test_refused_user_namespaces(asked, message):
    with pytest.raises(InvalidArgument, match=message):
        pod_user_namespace(asked)


def test_a_mapping_may_not_reach_the_vm_jails_uids():
    jail = range(0x70000000, 0x70000000 + 65536)
    asked = options(uids=[pb.IDMapping(host_id=0x70000000 - 10, length=65536)])
    with pytest.raises(InvalidArgument, match="overlaps host IDs this node reserves"):
        pod_user_namespace(asked, [jail])
    assert pod_user_namespace(options(), [jail]) == MAPPINGS


def test_containers_share_the_pods_user_namespace():
    check_container_user_namespace(options(), options())
    check_container_user_namespace(pb.NamespaceOption(), options())  # unset: the pod's
    check_container_user_namespace(options(mode=pb.NODE, uids=[], gids=[]), pb.NamespaceOption())
    other = [pb.IDMapping(container_id=0, host_id=131072, length=65536)]
    for container in (options(uids=other, gids=other), options(mode=pb.NODE, uids=[], gids=[])):
        with pytest.raises(InvalidArgument, match="differ from its pod's"):
            check_container_user_namespace(container, options())


def test_the_infra_process_joins_the_pods_user_namespace(tmp_path):
    spec = infra_spec(userns_pod(), rootfs=tmp_path, namespaces=USER_NS, cgroups_path="/x")
    linux = spec["linux"]
    assert linux["namespaces"] == [
        {"type": "user", "path": "/run/pod/user"},
        {"type": "pid"},
        {"type": "network", "path": "/run/pod/net"},
        {"type": "ipc", "path": "/run/pod/ipc"},
        {"type": "uts", "path": "/run/pod/uts"},
        {"type": "mount"},
    ]
    assert linux["uidMappings"] == linux["gidMappings"] == [{"containerID": 0, "hostID": 65536, "size": 65536}]
    assert spec["hostname"] == "web-0"


def test_a_container_joins_it_and_its_mounts_carry_the_pods_mappings(make, tmp_path):
    sc = SC(namespace_options=options())
    mounts = [
        pb.Mount(container_path="/data", host_path=str(tmp_path / "private"), uidMappings=MAPPING, gidMappings=MAPPING),
        pb.Mount(container_path="/plain", host_path=str(tmp_path / "private")),
    ]
    spec = make(config(sc=sc, mounts=mounts), sandbox=userns_pod(), namespaces=USER_NS)
    assert {"type": "user", "path": "/run/pod/user"} in spec["linux"]["namespaces"]
    assert spec["linux"]["uidMappings"] == [{"containerID": 0, "hostID": 65536, "size": 65536}]
    data = mount_at(spec, "/data")
    assert data["uidMappings"] == data["gidMappings"] == [{"containerID": 0, "hostID": 65536, "size": 65536}]
    assert "uidMappings" not in mount_at(spec, "/plain")


def test_without_a_user_namespace_there_are_no_mappings(make):
    spec = make(config())
    assert "uidMappings" not in spec["linux"] and all(n["type"] != "user" for n in spec["linux"]["namespaces"])


def test_a_mount_mapped_otherwise_than_the_pod_is_unimplemented(make, tmp_path):
    other = [pb.IDMapping(container_id=0, host_id=131072, length=65536)]
    mount = pb.Mount(container_path="/data", host_path=str(tmp_path / "private"), uidMappings=other, gidMappings=other)
    with pytest.raises(Unimplemented, match="other than the pod's"):
        make(config(sc=SC(namespace_options=options()), mounts=[mount]), sandbox=userns_pod(), namespaces=USER_NS)


def test_an_id_mapped_mount_cannot_propagate(make, tmp_path):
    mount = pb.Mount(
        container_path="/data",
        host_path=str(tmp_path / "slave"),
        uidMappings=MAPPING,
        gidMappings=MAPPING,
        propagation=pb.PROPAGATION_HOST_TO_CONTAINER,
    )
    with pytest.raises(InvalidArgument, match="needs private propagation"):
        make(config(sc=SC(namespace_options=options()), mounts=[mount]), sandbox=userns_pod(), namespaces=USER_NS)


def test_a_container_asking_for_another_user_namespace_is_refused(make):
    other = [pb.IDMapping(container_id=0, host_id=131072, length=65536)]
    with pytest.raises(InvalidArgument, match="differ from its pod's"):
        make(config(sc=SC(namespace_options=options(uids=other))), sandbox=userns_pod(), namespaces=USER_NS)


def test_namespaces_need_mappings_exactly_with_a_user_namespace():
    with pytest.raises(ValueError):
        Namespaces(network=NEW, ipc=NEW, uts=NEW, pid=NEW, user="/run/pod/user")
    with pytest.raises(ValueError):
        Namespaces(network=NEW, ipc=NEW, uts=NEW, pid=NEW, id_mappings=MAPPINGS)
