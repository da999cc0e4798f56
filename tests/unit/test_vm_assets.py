"""The VM backend's pure parts: cpio, ELF and module ordering, asset inputs and rebuilds, QEMU argv, accel choice."""

import json
import os
import re
import stat
import struct
import sys
from pathlib import Path

import pytest

from core.errors import FailedPrecondition, InvalidArgument
from vm_backend import accel
from vm_backend.accel import AccelChoice
from vm_backend.guest_image import GuestAssets, apt, build, inputs, store
from vm_backend.guest_image.cpio import Tree, write_cpio
from vm_backend.guest_image.elf import read_elf
from vm_backend.guest_image.inputs import AssetInputs
from vm_backend.guest_image.modules import load_order, module_deps, module_name
from vm_backend.qemu import TapNic, VmSpec, build_argv, kernel_cmdline
from vm_backend.virtiofs import Virtiofsd, virtiofsd_nofile

# ---- cpio -------------------------------------------------------------------------------------------


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """A minimal newc reader: name -> (mode, body, rdev), in archive order."""
    entries = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        body = pos + 110 + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (fields[1], data[body : body + size], (fields[9], fields[10]))
        pos = body + size + (-size % 4)


def sample_tree(tmp_path: Path) -> Tree:
    host = tmp_path / "tool"
    host.write_bytes(b"#!/bin/sh\necho hi\n")
    host.chmod(0o755)
    tree = Tree()
    tree.file("etc/tandem/modules", b"virtio\n")
    tree.copy("usr/bin/tool", host)
    tree.symlink("bin/sh", "/bin/busybox")
    tree.chardev("dev/console", 5, 1)
    tree.dir("tmp", 0o1777)
    return tree


def test_cpio_has_parents_first_and_every_kind(tmp_path):
    out = tmp_path / "a.cpio"
    with open(out, "wb") as f:
        write_cpio(sample_tree(tmp_path), f)
    entries = read_cpio(out.read_bytes())
    names = list(entries)
    assert names.index("etc") < names.index("etc/tandem") < names.index("etc/tandem/modules")
    assert names.index("usr/bin") < names.index("usr/bin/tool")
    mode, body, _ = entries["usr/bin/tool"]
    assert stat.S_ISREG(mode) and mode & 0o777 == 0o755 and body == b"#!/bin/sh\necho hi\n"
    mode, body, _ = entries["bin/sh"]
    assert stat.S_ISLNK(mode) and body == b"/bin/busybox"
    mode, _, rdev = entries["dev/console"]
    assert stat.S_ISCHR(mode) and rdev == (5, 1)
    assert entries["tmp"][0] == stat.S_IFDIR | 0o1777
    assert entries["etc/tandem/modules"][0] == stat.S_IFREG | 0o644


def test_cpio_is_deterministic(tmp_path):
    first, second = tmp_path / "1.cpio", tmp_path / "2.cpio"
    for path in (first, second):
        with open(path, "wb") as f:
            write_cpio(sample_tree(tmp_path), f)
        os.utime(tmp_path / "tool", (1, 1))  # host timestamps do not leak in
    assert first.read_bytes() == second.read_bytes()


def test_a_file_cannot_become_a_directory():
    tree = Tree()
    tree.file("etc", b"")
    with pytest.raises(FailedPrecondition, match="not a directory"):
        tree.file("etc/passwd", b"")


# ---- ELF and modules --------------------------------------------------------------------------------


def fake_module(depends: str) -> bytes:
    """A minimal ELF64 with just a .modinfo section, as depmod would read it."""
    modinfo = f"license=GPL\0depends={depends}\0vermagic=6.1\0".encode()
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    off_modinfo = 64
    off_strtab = off_modinfo + len(modinfo)
    shoff = (off_strtab + len(shstrtab) + 7) // 8 * 8
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 56, 0, 64, 3, 2)
    body = header + modinfo + shstrtab
    body += bytes(shoff - len(body))
    sections = bytes(64)
    sections += struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, off_modinfo, len(modinfo), 0, 0, 1, 0)
    sections += struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, off_strtab, len(shstrtab), 0, 0, 1, 0)
    return body + sections


def test_read_elf_finds_needed_libraries_and_the_loader():
    elf = read_elf(Path(os.path.realpath(sys.executable)).read_bytes())
    assert "libc.so.6" in elf.needed
    assert elf.interpreter is not None and elf.interpreter.endswith("ld-linux-x86-64.so.2")


def test_module_deps_come_from_modinfo(tmp_path):
    deps_of = {
        "virtio_net": "net_failover,virtio,virtio_ring",
        "net_failover": "failover",
        "failover": "",
        "virtio": "",
        "virtio_ring": "",
        "virtio-rng": "virtio",
    }
    index = {}
    for name, depends in deps_of.items():
        path = tmp_path / f"{name}.ko"
        path.write_bytes(fake_module(depends))
        index[module_name(path)] = path
    deps = module_deps(index, ["virtio_net"])
    assert deps["virtio_net"] == ["net_failover", "virtio", "virtio_ring"]
    assert "virtio_rng" not in deps  # only what the wanted modules reach is read
    assert load_order(deps, ["virtio_net"]) == ["failover", "net_failover", "virtio", "virtio_ring", "virtio_net"]


def test_load_order_puts_dependencies_first_and_skips_builtins():
    deps = {
        "virtiofs": ["fuse", "virtio", "virtio_ring"],
        "fuse": [],
        "virtio": ["virtio_ring"],
        "virtio_ring": [],
        "virtio_console": ["virtio", "virtio_ring"],
    }
    order = load_order(deps, ["virtio_console", "virtiofs"])
    assert order == ["virtio_ring", "virtio", "virtio_console", "fuse", "virtiofs"]
    assert load_order(deps, ["virtiofs"], builtin=["fuse"]) == ["virtio_ring", "virtio", "virtiofs"]


def test_load_order_reports_missing_modules_and_cycles():
    with pytest.raises(FailedPrecondition, match=re.escape("kernel module fuse not found (needed by virtiofs)")):
        load_order({"virtiofs": ["fuse"]}, ["virtiofs"])
    with pytest.raises(FailedPrecondition, match="cycle a -> b -> a"):
        load_order({"a": ["b"], "b": ["a"]}, ["a"])


# ---- inputs and the rebuild decision ----------------------------------------------------------------

INPUTS = AssetInputs(
    packages={"linux-image-6.1.0-56-cloud-amd64": "6.1.192-2", "busybox-static": "1:1.35.0-4"},
    files={"init.sh": "aa", "agent/__main__.py": "bb"},
)


def test_digest_covers_every_input_and_nothing_else():
    same = AssetInputs(dict(reversed(INPUTS.packages.items())), dict(reversed(INPUTS.files.items())))
    assert same.digest() == INPUTS.digest()
    kernel = AssetInputs(INPUTS.packages | {"linux-image-6.1.0-56-cloud-amd64": "6.1.193-1"}, INPUTS.files)
    agent = AssetInputs(INPUTS.packages, INPUTS.files | {"agent/__main__.py": "cc"})
    package_list = AssetInputs(INPUTS.packages | {"runc": "1.1.5"}, INPUTS.files)
    assert len({INPUTS.digest(), kernel.digest(), agent.digest(), package_list.digest()}) == 4
    assert INPUTS.kernel_package == "linux-image-6.1.0-56-cloud-amd64"


def test_local_inputs_include_init_the_agent_and_the_builder():
    labels = set(inputs.input_files())
    builder = {f"builder/{p.name}" for p in Path(inputs.__file__).parent.glob("*.py")}
    assert {"builder/build.py", "builder/initramfs.py", "builder/cpio.py", "builder/kernel.py"} <= builder
    assert {"init.sh", "protos/agent_pb2.py", "agent/__main__.py", *builder} <= labels
    assert {"protobuf/message.py", "protobuf/pyext/cpp_message.py", "protobuf/_upb/_message.abi3.so"} <= labels
    assert not any(label.endswith(".pyc") or "__pycache__" in label for label in labels)
    assert [label for label in labels if label.endswith(".so")] == ["protobuf/_upb/_message.abi3.so"]


def test_apt_records_and_the_kernel_dependency():
    text = (
        "Package: linux-image-cloud-amd64\nVersion: 6.1.192-2\n"
        "Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\nDescription: x\n continued: y\n\n"
        "Package: runc\nVersion: 1.1.5+ds1-1\n"
    )
    records = apt.parse_records(text)
    assert records["runc"]["Version"] == "1.1.5+ds1-1"
    assert "continued" not in records["linux-image-cloud-amd64"]
    package, version = inputs.kernel_image_dependency(records["linux-image-cloud-amd64"]["Depends"])
    assert (package, version) == ("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2")
    with pytest.raises(FailedPrecondition):
        inputs.kernel_image_dependency("linux-image-6.1.0-56-cloud-amd64")


def fake_build(calls: list[str]):
    async def fake(state_dir, wanted, progress):
        calls.append(wanted.digest())
        out = store.assets_root(state_dir) / wanted.digest()
        out.mkdir(parents=True, exist_ok=True)
        for name in (store.KERNEL_FILE, store.INITRAMFS_FILE, store.USERLAND_FILE):
            (out / name).write_bytes(b"x")
        manifest = {"digest": wanted.digest(), "kernel_release": "6.1.0-56-cloud-amd64", "kernel_file": "vmlinux"}
        (out / store.MANIFEST_FILE).write_text(json.dumps(manifest))
        return store.load(out)

    return fake


async def test_assets_are_rebuilt_only_when_an_input_changes(tmp_path, monkeypatch):
    calls: list[str] = []
    current = {"inputs": INPUTS}

    async def resolve(update=False):
        return current["inputs"]

    monkeypatch.setattr(inputs, "resolve_inputs", resolve)
    monkeypatch.setattr(build, "_build", fake_build(calls))
    quiet = lambda line: None  # noqa: E731

    first = await build.ensure_assets(tmp_path, progress=quiet)
    again = await build.ensure_assets(tmp_path, progress=quiet)
    assert calls == [INPUTS.digest()] and again.dir == first.dir
    assert store.current_assets(tmp_path).digest == INPUTS.digest()

    current["inputs"] = AssetInputs(INPUTS.packages, INPUTS.files | {"init.sh": "changed"})
    assert (await build.asset_status(tmp_path)).fresh is False
    rebuilt = await build.ensure_assets(tmp_path, progress=quiet)
    assert calls[-1] == rebuilt.digest != first.digest
    assert first.dir.exists()  # the superseded build is kept (one of the most recent)
    assert (await build.asset_status(tmp_path)).fresh is True

    await build.ensure_assets(tmp_path, force=True, progress=quiet)
    assert len(calls) == 3


# ---- QEMU argv ---------------------------------------------------------------------------------------


def spec(tmp_path: Path, **overrides) -> VmSpec:
    values = {
        "name": "pod1",
        "run_dir": tmp_path / "run",
        "kernel": tmp_path / "vmlinuz",
        "initramfs": tmp_path / "initramfs.cpio",
        "userland": tmp_path / "userland.img",
        "userland_bytes": 40 * 2**20,
        "tsc_khz": 2600000,
    }
    return VmSpec(**(values | overrides))


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_tcg_argv_follows_the_notes(tmp_path):
    argv = build_argv(spec(tmp_path))
    assert argv[0] == "qemu-system-x86_64"
    assert option(argv, "-M") == ["microvm,pcie=on"]  # the guest registers the pmem range in its PCI init
    assert option(argv, "-m") == ["296M"]  # 256 MiB of RAM and the 40 MiB image between its two parts
    assert option(argv, "-object") == [
        "memory-backend-memfd,id=mem,size=224M,share=on",  # vhost-user-fs maps guest RAM
        f"memory-backend-file,id=userland,mem-path={tmp_path}/userland.img,size=40M,share=off,readonly=on",
        "memory-backend-memfd,id=mem-tail,size=32M,share=on",  # QEMU loads the initramfs at the top
    ]
    assert option(argv, "-numa") == ["node,memdev=mem", "node,memdev=userland", "node,memdev=mem-tail"]
    assert option(argv, "-accel") == ["tcg,tb-size=24"] and option(argv, "-cpu") == ["max"]
    assert {"-nodefaults", "-no-user-config", "-no-reboot"} <= set(argv)
    assert option(argv, "-sandbox") == ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    assert option(argv, "-global") == ["virtio-mmio.force-legacy=false"]
    assert "-daemonize" not in argv  # it forks and setsid()s under the seccomp filter
    assert option(argv, "-serial") == ["chardev:console"]
    chardevs = option(argv, "-chardev")
    assert any(c.startswith("socket,id=console,") and f"logfile={tmp_path}/run/vmm/console.log" in c for c in chardevs)
    assert f"socket,id=agent,path={tmp_path}/run/vmm/agent.sock,server=on,wait=off" in chardevs
    devices = option(argv, "-device")
    assert "virtio-serial-pci,id=serial,max_ports=2" in devices  # PCI: 128-entry queues, not virtio-mmio's 1024
    assert "virtserialport,bus=serial.0,chardev=agent,name=agent" in devices
    assert option(argv, "-qmp") == [f"unix:{tmp_path}/run/vmm/qmp.sock,server=on,wait=off"]
    assert "-netdev" not in argv and not any("vhost-user-fs" in d for d in option(argv, "-device"))
    cmdline = option(argv, "-append")[0]
    assert "console=ttyS0" in cmdline and "panic=-1" in cmdline and "tsc_early_khz=2600000" in cmdline
    assert "cryptomgr.notests" in cmdline
    assert {"lockdown=confidentiality", "tsc=reliable", "nowatchdog", "numa_balancing=disable"} <= set(cmdline.split())
    assert "sysctl.vm.compaction_proactiveness=0" in cmdline.split()
    assert "memmap=40M!224M" in cmdline.split()  # the image's range is persistent memory: /dev/pmem0
    assert "tandem.share" not in cmdline


def test_the_translation_cache_is_the_vms_own(tmp_path):
    assert option(build_argv(spec(tmp_path, tcg_cache_mib=64)), "-accel") == ["tcg,tb-size=64"]
    assert option(build_argv(spec(tmp_path, accel="kvm", tcg_cache_mib=64)), "-accel") == ["kvm"]


def test_kvm_argv_with_share_tap_and_netns(tmp_path):
    vm = spec(
        tmp_path,
        accel="kvm",
        vcpus=2,
        memory_mib=512,
        tap=TapNic("tap0", "52:54:00:12:34:56"),
        netns=Path("/run/netns/pod1"),
        share_tag="pod1",
    )
    argv = build_argv(vm, share_socket=tmp_path / "run" / "virtiofsd.sock", tap_fd=7)
    assert option(argv, "-accel") == ["kvm"] and option(argv, "-cpu") == ["host"]
    assert option(argv, "-smp") == ["2"] and option(argv, "-m") == ["552M"]
    assert option(argv, "-object")[0] == "memory-backend-memfd,id=mem,size=480M,share=on"
    assert f"socket,id=vfs,path={tmp_path}/run/virtiofsd.sock" in option(argv, "-chardev")
    assert "vhost-user-fs-device,chardev=vfs,tag=pod1" in option(argv, "-device")
    assert option(argv, "-netdev") == ["tap,id=n0,fd=7"]
    assert "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56" in option(argv, "-device")
    assert "tandem.share=pod1" in kernel_cmdline(vm, share=True)


def test_argv_refuses_unusable_paths_and_accels(tmp_path):
    with pytest.raises(InvalidArgument, match="comma"):
        build_argv(spec(tmp_path, run_dir=tmp_path / "a,b"))
    with pytest.raises(InvalidArgument, match="comma"):
        build_argv(spec(tmp_path, userland=tmp_path / "a,b.img"))
    with pytest.raises(InvalidArgument, match="too long"):
        build_argv(spec(tmp_path, run_dir=tmp_path / ("x" * 100)))
    with pytest.raises(InvalidArgument, match="kvm or tcg"):
        build_argv(spec(tmp_path, accel="hvf"))


def test_virtiofsd_serves_the_share_from_its_namespace(tmp_path):
    vfs = Virtiofsd(tmp_path / "pod", tmp_path / "pod" / "share.ns", nofile=virtiofsd_nofile(256))
    argv = vfs.argv(7)
    assert argv[0] == "/usr/lib/qemu/virtiofsd"
    assert "--fd=7" in argv  # the socket comes as a descriptor: no host path to look up or leave a lock file by
    assert f"source={tmp_path}/pod/share" in argv  # there only in the share namespace: it names the pod
    assert "sandbox=namespace" in argv and "cache=auto" in argv and "--rlimit-nofile=131072" in argv
    assert not any(arg.startswith("--socket-path") for arg in argv)


def test_virtiofsd_may_hold_as_many_files_as_its_guest_can_cache_within_bounds():
    assert virtiofsd_nofile(64) == 65536
    assert virtiofsd_nofile(256) == 131072
    assert virtiofsd_nofile(1024) == 524288
    assert virtiofsd_nofile(64 * 1024) == 1 << 20


# ---- accelerator choice -----------------------------------------------------------------------------

KEY = {"host_kernel": "6.18", "qemu": "QEMU 7.2", "kvm_device": True, "guest_kernel": "6.1.0-56-cloud-amd64"}
ASSETS = GuestAssets(
    Path("/a"),
    "d",
    Path("/a/vmlinuz"),
    Path("/a/initramfs.cpio"),
    Path("/a/userland.img"),
    2**21,
    "6.1.0-56-cloud-amd64",
    {},
)


@pytest.fixture
def probes(monkeypatch) -> list[bool]:
    """Fake probe key and KVM probe; the list records each probe and says what the next one answers."""
    answers = [True]

    async def key(qemu, guest):
        return dict(KEY)

    async def probe(qemu, guest, work_dir):
        answers.append(answers[-1])
        return answers[-1], "probe detail"

    monkeypatch.setattr(accel, "probe_key", key)
    monkeypatch.setattr(accel, "probe_kvm", probe)
    return answers


async def test_auto_probes_once_and_caches(tmp_path, probes):
    qemu = Path("/usr/bin/qemu-system-x86_64")
    assert await accel.choose_accel("auto", tmp_path, ASSETS, qemu) == AccelChoice("kvm", "probe detail")
    assert await accel.choose_accel("auto", tmp_path, ASSETS, qemu) == AccelChoice("kvm", "probe detail")
    assert len(probes) == 2  # one probe, then the cache
    assert accel.cached_choice(tmp_path, KEY) == AccelChoice("kvm", "probe detail")
    assert accel.cached_choice(tmp_path, KEY | {"qemu": "QEMU 8.0"}) is None


async def test_a_failed_probe_means_tcg_and_config_forces_either(tmp_path, probes):
    probes.append(False)
    choice = await accel.choose_accel("auto", tmp_path, ASSETS, Path("/q"))
    assert choice.accel == "tcg" and "KVM probe failed" in choice.reason
    assert (await accel.choose_accel("kvm", tmp_path, ASSETS, Path("/q"))).accel == "kvm"
    assert (await accel.choose_accel("tcg", tmp_path / "other", ASSETS, Path("/q"))).accel == "tcg"
    assert len(probes) == 3  # forced choices never probe


async def test_no_kvm_device_means_tcg_without_a_probe(tmp_path, probes, monkeypatch):
    async def key(qemu, guest):
        return KEY | {"kvm_device": False}

    monkeypatch.setattr(accel, "probe_key", key)
    choice = await accel.choose_accel("auto", tmp_path, ASSETS, Path("/q"))
    assert choice == AccelChoice("tcg", "no /dev/kvm") and len(probes) == 1


def test_a_new_current_build_keeps_the_most_recent_older_builds(tmp_path):
    """A pod starting while `current` moves may still open the previous build's kernel: keep a few."""
    for age, digest in enumerate(["d5", "d4", "d3", "d2", "d1"]):
        (tmp_path / digest).mkdir()
        os.utime(tmp_path / digest, (1000 - age, 1000 - age))
    (tmp_path / "new").mkdir()
    store.make_current(tmp_path, "new")
    assert (tmp_path / "current").resolve() == tmp_path / "new"
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("new", "current"))
    assert kept == ["d3", "d4", "d5"]
