import dataclasses
import json
import os
import stat

import pytest

from core.errors import FailedPrecondition, InvalidArgument, NotFound
from protos import cri_pb2 as pb
from runc_backend.host import detect_host
from sandbox.oci.capabilities import CAPABILITIES, DEFAULT_CAPABILITIES, capabilities_from_status
from sandbox.oci.namespaces import HOST, NEW, Namespaces
from sandbox.oci.seccomp import runtime_default_profile
from sandbox.oci.spec import infra_spec
from tests.support.specs import (
    DEV_NULL,
    HOST_CAPS,
    INFRA_NS,
    SC,
    config,
    fake_host,
    fake_mountinfo,
    fake_pod_files,
    fake_rootfs,
    mount_at,
    sandbox_config,
    spec_maker,
)


@pytest.fixture
def rootfs(tmp_path):
    return fake_rootfs(tmp_path)


@pytest.fixture
def mountinfo(tmp_path):
    return fake_mountinfo(tmp_path)


@pytest.fixture
def host(tmp_path, mountinfo):
    return fake_host(tmp_path, mountinfo)


@pytest.fixture
def pod_files(tmp_path):
    return fake_pod_files(tmp_path)


@pytest.fixture
def make(rootfs, host, pod_files):
    return spec_maker(rootfs, host, pod_files)


# ---------------------------------------------------------------- process


@pytest.mark.parametrize(
    ("command", "args", "entrypoint", "cmd", "expected"),
    [
        (["run"], ["a"], ["/entry"], ["--serve"], ["run", "a"]),
        (["run"], [], ["/entry"], ["--serve"], ["run"]),
        ([], ["a", "b"], ["/entry"], ["--serve"], ["/entry", "a", "b"]),
        ([], [], ["/entry"], ["--serve"], ["/entry", "--serve"]),
        ([], [], None, ["sh"], ["sh"]),
        ([], [], [""], ["sh"], ["sh"]),
        ([], ["x"], None, ["sh"], ["x"]),
    ],
)
def test_process_args_follow_kubernetes_rules(make, command, args, entrypoint, cmd, expected):
    image = {"config": {"Entrypoint": entrypoint, "Cmd": cmd}}
    assert make(config(command=command, args=args), image=image)["process"]["args"] == expected


def test_no_command_at_all_is_invalid(make):
    with pytest.raises(InvalidArgument, match="no command specified"):
        make(config(command=[]), image={"config": {}})


def test_environment_image_then_config_with_hostname(make):
    envs = [pb.KeyValue(key="LANG", value="en"), pb.KeyValue(key="EMPTY", value="")]
    env = make(config(envs=envs))["process"]["env"]
    assert env == ["PATH=/bin:/usr/bin", "HOSTNAME=web-0", "LANG=en", "EMPTY="]


def test_environment_defaults(make):
    sandbox = sandbox_config()
    sandbox.hostname = ""
    env = make(config(tty=True), sandbox=sandbox, image={"config": {"Cmd": ["sh"]}})["process"]["env"]
    assert env == ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm", "HOSTNAME=node-1"]


@pytest.mark.parametrize(
    ("working_dir", "image_dir", "expected"), [("/w", "/srv", "/w"), ("", "/srv", "/srv"), ("", None, "/")]
)
def test_working_dir(make, working_dir, image_dir, expected):
    spec = make(config(working_dir=working_dir), image={"config": {"WorkingDir": image_dir}})
    assert spec["process"]["cwd"] == expected


def test_relative_working_dir_is_invalid(make):
    with pytest.raises(InvalidArgument, match="absolute"):
        make(config(working_dir="srv"))


def test_terminal_and_no_new_privileges(make):
    spec = make(config(tty=True, sc=SC(no_new_privs=True)))
    assert spec["process"]["terminal"] is True and spec["process"]["noNewPrivileges"] is True
    spec = make()
    assert spec["process"]["terminal"] is False and spec["process"]["noNewPrivileges"] is False


# ---------------------------------------------------------------- users


def int64(v):
    return pb.Int64Value(value=v)


@pytest.mark.parametrize(
    ("sc", "image_user", "expected"),
    [
        (SC(), "", (0, 0, [0, 10])),
        (SC(run_as_user=int64(1001)), "app", (1001, 0, [0])),
        (SC(run_as_username="nobody"), "", (65534, 65534, [65534])),
        (SC(run_as_username="app", run_as_user=int64(5)), "", (1000, 1000, [1000, 50000])),
        (SC(run_as_user=int64(1001), run_as_group=int64(1002)), "", (1001, 1002, [1002])),
        (SC(), "app", (1000, 1000, [1000, 50000])),
        (SC(), "app:wheel", (1000, 10, [10, 50000])),
        (SC(), "1000:5", (1000, 5, [5, 50000])),
        (SC(run_as_user=int64(1000), supplemental_groups=[1234, 5678]), "", (1000, 1000, [1000, 1234, 5678, 50000])),
        (
            SC(run_as_user=int64(1000), supplemental_groups=[1234], supplemental_groups_policy=pb.Strict),
            "",
            (1000, 1000, [1000, 1234]),
        ),
    ],
)
def test_user(make, sc, image_user, expected):
    user = make(config(sc=sc), image={"config": {"Cmd": ["sh"], "User": image_user}})["process"]["user"]
    assert (user["uid"], user["gid"], user["additionalGids"]) == expected


@pytest.mark.parametrize(
    ("sc", "image_user", "message"),
    [
        (SC(run_as_group=int64(1002)), "", "run_as_group is set without run_as_user"),
        (SC(run_as_group=int64(1002)), "app", "run_as_group is set without run_as_user"),
        (SC(run_as_username="ghost"), "", "'ghost' is not in the image's /etc/passwd"),
        (SC(), "ghost", "'ghost' is not in the image's /etc/passwd"),
        (SC(run_as_user=int64(-1)), "", "out of range"),
        (SC(supplemental_groups_policy=7), "", "supplemental groups policy"),
    ],
)
def test_user_errors(make, sc, image_user, message):
    with pytest.raises(InvalidArgument, match=message):
        make(config(sc=sc), image={"config": {"Cmd": ["sh"], "User": image_user}})


# ---------------------------------------------------------------- capabilities


@pytest.mark.parametrize(
    ("add", "drop", "expected"),
    [
        ([], [], DEFAULT_CAPABILITIES),
        (["NET_ADMIN"], [], DEFAULT_CAPABILITIES | {"CAP_NET_ADMIN"}),
        (["cap_net_admin", "sys_time"], [], DEFAULT_CAPABILITIES | {"CAP_NET_ADMIN", "CAP_SYS_TIME"}),
        ([], ["NET_RAW"], DEFAULT_CAPABILITIES - {"CAP_NET_RAW"}),
        (["ALL"], [], HOST_CAPS),
        (["all"], ["CHOWN"], HOST_CAPS - {"CAP_CHOWN"}),
        ([], ["ALL"], set()),
        (["NET_ADMIN"], ["ALL"], {"CAP_NET_ADMIN"}),
        (["ALL"], ["ALL"], set()),
        (["KILL"], ["KILL"], DEFAULT_CAPABILITIES - {"CAP_KILL"}),
    ],
)
def test_capabilities(make, add, drop, expected):
    spec = make(config(sc=SC(capabilities=pb.Capability(add_capabilities=add, drop_capabilities=drop))))
    caps = spec["process"]["capabilities"]
    assert set(caps["bounding"]) == set(caps["effective"]) == set(caps["permitted"]) == set(expected)
    assert caps["inheritable"] == caps["ambient"] == []
    assert caps["bounding"] == sorted(caps["bounding"], key=CAPABILITIES.index)


def test_ambient_capabilities_join_every_set(make):
    sc = SC(capabilities=pb.Capability(drop_capabilities=["ALL"], add_ambient_capabilities=["NET_BIND_SERVICE"]))
    caps = make(config(sc=sc))["process"]["capabilities"]
    assert all(caps[k] == ["CAP_NET_BIND_SERVICE"] for k in caps)


@pytest.mark.parametrize(
    "capabilities",
    [
        pb.Capability(add_capabilities=["FLY"]),
        pb.Capability(drop_capabilities=["CAP_FLY"]),
        pb.Capability(add_ambient_capabilities=["ALL"]),
    ],
)
def test_bad_capability_names(make, capabilities):
    with pytest.raises(InvalidArgument):
        make(config(sc=SC(capabilities=capabilities)))


def test_capabilities_from_status():
    status = "Name:\tx\nCapEff:\t000001fffeffffff\nCapBnd:\t0000000000000000\n"
    assert capabilities_from_status(status) == HOST_CAPS
    assert capabilities_from_status("CapEff:\t0000000000000401\n") == {"CAP_CHOWN", "CAP_NET_BIND_SERVICE"}


# ---------------------------------------------------------------- privileged


def test_privileged_container_needs_privileged_sandbox(make):
    with pytest.raises(InvalidArgument, match="privileged pod sandbox"):
        make(config(sc=SC(privileged=True)))


def test_unprivileged_defaults(make):
    spec = make(config(sc=SC(masked_paths=["/bin/ls"], readonly_paths=["/tmp"], readonly_rootfs=True)))
    linux = spec["linux"]
    assert linux["maskedPaths"] == ["/bin/ls"] and linux["readonlyPaths"] == ["/tmp"]
    assert spec["root"]["readonly"] is True
    assert "ro" in mount_at(spec, "/sys")["options"] and "ro" in mount_at(spec, "/sys/fs/cgroup")["options"]
    assert linux["devices"] == []
    assert linux["resources"]["devices"][0] == {"allow": False, "access": "rwm"}
    allowed = {(r["type"], r["major"], r.get("minor")) for r in linux["resources"]["devices"][1:]}
    assert allowed == {
        ("c", 1, 3),
        ("c", 1, 5),
        ("c", 1, 7),
        ("c", 1, 8),
        ("c", 1, 9),
        ("c", 5, 0),
        ("c", 5, 1),
        ("c", 5, 2),
        ("c", 136, None),
    }
    assert "seccomp" not in linux  # nothing asked for: unconfined, as kubelet's nil profile means


# ---------------------------------------------------------------- mounts


def test_standard_mounts_and_pod_files(make, pod_files, tmp_path):
    spec = make()
    assert [m["destination"] for m in spec["mounts"]] == [
        "/proc",
        "/dev",
        "/sys",
        "/dev/pts",
        "/dev/mqueue",
        "/etc/hostname",
        "/etc/resolv.conf",
        "/etc/hosts",
        "/dev/shm",
        "/sys/fs/cgroup",
    ]
    assert mount_at(spec, "/etc/hosts") == {
        "destination": "/etc/hosts",
        "type": "bind",
        "source": str(pod_files.hosts),
        "options": ["rbind", "rprivate", "rw"],
    }
    assert mount_at(spec, "/dev/shm")["source"] == str(tmp_path / "shm")
    assert mount_at(spec, "/sys/fs/cgroup")["type"] == "cgroup"
    assert mount_at(spec, "/etc/resolv.conf")["options"][-1] == "rw"
    ro = make(config(sc=SC(readonly_rootfs=True)))
    assert all(mount_at(ro, p)["options"][-1] == "ro" for p in ("/etc/hostname", "/etc/resolv.conf", "/etc/hosts"))


def test_host_ipc_pod_shares_the_hosts_dev_shm(make, pod_files):
    spec = make(files=dataclasses.replace(pod_files, shm=None))
    assert mount_at(spec, "/dev/shm")["source"] == "/dev/shm"


def test_config_mounts_replace_pod_files_and_defaults(make, tmp_path):
    (tmp_path / "myhosts").write_text("")
    (tmp_path / "devdir").mkdir()
    mounts = [
        pb.Mount(container_path="/etc/hosts/", host_path=str(tmp_path / "myhosts"), readonly=True),
        pb.Mount(container_path="/dev", host_path=str(tmp_path / "devdir")),
    ]
    spec = make(config(mounts=mounts))
    assert mount_at(spec, "/etc/hosts") == {
        "destination": "/etc/hosts",
        "type": "bind",
        "source": str(tmp_path / "myhosts"),
        "options": ["rbind", "rprivate", "ro"],
    }
    assert mount_at(spec, "/dev")["type"] == "bind"
    assert mount_at(spec, "/dev/pts") is None and mount_at(spec, "/dev/mqueue") is None
    assert mount_at(spec, "/dev/shm")["type"] == "bind"


def test_mount_order_puts_parents_first(make, tmp_path):
    mounts = [
        pb.Mount(container_path=p, host_path=str(tmp_path / "v" / p.strip("/").replace("/", "_")))
        for p in ("/data/a/b", "/data", "/data/a")
    ]
    order = [m["destination"] for m in make(config(mounts=mounts))["mounts"]]
    assert order.index("/data") < order.index("/data/a") < order.index("/data/a/b")
    assert order.index("/dev") < order.index("/dev/shm")


def test_missing_host_path_is_created_and_symlinks_resolved(make, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    mounts = [
        pb.Mount(container_path="/new", host_path=str(tmp_path / "made" / "here")),
        pb.Mount(container_path="/linked", host_path=str(tmp_path / "link")),
    ]
    spec = make(config(mounts=mounts))
    assert (tmp_path / "made" / "here").is_dir()
    assert mount_at(spec, "/new")["source"] == str(tmp_path / "made" / "here")
    assert mount_at(spec, "/linked")["source"] == str(tmp_path / "real")


@pytest.mark.parametrize(
    ("directory", "propagation", "option", "rootfs_propagation"),
    [
        ("private", pb.PROPAGATION_PRIVATE, "rprivate", None),
        ("slave", pb.PROPAGATION_HOST_TO_CONTAINER, "rslave", "rslave"),
        ("shared", pb.PROPAGATION_HOST_TO_CONTAINER, "rslave", "rslave"),
        ("shared", pb.PROPAGATION_BIDIRECTIONAL, "rshared", "rshared"),
    ],
)
def test_mount_propagation(make, tmp_path, directory, propagation, option, rootfs_propagation):
    mount = pb.Mount(container_path="/vol", host_path=str(tmp_path / directory / "vol"), propagation=propagation)
    spec = make(config(mounts=[mount]))
    assert mount_at(spec, "/vol")["options"] == ["rbind", option, "rw"]
    assert spec["linux"].get("rootfsPropagation") == rootfs_propagation


def test_shared_propagation_wins_over_slave(make, tmp_path):
    requests = [
        ("/a", "slave", pb.PROPAGATION_HOST_TO_CONTAINER),
        ("/b", "shared", pb.PROPAGATION_BIDIRECTIONAL),
        ("/c", "shared", pb.PROPAGATION_HOST_TO_CONTAINER),
    ]
    mounts = [pb.Mount(container_path=c, host_path=str(tmp_path / h), propagation=p) for c, h, p in requests]
    assert make(config(mounts=mounts))["linux"]["rootfsPropagation"] == "rshared"


@pytest.mark.parametrize(
    ("directory", "propagation"),
    [
        ("private", pb.PROPAGATION_BIDIRECTIONAL),
        ("slave", pb.PROPAGATION_BIDIRECTIONAL),
        ("private", pb.PROPAGATION_HOST_TO_CONTAINER),
    ],
)
def test_propagation_needs_a_propagating_host_mount(make, tmp_path, directory, propagation):
    mount = pb.Mount(container_path="/vol", host_path=str(tmp_path / directory), propagation=propagation)
    with pytest.raises(FailedPrecondition, match="not a shared"):
        make(config(mounts=[mount]))


@pytest.mark.parametrize(
    ("mount", "message"),
    [
        (pb.Mount(container_path="vol", host_path="/tmp"), "container path 'vol' must be absolute"),
        (pb.Mount(container_path="/vol", host_path="tmp"), "host path 'tmp' must be absolute"),
        (
            pb.Mount(container_path="/vol", host_path="/tmp", recursive_read_only=True),
            "recursive read-only mount must be read-only",
        ),
        (
            pb.Mount(
                container_path="/vol",
                host_path="/tmp",
                readonly=True,
                recursive_read_only=True,
                propagation=pb.PROPAGATION_HOST_TO_CONTAINER,
            ),
            "needs private propagation, not PROPAGATION_HOST_TO_CONTAINER",
        ),
        (
            pb.Mount(
                container_path="/vol",
                host_path="/tmp",
                readonly=True,
                recursive_read_only=True,
                propagation=pb.PROPAGATION_BIDIRECTIONAL,
            ),
            "needs private propagation, not PROPAGATION_BIDIRECTIONAL",
        ),
        (pb.Mount(container_path="/vol", image=pb.ImageSpec(image="busybox")), "image volumes"),
        (
            pb.Mount(container_path="/vol", host_path="/tmp", uidMappings=[pb.IDMapping(length=1)]),
            "ID mappings need the pod's user namespace",
        ),
    ],
)
def test_invalid_mounts(make, mount, message):
    with pytest.raises(InvalidArgument, match=message):
        make(config(mounts=[mount]))


def test_recursive_read_only_mount_is_rro(make, tmp_path):
    mounts = [
        pb.Mount(container_path="/rro", host_path=str(tmp_path / "private"), readonly=True, recursive_read_only=True),
        pb.Mount(container_path="/ro", host_path=str(tmp_path / "private"), readonly=True),
    ]
    spec = make(config(mounts=mounts))
    assert mount_at(spec, "/rro")["options"] == ["rbind", "rprivate", "ro", "rro"]
    assert mount_at(spec, "/ro")["options"] == ["rbind", "rprivate", "ro"]


@pytest.mark.parametrize(
    "broken",
    [
        {"sc": SC(run_as_username="ghost")},
        {"command": []},
        {"working_dir": "relative"},
        {"resources": pb.LinuxContainerResources(cpu_period=-1)},
        {"devices": [pb.Device(host_path="/dev/does-not-exist", container_path="/dev/x")]},
        {"sc": SC(seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost, localhost_ref="/nope"))},
    ],
)
def test_invalid_request_creates_nothing(make, tmp_path, broken):
    mounts = [pb.Mount(container_path="/vol", host_path=str(tmp_path / "never"))]
    with pytest.raises((InvalidArgument, NotFound)):
        make(config(mounts=mounts, **broken), image={"config": {}})
    assert not (tmp_path / "never").exists()


def test_uncreatable_host_path(make, tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "x")
    with pytest.raises(InvalidArgument, match="cannot create"):
        make(config(mounts=[pb.Mount(container_path="/vol", host_path=str(tmp_path / "dangling"))]))


# ---------------------------------------------------------------- devices


def test_requested_device(make):
    dev = pb.Device(host_path="/dev/null", container_path="/dev/xnull", permissions="rw")
    linux = make(config(devices=[dev]))["linux"]
    st = os.stat(DEV_NULL)
    assert linux["devices"] == [
        {
            "path": "/dev/xnull",
            "type": "c",
            "major": 1,
            "minor": 3,
            "fileMode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
        }
    ]
    assert linux["resources"]["devices"][-1] == {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"}


@pytest.mark.parametrize(
    ("device", "error"),
    [
        (pb.Device(host_path="/dev/does-not-exist", container_path="/dev/x", permissions="rwm"), NotFound),
        (pb.Device(host_path="/etc/hostname", container_path="/dev/x", permissions="rwm"), InvalidArgument),
        (pb.Device(host_path="/dev/null", container_path="/dev/x", permissions="rwx"), InvalidArgument),
        (pb.Device(host_path="/dev/null", container_path="dev/x", permissions="r"), InvalidArgument),
    ],
)
def test_bad_devices(make, device, error):
    with pytest.raises(error):
        make(config(devices=[device]))


# ---------------------------------------------------------------- seccomp and apparmor


def write_profile(tmp_path, name="block.json"):
    path = tmp_path / name
    path.write_text(
        json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["chmod"], "action": "SCMP_ACT_ERRNO"}]})
    )
    return str(path)


@pytest.mark.parametrize(
    ("field", "path", "expected"),
    [
        (None, "", None),
        (pb.SecurityProfile(), "", "default"),
        (pb.SecurityProfile(profile_type=pb.SecurityProfile.Unconfined), "runtime/default", None),
        (pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost, localhost_ref="PROFILE"), "", "localhost"),
        (None, "runtime/default", "default"),
        (None, "docker/default", "default"),
        (None, "unconfined", None),
        (None, "localhost/PROFILE", "localhost"),
    ],
)
def test_seccomp_choice(make, tmp_path, field, path, expected):
    profile = write_profile(tmp_path)
    if field is not None and field.localhost_ref:
        field.localhost_ref = profile
    sc = SC(seccomp_profile_path=path.replace("PROFILE", profile))
    if field is not None:
        sc.seccomp.CopyFrom(field)
    spec = make(config(sc=sc))
    seccomp = spec["linux"].get("seccomp")
    if expected is None:
        assert seccomp is None
    elif expected == "default":
        assert seccomp == runtime_default_profile(spec["process"]["capabilities"]["bounding"])
    else:
        assert seccomp["defaultAction"] == "SCMP_ACT_ALLOW"


def test_runtime_default_follows_the_containers_capabilities(make):
    sc = SC(seccomp=pb.SecurityProfile(), capabilities=pb.Capability(add_capabilities=["SYS_ADMIN"]))
    names = {n for rule in make(config(sc=sc))["linux"]["seccomp"]["syscalls"] for n in rule["names"]}
    assert "mount" in names


@pytest.mark.parametrize(
    ("sc", "error"),
    [
        (
            SC(seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost, localhost_ref="/nope.json")),
            NotFound,
        ),
        (SC(seccomp_profile_path="localhost//nope.json"), NotFound),
        (SC(seccomp_profile_path="localhost/relative.json"), InvalidArgument),
        (SC(seccomp_profile_path="strict"), InvalidArgument),
        (SC(seccomp=pb.SecurityProfile(localhost_ref="/x.json")), InvalidArgument),
        (
            SC(apparmor=pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost, localhost_ref="p")),
            InvalidArgument,
        ),
        (SC(apparmor_profile="localhost/p"), InvalidArgument),
        (SC(apparmor_profile="strange"), InvalidArgument),
    ],
)
def test_security_profile_errors(make, sc, error):
    with pytest.raises(error):
        make(config(sc=sc))


def test_invalid_localhost_profile(make, tmp_path):
    (tmp_path / "bad.json").write_text("{nope")
    bad = pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost, localhost_ref=str(tmp_path / "bad.json"))
    sc = SC(seccomp=bad)
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        make(config(sc=sc))


def test_apparmor_error_message_and_harmless_profiles(make):
    with pytest.raises(InvalidArgument, match="apparmor is not enabled on this host"):
        make(config(sc=SC(apparmor=pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost))))
    for sc in (
        SC(apparmor=pb.SecurityProfile()),
        SC(apparmor=pb.SecurityProfile(profile_type=1)),
        SC(apparmor_profile="runtime/default"),
        SC(apparmor_profile="unconfined"),
    ):
        make(config(sc=sc))


# ---------------------------------------------------------------- resources


def test_resources(make):
    resources = pb.LinuxContainerResources(
        cpu_period=100000,
        cpu_quota=50000,
        cpu_shares=512,
        cpuset_cpus="0-1",
        cpuset_mems="0",
        memory_limit_in_bytes=15 << 20,
        oom_score_adj=-500,
        hugepage_limits=[pb.HugepageLimit(page_size="2MB", limit=1 << 21)],
        unified={"memory.high": "1"},
    )
    spec = make(config(resources=resources), floor=0)
    assert spec["linux"]["resources"] == {
        "devices": spec["linux"]["resources"]["devices"],
        "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1", "mems": "0"},
        "memory": {"limit": 15 << 20, "swap": 15 << 20},
    }
    assert spec["process"]["oomScoreAdj"] == 0
    assert spec["linux"]["cgroupsPath"] == "/tandem/sb1/c1"


def test_resources_on_a_v2_host_with_hugetlb(make, host):
    v2 = dataclasses.replace(host, cgroup_mode="v2", hugetlb=True, swap_accounting=False)
    resources = pb.LinuxContainerResources(
        memory_limit_in_bytes=1 << 30,
        memory_swap_limit_in_bytes=2 << 30,
        oom_score_adj=900,
        unified={"memory.high": "1", "cpu.idle": "0"},
        hugepage_limits=[pb.HugepageLimit(page_size="2MB", limit=1 << 21)],
    )
    spec = make(config(resources=resources), host=v2)
    res = spec["linux"]["resources"]
    assert res["memory"] == {"limit": 1 << 30}
    assert res["hugepageLimits"] == [{"pageSize": "2MB", "limit": 1 << 21}]
    assert res["unified"] == {"cpu.idle": "0", "memory.high": "1"}
    assert spec["process"]["oomScoreAdj"] == 900
    assert {"type": "cgroup"} in spec["linux"]["namespaces"]


def test_explicit_swap_and_no_resources(make):
    resources = pb.LinuxContainerResources(memory_limit_in_bytes=100, memory_swap_limit_in_bytes=300)
    assert make(config(resources=resources))["linux"]["resources"]["memory"] == {"limit": 100, "swap": 300}
    spec = make()
    assert "oomScoreAdj" not in spec["process"] and set(spec["linux"]["resources"]) == {"devices"}


def test_negative_cpu_values_are_invalid(make):
    with pytest.raises(InvalidArgument):
        make(config(resources=pb.LinuxContainerResources(cpu_shares=-2)))


# ---------------------------------------------------------------- namespaces and annotations


def test_container_namespaces(make):
    ns = Namespaces(network=HOST, ipc="/proc/7/ns/ipc", uts=HOST, pid="/proc/7/ns/pid")
    assert make(namespaces=ns)["linux"]["namespaces"] == [
        {"type": "pid", "path": "/proc/7/ns/pid"},
        {"type": "ipc", "path": "/proc/7/ns/ipc"},
        {"type": "mount"},
    ]
    assert make()["linux"]["namespaces"] == [
        {"type": "pid"},
        {"type": "network", "path": "/proc/7/ns/net"},
        {"type": "ipc", "path": "/proc/7/ns/ipc"},
        {"type": "uts", "path": "/proc/7/ns/uts"},
        {"type": "mount"},
    ]


def test_namespaces_reject_nonsense():
    with pytest.raises(ValueError):
        Namespaces(network="pod", ipc=NEW, uts=NEW, pid=NEW)


def test_annotations_and_root(make, rootfs):
    spec = make()
    assert spec["annotations"] == {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-id": "sb1",
        "io.kubernetes.cri.sandbox-name": "web",
        "io.kubernetes.cri.sandbox-namespace": "default",
        "io.kubernetes.cri.sandbox-uid": "uid-1",
        "io.kubernetes.cri.container-name": "app",
        "io.kubernetes.cri.image-name": "busybox:1",
    }
    assert spec["root"] == {"path": str(rootfs), "readonly": False}
    assert spec["ociVersion"] == "1.0.2"


def test_deterministic_and_json_serializable(make):
    assert json.dumps(make(), sort_keys=True) == json.dumps(make(), sort_keys=True)


# ---------------------------------------------------------------- infra


def test_infra_spec(tmp_path):
    sandbox = sandbox_config()
    sandbox.linux.sysctls.update({"net.ipv4.ip_forward": "1", "kernel.shm_rmid_forced": "1"})
    spec = infra_spec(sandbox, rootfs=tmp_path, namespaces=INFRA_NS, cgroups_path="/tandem/sb1/infra", sandbox_id="sb1")
    process = spec["process"]
    assert process["args"] == ["/catatonit", "-P"] and process["noNewPrivileges"] is True
    assert all(v == [] for v in process["capabilities"].values())
    assert process["user"] == {"uid": 0, "gid": 0}
    assert spec["root"] == {"path": str(tmp_path), "readonly": True}
    assert spec["hostname"] == "web-0"
    linux = spec["linux"]
    assert linux["sysctl"] == {"kernel.shm_rmid_forced": "1", "net.ipv4.ip_forward": "1"}
    assert linux["seccomp"] == runtime_default_profile()
    assert linux["namespaces"] == [
        {"type": "pid"},
        {"type": "network", "path": "/run/netns/pod"},
        {"type": "ipc"},
        {"type": "uts"},
        {"type": "mount"},
    ]
    assert linux["resources"]["cpu"] == {"shares": 2}
    assert [m["destination"] for m in spec["mounts"]] == ["/proc", "/dev"]
    assert spec["annotations"]["io.kubernetes.cri.container-type"] == "sandbox"
    assert spec["annotations"]["io.kubernetes.cri.sandbox-log-directory"] == "/var/log/pods/x"
    assert spec["annotations"]["io.kubernetes.cri.sandbox-id"] == "sb1"
    json.dumps(spec)


def test_infra_on_host_network_and_uts_has_no_hostname(tmp_path):
    ns = Namespaces(network=HOST, ipc=NEW, uts=HOST, pid=NEW)
    spec = infra_spec(sandbox_config(), rootfs=tmp_path, namespaces=ns, cgroups_path="/x")
    assert "hostname" not in spec and [n["type"] for n in spec["linux"]["namespaces"]] == ["pid", "ipc", "mount"]


def test_infra_user(tmp_path):
    sandbox = sandbox_config()
    sandbox.linux.security_context.run_as_user.value = 65534
    sandbox.linux.security_context.run_as_group.value = 65534
    spec = infra_spec(sandbox, rootfs=tmp_path, namespaces=INFRA_NS, cgroups_path="/x")
    assert spec["process"]["user"] == {"uid": 65534, "gid": 65534}
    sandbox.linux.security_context.ClearField("run_as_user")
    with pytest.raises(InvalidArgument, match="without run_as_user"):
        infra_spec(sandbox, rootfs=tmp_path, namespaces=INFRA_NS, cgroups_path="/x")


@pytest.mark.parametrize(
    ("sysctl", "namespaces", "message"),
    [
        ("net.core.somaxconn", Namespaces(network=HOST, ipc=NEW, uts=HOST, pid=NEW), "network namespace"),
        ("kernel.shmmax", Namespaces(network=NEW, ipc=HOST, uts=NEW, pid=NEW), "IPC namespace"),
        ("fs.mqueue.msg_max", Namespaces(network=NEW, ipc=HOST, uts=NEW, pid=NEW), "IPC namespace"),
        ("kernel.domainname", Namespaces(network=HOST, ipc=NEW, uts=HOST, pid=NEW), "UTS namespace"),
        ("vm.swappiness", INFRA_NS, "not namespaced"),
        ("kernel.hostname", INFRA_NS, "not namespaced"),
    ],
)
def test_infra_sysctls_must_fit_the_pods_namespaces(tmp_path, sysctl, namespaces, message):
    sandbox = sandbox_config()
    sandbox.linux.sysctls[sysctl] = "1"
    with pytest.raises(InvalidArgument, match=message):
        infra_spec(sandbox, rootfs=tmp_path, namespaces=namespaces, cgroups_path="/x")


def test_detect_host_reads_this_node():
    host = detect_host()
    assert host.cgroup_mode in ("v1", "hybrid", "v2") and host.hostname
    if os.geteuid() == 0:
        assert "CAP_CHOWN" in host.capabilities


# ---------------------------------------------------------------- real runc
