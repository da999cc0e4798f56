"""runc specs against this host: device nodes made with mknod (root), and generated specs run by the real runc."""

import json
import os
import shutil
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

from protos import cri_pb2 as pb
from runc_backend.host import detect_host
from sandbox.oci.capabilities import CAPABILITIES, DEFAULT_CAPABILITIES
from sandbox.oci.namespaces import NEW, Namespaces
from sandbox.oci.platform import ContainerPlatform, PodFiles
from sandbox.oci.spec import container_spec, infra_spec
from tests.support.specs import (
    HOST_CAPS,
    SC,
    caps_of,
    config,
    fake_host,
    fake_mountinfo,
    fake_pod_files,
    fake_rootfs,
    mount_at,
    sandbox_config,
    spec_maker,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def host(tmp_path):
    return fake_host(tmp_path, fake_mountinfo(tmp_path))


@pytest.fixture
def make(tmp_path, host):
    return spec_maker(fake_rootfs(tmp_path), host, fake_pod_files(tmp_path))


def make_device(directory, name, kind, major, minor):
    path = directory / name
    os.mknod(path, 0o660 | kind, os.makedev(major, minor))
    os.chmod(path, 0o660)  # mknod's mode passes through the umask
    return path


def test_privileged_container(make, host):
    make_device(host.dev_dir, "sda", stat.S_IFBLK, 8, 0)
    (host.dev_dir / "net").mkdir()
    make_device(host.dev_dir / "net", "tun", stat.S_IFCHR, 10, 200)
    (host.dev_dir / "pts").mkdir()
    make_device(host.dev_dir / "pts", "0", stat.S_IFCHR, 136, 0)
    make_device(host.dev_dir, "console", stat.S_IFCHR, 5, 1)
    (host.dev_dir / "regular").write_text("")
    (host.dev_dir / "link").symlink_to("sda")
    seccomp = pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault)
    sc = SC(
        privileged=True,
        masked_paths=["/proc/kcore"],
        readonly_paths=["/proc/sys"],
        seccomp=seccomp,
        capabilities=pb.Capability(drop_capabilities=["ALL"]),
    )
    spec = make(config(sc=sc), sandbox=sandbox_config(privileged=True))
    linux = spec["linux"]
    assert "seccomp" not in linux and linux["maskedPaths"] == [] and linux["readonlyPaths"] == []
    assert caps_of(spec) == HOST_CAPS
    assert "rw" in mount_at(spec, "/sys")["options"] and "rw" in mount_at(spec, "/sys/fs/cgroup")["options"]
    assert linux["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    assert [(d["path"], d["type"], d["major"], d["minor"], d["fileMode"]) for d in linux["devices"]] == [
        ("/dev/net/tun", "c", 10, 200, 0o660),
        ("/dev/sda", "b", 8, 0, 0o660),
    ]
    assert not any(ns["type"] == "cgroup" for ns in linux["namespaces"])


def test_requested_device_directory_and_default_permissions(make, tmp_path):
    directory = tmp_path / "gpu"
    directory.mkdir()
    make_device(directory, "card0", stat.S_IFCHR, 226, 0)
    linux = make(config(devices=[pb.Device(host_path=str(directory), container_path="/dev/dri")]))["linux"]
    assert [d["path"] for d in linux["devices"]] == ["/dev/dri/card0"]
    assert linux["resources"]["devices"][-1]["access"] == "rwm"


def _runc(root, *args):
    """Run runc with its output in files: a detached container inherits them, so pipes would never reach EOF."""
    out, err = root.parent / "runc.out", root.parent / "runc.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        argv = ["runc", "--root", str(root), *args]
        code = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, timeout=60).returncode
    return subprocess.CompletedProcess(argv, code, out.read_text(), err.read_text())


def _bundle(directory, spec):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(spec))
    return directory


def test_runc_accepts_generated_specs(tmp_path):
    """An infra process holding fresh namespaces, and a container joining them, run by the real runc."""
    infra_root = tmp_path / "infra-rootfs"
    infra_root.mkdir()
    shutil.copy(shutil.which("catatonit"), infra_root / "catatonit")
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "etc").mkdir()
    shutil.copy(shutil.which("busybox"), rootfs / "bin" / "busybox")
    for tool in ("sh", "id", "cat", "hostname", "touch"):
        (rootfs / "bin" / tool).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\napp:x:1000:\nextra:x:50000:app\n")
    files = PodFiles(
        hostname=tmp_path / "hostname",
        resolv_conf=tmp_path / "resolv.conf",
        hosts=tmp_path / "hosts",
        shm=tmp_path / "shm",
    )
    for path in (files.hostname, files.resolv_conf, files.hosts):
        path.write_text("")
    files.shm.mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "flag").write_text("mounted\n")

    runc_root, parent = tmp_path / "runc", f"/tandem-spec-test-{uuid.uuid4().hex[:12]}"
    infra_id, ctr_id = f"infra-{parent[-12:]}", f"ctr-{parent[-12:]}"
    sandbox = sandbox_config()
    sandbox.linux.sysctls.update({"kernel.shm_rmid_forced": "1", "net.ipv4.ip_forward": "1"})
    infra = infra_spec(
        sandbox,
        rootfs=infra_root,
        namespaces=Namespaces(network=NEW, ipc=NEW, uts=NEW, pid=NEW),
        cgroups_path=f"{parent}/infra",
        sandbox_id="sb",
    )
    try:
        result = _runc(runc_root, "run", "-d", "--bundle", str(_bundle(tmp_path / "infra", infra)), infra_id)
        assert result.returncode == 0, result.stderr
        pid = json.loads(_runc(runc_root, "state", infra_id).stdout)["pid"]
        joined = Namespaces(
            **{
                kind: f"/proc/{pid}/ns/{name}"
                for kind, name in (("network", "net"), ("ipc", "ipc"), ("uts", "uts"), ("pid", "pid"))
            }
        )
        sc = SC(
            run_as_username="app",
            readonly_rootfs=True,
            seccomp=pb.SecurityProfile(),
            masked_paths=["/proc/kcore"],
            readonly_paths=["/proc/sys"],
        )
        cfg = config(
            sc=sc,
            command=[
                "sh",
                "-c",
                "id; grep -E '^(Seccomp|CapBnd):' /proc/self/status; hostname; "
                "cat /proc/sys/kernel/shm_rmid_forced /data/flag; touch /x",
            ],
            mounts=[pb.Mount(container_path="/data", host_path=str(tmp_path / "data"), readonly=True)],
            resources=pb.LinuxContainerResources(memory_limit_in_bytes=64 << 20, cpu_shares=512),
        )
        floor = int(Path("/proc/self/oom_score_adj").read_text())
        platform = ContainerPlatform(
            rootfs=rootfs,
            host=detect_host(),
            namespaces=joined,
            cgroups_path=f"{parent}/ctr",
            pod_files=files,
            oom_score_adj_floor=floor,
        )
        spec = container_spec(cfg, sandbox, sandbox_id="sb", image_config={"config": {}}, platform=platform)
        result = _runc(runc_root, "run", "--bundle", str(_bundle(tmp_path / "ctr", spec)), ctr_id)
        assert result.stdout.splitlines() == [
            "uid=1000(app) gid=1000(app) groups=1000(app),50000(extra)",
            f"CapBnd:\t{sum(1 << CAPABILITIES.index(c) for c in DEFAULT_CAPABILITIES):016x}",
            "Seccomp:\t2",
            "web-0",
            "1",
            "mounted",
        ], result.stderr
        assert "Read-only file system" in result.stderr and result.returncode == 1
    finally:
        for cid in (ctr_id, infra_id):
            _runc(runc_root, "delete", "--force", cid)
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            if (hierarchy / parent.lstrip("/")).is_dir():
                (hierarchy / parent.lstrip("/")).rmdir()
