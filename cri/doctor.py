"""`tandem doctor`: the one page an operator reads: this host, this config and the running daemon.

Each check prints one line, grouped by what it is about: OK, WARN (works, but something an
operator should know, with what to do) or FAIL (Tandem cannot do that part of its job, with
the fix). A summary line ends the page. The exit status is for scripts:

    0  every check is OK
    1  at least one check FAILed
    2  no failure, but warnings (e.g. VMs emulated by TCG: untrusted pods run, slowly)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import ipaddress
import json
import os
import pwd
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from core import cgroups, proc
from core.errors import TandemError
from core.proc import ProcessIdentity
from core.settings import Config, load_config
from cri.version import RUNTIME_NAME, RUNTIME_VERSION
from protos import cri_pb2 as pb
from protos import cri_pb2_grpc
from runc_backend.cgroups import oom_score_adj_floor
from sandbox import cni
from sandbox.default_network import default_network
from vm_backend.accel import AccelChoice
from vm_backend.jail import Jail, JailIds
from vm_backend.ksm import KSM_DIR, ksm_status
from vm_backend.pool import warm_records

EXIT_OK, EXIT_FAILED, EXIT_WARNINGS = 0, 1, 2
LEVELS = {"ok": "OK", "warn": "WARN", "FAIL": "FAIL"}


@dataclass(frozen=True)
class Finding:
    level: str  # "ok", "warn" or "FAIL"
    what: str
    detail: str
    fix: str = ""
    section: str = ""


def _check_config(path: Path | None) -> tuple[Finding, Config | None]:
    try:
        config = load_config(path)
    except TandemError as e:
        return Finding("FAIL", "config", str(e), "fix the named key"), None
    return Finding("ok", "config", config.source), config


def _check_dir(what: str, path: Path) -> Finding:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        return Finding("FAIL", what, f"{path}: {e.strerror}", "run as root, or point the config at a writable dir")
    free = shutil.disk_usage(path).free
    if free < 2 * 2**30:
        return Finding("warn", what, f"{path}: only {free // 2**20} MiB free", "free disk space for images")
    return Finding("ok", what, f"{path} ({free // 2**30} GiB free)")


def _check_overlay(state_dir: Path) -> Finding:
    """Image layers are overlayfs diff dirs: whiteouts are 0:0 char devices, opaque dirs a trusted xattr."""
    if "overlay" not in Path("/proc/filesystems").read_text():
        with contextlib.suppress(TandemError):
            proc.run_blocking(["modprobe", "overlay"])
    work = Path(tempfile.mkdtemp(prefix=".doctor-", dir=state_dir))
    try:
        lower, upper, wd, merged = (work / n for n in ("lower", "upper", "work", "merged"))
        for d in (lower, upper, wd, merged):
            d.mkdir()
        (lower / "hidden").write_text("x")
        (lower / "opaque").mkdir()
        (lower / "opaque" / "gone").write_text("x")
        os.mknod(upper / "hidden", 0o600 | 0o020000, os.makedev(0, 0))
        (upper / "opaque").mkdir()
        os.setxattr(upper / "opaque", "trusted.overlay.opaque", b"y")
        opts = f"lowerdir={upper}:{lower}"
        result = proc.run_blocking(["mount", "-t", "overlay", "overlay", "-o", opts, merged])
        if result.returncode != 0:
            return Finding("FAIL", "overlayfs", result.stderr.decode().strip(), "load the overlay module")
        try:
            if (merged / "hidden").exists() or (merged / "opaque" / "gone").exists():
                return Finding("FAIL", "overlayfs", "whiteouts are not honoured", "use a kernel with overlayfs")
        finally:
            proc.run_blocking(["umount", merged])
    except (OSError, TandemError) as e:
        return Finding("FAIL", "overlayfs", f"{state_dir}: {e}", "run as root on a filesystem with xattrs")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Finding("ok", "overlayfs", f"whiteouts and opaque dirs work under {state_dir}")


def _serving(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _check_daemon(config: Config) -> list[Finding]:
    """The daemon on the configured socket: its version, its readiness as kubelet sees it, what it runs."""
    if not _serving(config.socket):
        fix = "start it: systemctl start tandem (or tandem serve)"
        return [Finding("warn", "daemon", f"none serving on {config.socket}", fix)]
    channel = grpc.insecure_channel(f"unix://{config.socket}")
    try:
        stub = cri_pb2_grpc.RuntimeServiceStub(channel)
        version = stub.Version(pb.VersionRequest(), timeout=10)
        conditions = stub.Status(pb.StatusRequest(), timeout=10).status.conditions
        pods = stub.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items
        containers = stub.ListContainers(pb.ListContainersRequest(), timeout=10).containers
    except grpc.RpcError as e:
        return [Finding("FAIL", "daemon", f"{config.socket} does not answer: {e.code().name}", "see its log")]
    finally:
        channel.close()
    running = sum(c.state == pb.CONTAINER_RUNNING for c in containers)
    detail = (
        f"{version.runtime_name} {version.runtime_version} on {config.socket}: {len(pods)} pods, "
        f"{running} of {len(containers)} containers running"
    )
    findings = [Finding("ok", "daemon", detail)]
    for condition in conditions:
        if condition.status:
            findings.append(Finding("ok", condition.type, "true"))
        else:
            level = "FAIL" if condition.type == "RuntimeReady" else "warn"
            message = f"false: {condition.reason}: {condition.message}"
            findings.append(Finding(level, condition.type, message, "kubelet starts no pods until it is true"))
    return findings


def _check_service() -> Finding:
    """Under systemd, tandem.service installed, enabled and running."""
    if not Path("/run/systemd/system").is_dir():
        return Finding("ok", "service", "no systemd on this host: run `tandem serve` from its init system")
    try:
        active = proc.run_blocking(["systemctl", "is-active", "tandem.service"], timeout=10).stdout.decode().strip()
        enabled = proc.run_blocking(["systemctl", "is-enabled", "tandem.service"], timeout=10).stdout.decode().strip()
    except (OSError, TandemError) as e:
        return Finding("warn", "service", f"cannot ask systemctl: {e}")
    if enabled in ("", "not-found"):
        return Finding("warn", "service", "tandem.service is not installed", "make install")
    if active != "active" or enabled != "enabled":
        return Finding("warn", "service", f"tandem.service is {active}, {enabled}", "systemctl enable --now tandem")
    return Finding("ok", "service", "tandem.service is active and enabled")


def _check_metrics(config: Config) -> Finding:
    if not config.metrics.address:
        return Finding("ok", "metrics", 'off ([metrics] address = "" by default)')
    host, _, port = config.metrics.address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
    except (OSError, ValueError) as e:
        return Finding("warn", "metrics", f"nothing answers on {config.metrics.address}: {e}", "is the daemon up?")
    return Finding("ok", "metrics", f"served at http://{config.metrics.address}/metrics")


def _check_cni(config: Config) -> list[Finding]:
    """Which network pods join and why; NetworkReady; for the default network, whether its subnet is free."""
    settings = config.cni.default
    default = (
        default_network(
            config.runtime_dir / "cni", bridge=settings.bridge, subnet=settings.subnet, masquerade=settings.masquerade
        )
        if settings.enabled
        else None
    )
    choice = cni.choose_network(config.cni.conf_dir, default)
    ready = cni.readiness(choice, config.cni.bin_dirs)
    if not ready.ready:
        fix = "apt-get install containernetworking-plugins (or install the plugins the network names)"
        return [Finding("warn", "cni", f"{ready.message}; until then NetworkReady is false", fix)]
    if not choice.is_default and choice.network is not None:
        return [Finding("ok", "cni", f"pods join network {choice.network.name} from {choice.network.source}")]
    masquerade = "masquerade on" if settings.masquerade else "masquerade off"
    detail = (
        f"pods join Tandem's default network (bridge {settings.bridge}, {settings.subnet}, {masquerade}): "
        f"{choice.why} (a network installed there takes over for new pods)"
    )
    return [Finding("ok", "cni", detail), _check_default_subnet(settings.subnet, settings.bridge)]


def _check_default_subnet(subnet: str, bridge: str) -> Finding:
    """The default network's subnet must not shadow a network this host already reaches another way."""
    try:
        out = proc.run_blocking(["ip", "-j", "-4", "route", "show", "table", "all"], timeout=10)
        routes = json.loads(out.stdout or b"[]")
    except (OSError, TandemError, ValueError) as e:
        return Finding("warn", "cni subnet", f"cannot list this host's routes: {e}")
    ours = ipaddress.IPv4Network(subnet)
    clashes = sorted(
        {
            f"{r['dst']} dev {r.get('dev', '?')}"
            for r in routes
            if r.get("dst", "default") != "default"
            and r.get("dev") != bridge
            and ipaddress.IPv4Network(r["dst"], strict=False).overlaps(ours)
        }
    )
    if clashes:
        fix = "choose another [cni.default] subnet"
        return Finding("warn", "cni subnet", f"{subnet} overlaps routes of this host: {', '.join(clashes)}", fix)
    return Finding("ok", "cni subnet", f"{subnet} overlaps no other route of this host")


def _version_line(argv: list[str]) -> str:
    try:
        out = proc.run_blocking(argv, timeout=10).stdout.decode(errors="replace")
    except (OSError, TandemError) as e:
        return f"does not run: {e}"
    return out.strip().splitlines()[0] if out.strip() else "no version output"


def _check_program(name: str, package: str, version_flag: str = "--version") -> Finding:
    path = shutil.which(name)
    if path is None:
        return Finding("FAIL", name, "not installed; trusted pods cannot run", f"apt-get install {package}")
    return Finding("ok", name, f"{path}: {_version_line([path, version_flag])}")


def _is_static_elf(path: Path) -> bool:
    """No PT_INTERP program header: the binary needs no dynamic loader, so it runs in an empty root."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit ELF only
        return False
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum))


def _check_catatonit() -> Finding:
    path = Path("/usr/bin/catatonit")
    if not path.exists():
        return Finding("FAIL", "catatonit", f"{path} missing: no pod infra process", "apt-get install catatonit")
    if not _is_static_elf(path):
        return Finding("FAIL", "catatonit", f"{path} is not static; it must run in an empty root", "reinstall it")
    return Finding("ok", "catatonit", f"{path} (static pod infra process)")


def _check_cgroups() -> Finding:
    mode = cgroups.detect_mode()
    controllers = sorted(p.name for p in cgroups.hierarchies())
    missing = [c for c in ("cpu", "memory", "pids") if mode != "v2" and c not in controllers]
    if missing:
        return Finding("FAIL", "cgroups", f"{mode}: no {', '.join(missing)} hierarchy", "mount the cgroup controllers")
    floor = oom_score_adj_floor()
    note = f"; oom_score_adj floor {floor} (containers are clamped to it)" if floor > -1000 else ""
    return Finding("ok", "cgroups", f"{mode}, cgroupfs driver{note}")


def _check_mirrors(config: Config) -> list[Finding]:
    findings = []
    for registry, mirrors in sorted(config.registry.mirrors.items()):
        for mirror in mirrors:
            host, _, port = mirror.rpartition(":") if ":" in mirror else (mirror, "", "443")
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
                findings.append(Finding("ok", "mirror", f"{registry} -> {mirror} answers"))
            except (OSError, ValueError) as e:
                findings.append(
                    Finding("warn", "mirror", f"{registry} -> {mirror}: {e}", "start the mirror or fix the config")
                )
    return findings


def _check_vm_program(what: str, path: Path, package: str) -> Finding:
    if not os.access(path, os.X_OK):
        return Finding("FAIL", what, f"{path} missing: untrusted pods cannot run", f"apt-get install {package}")
    return Finding("ok", what, f"{path}: {_version_line([str(path), '--version'])}")


async def _check_vm_guest(config: Config) -> list[Finding]:
    """Guest assets built and current, and the accelerator pod VMs would use (from the cached probe)."""
    from vm_backend import accel, guest_image

    fix = "run `tandem assets` (make setup does)"
    try:
        status = await guest_image.asset_status(config.state_dir)
    except TandemError as e:
        return [Finding("warn", "guest assets", f"cannot compare with the packages apt offers: {e}", fix)]
    current = status.current
    if current is None:
        return [
            Finding("warn", "guest assets", f"not built under {guest_image.assets_root(config.state_dir)}", fix),
            Finding("warn", "accel", "not probed yet", fix),
        ]
    size = current.manifest.get("initramfs_bytes", 0) / 2**20
    detail = (
        f"{current.dir} (kernel {current.kernel_release}, initramfs {size:.1f} MiB, "
        f"userland image {current.userland_bytes / 2**20:.1f} MiB)"
    )
    findings = [
        Finding("ok", "guest assets", detail)
        if status.fresh
        else Finding("warn", "guest assets", f"{detail} is out of date: an input changed", fix)
    ]
    if config.vm.accel != "auto":
        return [*findings, accel_finding(config, AccelChoice(config.vm.accel, "set by [vm] accel"))]
    try:
        key = await accel.probe_key(config.vm.qemu, current)
    except TandemError as e:
        return [*findings, Finding("warn", "accel", f"cannot run QEMU: {e}", "fix QEMU first")]
    choice = accel.cached_choice(config.state_dir, key)
    if choice is None:
        findings.append(Finding("warn", "accel", "not probed yet (or QEMU, a kernel or /dev/kvm changed)", fix))
    else:
        findings.append(accel_finding(config, choice))
    return findings


def accel_finding(config: Config, choice: AccelChoice) -> Finding:
    """The accelerator VMs use; under TCG with the translation cache each VM holds (README: Pod start or memory)."""
    if choice.accel == "kvm":
        return Finding("ok", "accel", f"kvm: {choice.reason}")
    cache = f"a {config.vm.tcg_cache_mib} MiB translation cache per VM ([vm] tcg_cache_mib)"
    if config.vm.accel == "tcg":
        return Finding("ok", "accel", f"tcg ({choice.reason}), {cache}")
    slow = "untrusted pods run emulated (slow); KVM needs a usable /dev/kvm"
    return Finding("warn", "accel", f"tcg: {choice.reason}; {cache}", slow)


def check_ksm(directory: Path = KSM_DIR) -> Finding:
    """Whether the host merges identical pages (KSM): reported, never changed (it is host-wide, the operator's)."""
    status = ksm_status(directory)
    if status is None:
        return Finding("ok", "ksm", "not in this kernel: VMs' identical pages are not merged")
    tail = "" if status.on else "; the operator's choice (`bench.vm` measures what it would save); Tandem never sets it"
    return Finding("ok", "ksm", f"{status.describe()}{tail}")


def _ids_in_use(first: int, count: int) -> list[str]:
    """Users, groups and subordinate id ranges that overlap the jail uids."""
    end = first + count
    found = [f"user {u.pw_name} ({u.pw_uid})" for u in pwd.getpwall() if first <= u.pw_uid < end]
    found += [f"group {g.gr_name} ({g.gr_gid})" for g in grp.getgrall() if first <= g.gr_gid < end]
    for name in ("/etc/subuid", "/etc/subgid"):
        with contextlib.suppress(OSError):
            for line in Path(name).read_text().splitlines():
                owner, _, rest = line.partition(":")
                start, _, length = rest.partition(":")
                if start.isdigit() and length.isdigit() and int(start) < end and first < int(start) + int(length):
                    found.append(f"{name} range of {owner}")
    return found


def _check_jail(config: Config) -> list[Finding]:
    """The VMM's jail: the uid range, cgroup controllers for its limits, and a jailed QEMU starting for real."""
    vm = config.vm
    if not vm.jail:
        return [Finding("warn", "jail", "[vm] jail = false: QEMU runs as root, unconfined", "only for measuring")]
    ids = JailIds(config.runtime_dir / "vm" / "jail-ids", vm.jail_uid_first, vm.jail_uid_count)
    last = vm.jail_uid_first + vm.jail_uid_count - 1
    span = f"uids {vm.jail_uid_first}-{last}, {len(ids.holders())} in use"
    clash = _ids_in_use(vm.jail_uid_first, vm.jail_uid_count)
    findings = [
        Finding("FAIL", "jail ids", f"{span}; also owned by {', '.join(clash[:3])}", "move [vm] jail_uid_first")
        if clash
        else Finding("ok", "jail ids", span)
    ]
    roots = cgroups.controller_roots()
    missing = [c for c in cgroups.LIMITED_CONTROLLERS if c not in roots]
    if missing:
        fix = "enable the controllers (cgroup_enable= on the kernel command line)"
        findings.append(Finding("FAIL", "vm cgroups", f"no {', '.join(missing)} controller: no VM limits", fix))
    else:
        where = ", ".join(f"{c} v{roots[c][1]}" for c in cgroups.LIMITED_CONTROLLERS)
        findings.append(Finding("ok", "vm cgroups", where))
    findings.append(_probe_jail(config, ids))
    return findings


def _check_warm_pool(config: Config) -> Finding:
    """The warm pool: its size, and the warm VMs whose QEMU runs now (from the pool's records)."""
    size = config.vm.warm_pool
    if size == 0:
        return Finding("ok", "warm pool", "off ([vm] warm_pool = 0): every VM pod boots its own VM")
    records = warm_records(config.runtime_dir / "vm" / "pool")
    running = [r for r in records if r.qemu and ProcessIdentity(r.qemu["pid"], r.qemu["start_time"]).alive()]
    ready = sum(1 for r in running if r.ready and not r.claimed_by)
    booting = sum(1 for r in running if not r.ready)
    detail = f"{size} configured: {ready} ready, {booting} booting (README, The warm pool: memory per warm VM)"
    return Finding("ok", "warm pool", detail)


def _probe_jail(config: Config, ids: JailIds) -> Finding:
    """QEMU started in a jail of its own (as a VM's would be) to print its version: the root, the uid drop
    and QEMU's loading in it all work."""
    owner = f"doctor-{os.getpid()}"
    try:
        uid = ids.allocate(owner)
        work = Path(tempfile.mkdtemp(prefix=".doctor-jail-", dir=config.runtime_dir))
    except (OSError, TandemError) as e:
        ids.release(owner)
        return Finding("FAIL", "jail", f"cannot prepare a jail: {e}", "run as root")
    try:
        ro = [Path("/usr")] if config.vm.qemu.is_relative_to("/usr") else [Path("/usr"), config.vm.qemu]
        argv = Jail(uid, uid).qemu_prefix(root=work / "jail", netns=None, ro=ro, rw=[], devices=["null"])
        result = proc.run_blocking([*argv, str(config.vm.qemu), "-version"], timeout=30)
    except (OSError, TandemError) as e:
        return Finding("FAIL", "jail", f"the jailer did not run: {e}", "reinstall Tandem (make setup)")
    finally:
        ids.release(owner)
        shutil.rmtree(work, ignore_errors=True)
    output = (result.stdout + result.stderr).decode(errors="replace").strip().splitlines()
    if result.returncode != 0:
        return Finding("FAIL", "jail", f"a jailed QEMU did not start: {' | '.join(output[-2:])}", "see the message")
    return Finding("ok", "jail", f"QEMU runs jailed (uid {uid}, no capabilities, a root of /usr alone): {output[0]}")


def _in(section: str, findings: list[Finding]) -> list[Finding]:
    return [dataclasses.replace(f, section=section) for f in findings]


def diagnose(config_path: Path | None) -> list[Finding]:
    config_finding, config = _check_config(config_path)
    if config is None:
        return _in("daemon", [config_finding])
    host: list[Callable[[], Finding]] = [
        lambda: _check_dir("state dir", config.state_dir),
        lambda: _check_dir("runtime dir", config.runtime_dir),
        lambda: _check_overlay(config.state_dir),
        _check_cgroups,
    ]
    trusted: list[Callable[[], Finding]] = [
        lambda: _check_program("runc", "runc"),
        lambda: _check_program("conmon", "conmon"),
        _check_catatonit,
    ]
    return [
        *_in("daemon", [config_finding, _check_service(), *_check_daemon(config), _check_metrics(config)]),
        *_in("host", [check() for check in host]),
        *_in("network", _check_cni(config)),
        *_in("trusted pods (runc)", [check() for check in trusted]),
        *_in(
            "untrusted pods (VMs)",
            [
                _check_vm_program("qemu", config.vm.qemu, "qemu-system-x86"),
                _check_vm_program("virtiofsd", config.vm.virtiofsd, "qemu-system-common"),
                *asyncio.run(_check_vm_guest(config)),
                *_check_jail(config),
                _check_warm_pool(config),
                check_ksm(),
            ],
        ),
        *_in("images", _check_mirrors(config) or [Finding("ok", "mirrors", "none configured")]),
    ]


def exit_status(findings: list[Finding]) -> int:
    if any(f.level == "FAIL" for f in findings):
        return EXIT_FAILED
    return EXIT_WARNINGS if any(f.level == "warn" for f in findings) else EXIT_OK


def report(findings: list[Finding], config_path: Path | None) -> str:
    """The page: a heading, the findings by section (each not OK with its fix), a summary with the exit status."""
    config = str(config_path) if config_path else "the default config"
    lines = [f"tandem doctor: {RUNTIME_NAME} {RUNTIME_VERSION}, {config} (exit status: 0 all OK, 1 a FAIL, 2 warnings)"]
    section = None
    for f in findings:
        if f.section != section:
            section = f.section
            lines += ["", section[:1].upper() + section[1:]]
        lines.append(f"  {LEVELS[f.level]:<5} {f.what:<13} {f.detail}")
        if f.fix and f.level != "ok":
            lines.append(f"  {'':<5} {'':<13} fix: {f.fix}")
    counts = {level: sum(f.level == level for f in findings) for level in LEVELS}
    status = exit_status(findings)
    meaning = {EXIT_OK: "all OK", EXIT_FAILED: "something FAILed", EXIT_WARNINGS: "warnings only"}[status]
    summary = ", ".join(f"{counts[level]} {shown}" for level, shown in LEVELS.items())
    lines += ["", f"{summary}: exit {status} ({meaning})"]
    return "\n".join(lines) + "\n"


def run_doctor(config_path: Path | None) -> int:
    findings = diagnose(config_path)
    print(report(findings, config_path), end="")
    return exit_status(findings)
