"""One QEMU micro-VM per pod, launched detached so that it outlives the daemon.

QEMU runs in its own session, output in `qemu.log`; nothing ties it to the
daemon's process or event loop. (`-daemonize` is no option: QEMU forks and calls
setsid() after its seccomp filter is in, which `spawn=deny` and
`elevateprivileges=deny` forbid.) Everything about a running VM is found again
from its run directory: the pidfile (the daemon's: QEMU's pid and start time, a
`core.proc.ProcessIdentity`), and in `vmm/` the QMP socket,
the console socket and log, the agent's socket. With a `Jail`, QEMU starts through
the jailer and `vmm/` is the only directory it can write: everything the daemon
takes from there (sockets, the console log) is opened without following symlinks.
The NIC is a tap the daemon opens in the pod's netns and hands over as a file
descriptor. The flags follow shared/notes/qemu-on-these-hosts.md (measured on
these hosts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import AlreadyExists, DeadlineExceeded, InvalidArgument, Unavailable
from core.files import open_regular_nofollow, private_dir, socket_nofollow
from core.proc import ProcessIdentity, kill_and_wait, start_detached, wait_exit
from core.settings import TCG_CACHE_MIB
from vm_backend.guest_memory import GuestMemory, layout
from vm_backend.jail import Jail
from vm_backend.network import open_tap
from vm_backend.virtiofs import Virtiofsd

log = logging.getLogger("tandem.vm.qemu")

BOOT_MARKER = "tandem-init: agent starting"  # printed by init.sh right before it execs the agent
PROBE_MARKER = "tandem-init: probe ok"  # printed by init.sh with tandem.probe=1
QEMU = "qemu-system-x86_64"
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
_TSC_KHZ_FALLBACK = 2_600_000  # the notes' value for these hosts
_SOCKET_PATH_MAX = 107  # sun_path, minus the NUL
VMM_DIR = "vmm"  # in the run dir: QEMU's own files, the only place a jailed QEMU can write


def host_tsc_khz() -> int:
    """The host's TSC rate: TCG guests read the host TSC, and telling the kernel avoids PIT calibration hangs."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return round(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return _TSC_KHZ_FALLBACK


@dataclass(frozen=True)
class TapNic:
    """A tap device (already created in the pod's netns) that becomes the guest's NIC; QEMU gets it open."""

    ifname: str
    mac: str


@dataclass(frozen=True)
class VmSpec:
    """What to launch. `run_dir` holds every socket and file of this VM and nothing else."""

    name: str
    run_dir: Path
    kernel: Path
    initramfs: Path
    userland: Path  # the userland image every VM maps read-only (vm_backend/guest_memory.py)
    userland_bytes: int
    accel: str = "tcg"  # "kvm" or "tcg"
    tcg_cache_mib: int = TCG_CACHE_MIB  # under TCG: its translation cache (`[vm] tcg_cache_mib`)
    vcpus: int = 1
    memory_mib: int = 256
    share_tag: str = "tandem"  # virtio-fs tag of the pod's share (when a Virtiofsd is attached)
    tap: TapNic | None = None
    netns: Path | None = None  # the pod's network namespace file: QEMU runs inside it
    kernel_args: tuple[str, ...] = ()
    qemu: str = QEMU
    tsc_khz: int = field(default_factory=host_tsc_khz)
    jail: Jail | None = None  # None: QEMU runs as root in the host's mount namespace (measurements only)

    @property
    def memory(self) -> GuestMemory:
        """Guest RAM and the userland image, laid out in guest-physical memory."""
        return layout(self.memory_mib, self.userland_bytes)

    @property
    def pidfile(self) -> Path:
        """Who QEMU is, written by the daemon: its pid and start time (`core.proc.ProcessIdentity`)."""
        return self.run_dir / "qemu.pid"

    @property
    def vmm_dir(self) -> Path:
        """QEMU's own files: the one directory a jailed QEMU can write (its uid owns it)."""
        return self.run_dir / VMM_DIR

    @property
    def jail_root(self) -> Path:
        """Where the jailer mounts the jail's root, in the jail's own mount namespace (empty on the host)."""
        return self.run_dir / "jail"

    @property
    def qmp_socket(self) -> Path:
        return self.vmm_dir / "qmp.sock"

    @property
    def console_socket(self) -> Path:
        return self.vmm_dir / "console.sock"

    @property
    def console_log(self) -> Path:
        return self.vmm_dir / "console.log"

    @property
    def agent_socket(self) -> Path:
        return self.vmm_dir / "agent.sock"

    @property
    def qemu_log(self) -> Path:
        return self.run_dir / "qemu.log"


def kernel_cmdline(spec: VmSpec, share: bool) -> str:
    # cryptomgr.notests: the crypto self-tests are a quarter of a TCG boot (init at 1.18 s of guest
    # uptime instead of 1.42 s). initcall_blacklist, for the KDF108 self-test that remains, costs more
    # than it saves: every initcall is looked up by name.
    args = ["console=ttyS0", "quiet", "panic=-1", f"tsc_early_khz={spec.tsc_khz}", "cryptomgr.notests"]
    # lockdown=confidentiality: tracefs then creates none of its ~10,000 event files at boot, whose inodes
    # and dentries were 9.5 MiB of every guest's RAM; it also shuts the guest kernel's debugging doors
    # (kprobes, tracefs, /dev/mem, bpf reading kernel memory, unsigned modules) to the pod's containers.
    args.append("lockdown=confidentiality")
    # An idle guest's timer wakeups, each a trip through QEMU under TCG (with this whole command line: 178 ->
    # 137 local timer interrupts in 10 s, an idle VM pod's QEMU 9.5 -> 6 millicores): the TSC is the host's,
    # so no clocksource watchdog; no soft-lockup watchdog; no proactive compaction every 0.5 s; and no NUMA
    # balancing, whose nodes here are the memory layout's (guest_memory.py), not the host's.
    args += ["tsc=reliable", "nowatchdog", "sysctl.vm.compaction_proactiveness=0", "numa_balancing=disable"]
    args.append(spec.memory.kernel_arg())  # the userland image's range: legacy pmem, /dev/pmem0
    if share:
        args.append(f"tandem.share={spec.share_tag}")
    return " ".join([*args, *spec.kernel_args])


def _opt(path: Path) -> str:
    """A path inside a QEMU option string, where a comma would end the value."""
    text = str(path)
    if "," in text:
        raise InvalidArgument(f"QEMU cannot take a path with a comma: {text}")
    return text


def build_argv(spec: VmSpec, share_socket: Path | None = None, tap_fd: int | None = None) -> list[str]:
    """QEMU's command line, the same jailed or not: the jail holds every path it names at its host path."""
    if spec.accel not in ("kvm", "tcg"):
        raise InvalidArgument(f"accelerator must be kvm or tcg, got {spec.accel!r}")
    for sock in (spec.qmp_socket, spec.console_socket, spec.agent_socket, share_socket):
        if sock is not None and len(os.fsencode(sock)) > _SOCKET_PATH_MAX:
            raise InvalidArgument(f"unix socket path too long ({len(str(sock))} bytes): {sock}")
    if spec.accel == "kvm":
        accel = ["-accel", "kvm", "-cpu", "host"]
    else:
        accel = ["-accel", f"tcg,tb-size={spec.tcg_cache_mib}", "-cpu", "max"]
    argv = [
        spec.qemu,
        "-name", f"tandem-{spec.name}",
        # pcie=on: without a PCI host bridge the guest's kernel never registers the e820 pmem range
        # (e820__reserve_resources_late runs in x86's PCI init), so /dev/pmem0 would not appear.
        "-M", "microvm,pcie=on",
        *spec.memory.qemu_args(spec.userland),
        *accel,
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-sandbox", SANDBOX,
        "-global", "virtio-mmio.force-legacy=false",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initramfs),
        "-append", kernel_cmdline(spec, share_socket is not None),
        "-chardev", f"socket,id=console,path={_opt(spec.console_socket)},server=on,wait=off,"
        f"logfile={_opt(spec.console_log)},logappend=on",
        "-serial", "chardev:console",
        # Free page reporting: the guest hands back the pages it frees (the initramfs, once unpacked;
        # a container's memory after it exits) and QEMU punches them out of the memfd.
        "-device", "virtio-balloon-device,free-page-reporting=on",
        # The agent's port on PCI, not virtio-mmio: QEMU's virtio-mmio offers every queue at 1024 entries,
        # and the guest fills a serial port's receive queue and the control queue with a 4 KiB buffer per
        # entry (8 MiB of every guest's RAM); virtio-serial-pci's queues are 128. max_ports=2: port 0
        # (reserved for a console) and the agent's, instead of 31 ports' queues.
        "-device", "virtio-serial-pci,id=serial,max_ports=2",
        "-chardev", f"socket,id=agent,path={_opt(spec.agent_socket)},server=on,wait=off",
        "-device", "virtserialport,bus=serial.0,chardev=agent,name=agent",
        "-qmp", qmp_option(spec),
    ]  # fmt: skip
    if share_socket is not None:
        argv += ["-chardev", f"socket,id=vfs,path={_opt(share_socket)}"]
        argv += ["-device", f"vhost-user-fs-device,chardev=vfs,tag={spec.share_tag}"]
    if spec.tap is not None:
        if tap_fd is None:
            raise InvalidArgument(f"vm {spec.name}: a tap NIC needs its open file descriptor")
        argv += ["-netdev", f"tap,id=n0,fd={tap_fd}"]
        argv += ["-device", f"virtio-net-device,netdev=n0,mac={spec.tap.mac}"]
    return argv


def qmp_option(spec: VmSpec) -> str:
    """`-qmp`'s value: it names this VM's run dir, so a command line holding it is this VM's QEMU."""
    return f"unix:{_opt(spec.qmp_socket)},server=on,wait=off"


def launch_argv(spec: VmSpec, qemu_argv: list[str], share_socket: Path | None = None) -> list[str]:
    """QEMU's command line behind the jailer (or, without a jail, behind `nsenter` into the pod's netns)."""
    if spec.jail is None:
        return ["nsenter", f"--net={spec.netns}", "--", *qemu_argv] if spec.netns else qemu_argv
    ro = [Path("/usr"), spec.kernel, spec.initramfs, spec.userland]
    if Path("/etc/ld.so.cache").exists():
        ro.append(Path("/etc/ld.so.cache"))  # else the loader searches every library directory for each library
    binary = Path(shutil.which(spec.qemu) or spec.qemu)
    if not binary.is_relative_to("/usr"):
        ro.append(binary)
    if share_socket is not None:
        ro.append(share_socket)  # it stays in the root-owned run dir, bound in by itself
    rw = [spec.vmm_dir]
    devices = ["null", "zero", "random", "urandom"] + (["kvm"] if spec.accel == "kvm" else [])
    prefix = spec.jail.qemu_prefix(root=spec.jail_root, netns=spec.netns, ro=ro, rw=rw, devices=devices)
    return [*prefix, *qemu_argv]


async def qmp(socket_path: Path, command: str, timeout: float = 5.0, **arguments: Any) -> Any:
    """Run one QMP command on a fresh connection and return its result (events are skipped)."""

    async def talk() -> Any:
        with socket_nofollow(socket_path) as path:
            reader, writer = await asyncio.open_unix_connection(path)
        try:
            await reader.readline()  # greeting
            for execute, args in (("qmp_capabilities", {}), (command, arguments)):
                writer.write(json.dumps({"execute": execute, "arguments": args}).encode() + b"\n")
                await writer.drain()
                while True:
                    line = await reader.readline()
                    if not line:
                        raise Unavailable(f"QMP {socket_path}: connection closed during {execute}")
                    reply = json.loads(line)
                    if "error" in reply:
                        raise Unavailable(f"QMP {execute}: {reply['error'].get('desc', reply['error'])}")
                    if "return" in reply:
                        break
            return reply["return"]
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    try:
        return await asyncio.wait_for(talk(), timeout)
    except (OSError, ValueError) as e:
        raise Unavailable(f"QMP {socket_path}: {e}") from e
    except TimeoutError:
        raise DeadlineExceeded(f"QMP {socket_path}: no answer to {command} within {timeout:g}s") from None


Ready = Callable[["QemuVm"], Awaitable[None]]


def console_marker(marker: str = BOOT_MARKER) -> Ready:
    """A readiness check: the marker line appears in the console log (after this launch's start)."""

    async def ready(vm: QemuVm) -> None:
        while True:  # a log file has no change notification worth the complexity here
            if marker in vm.console_since_launch():
                return
            await asyncio.sleep(0.05)

    return ready


class QemuVm:
    """A pod's VM: start (with a boot deadline and one retry), stop, kill, and re-attach after a restart.

    Construct it with the same spec after a daemon restart and `alive()` tells
    whether the VM survived; every method works on a re-attached VM.
    """

    def __init__(self, spec: VmSpec, virtiofsd: Virtiofsd | None = None) -> None:
        self.spec = spec
        self.virtiofsd = virtiofsd
        self._log_offset = 0

    def identity(self) -> ProcessIdentity | None:
        """The QEMU this VM was launched as, while it runs (not a recycled pid, not a zombie)."""
        identity = ProcessIdentity.load(self.spec.pidfile)
        return identity if identity is not None and identity.alive() else None

    def pid(self) -> int | None:
        """QEMU's pid, while it runs."""
        identity = self.identity()
        return None if identity is None else identity.pid

    def alive(self) -> bool:
        return self.pid() is not None

    def console_since_launch(self) -> str:
        try:
            with open_regular_nofollow(self.spec.console_log) as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    async def start(self, ready: Ready | None = None, boot_timeout: float = 30.0, retries: int = 1) -> None:
        """Launch and wait until `ready` (default: the boot marker on the console) returns.

        Some TCG boots hang early; a boot that misses the deadline is killed, cleaned
        up and launched again (`retries` times). A VM that exits during boot is not
        retried: that failure is in the inputs, and the console tail says why.
        """
        if (running := self.pid()) is not None:
            raise AlreadyExists(f"vm {self.spec.name} is already running (QEMU pid {running})")
        ready = ready or console_marker()
        for attempt in range(retries + 1):
            started = time.monotonic()
            qemu = await self._launch()
            try:
                await self._wait_ready(qemu, ready, boot_timeout)
            except DeadlineExceeded:
                await self._kill(qemu)
                if attempt == retries:
                    raise
                log.warning("vm %s: no boot within %gs, relaunching", self.spec.name, boot_timeout)
                continue
            except BaseException:
                await self._kill(qemu)
                raise
            log.info("vm %s: booted in %.2fs (%s)", self.spec.name, time.monotonic() - started, self.spec.accel)
            return

    async def _launch(self) -> ProcessIdentity:
        """Start QEMU (and a fresh virtiofsd first); return who QEMU is (also saved as the pidfile)."""
        spec, jail = self.spec, self.spec.jail
        private_dir(spec.run_dir)
        private_dir(spec.vmm_dir)
        if jail is not None:
            os.chown(spec.vmm_dir, jail.uid, jail.gid)  # its parent is root's: the VMM cannot swap it
        self._remove_runtime_files()
        self._log_offset = self._console_size()
        tap_fd = await open_tap(spec.netns, spec.tap.ifname) if spec.tap is not None and spec.netns else None
        try:
            share = self.virtiofsd.socket if self.virtiofsd is not None else None
            argv = launch_argv(spec, build_argv(spec, share, tap_fd), share)
            if self.virtiofsd is not None:
                await self.virtiofsd.start(jail)
            fds = () if tap_fd is None else (tap_fd,)
            try:
                qemu = await start_detached(argv, spec.qemu_log, spec.pidfile, fds)
            except Unavailable:
                if self.virtiofsd is not None:
                    await self.virtiofsd.stop()
                raise
        finally:
            if tap_fd is not None:
                os.close(tap_fd)
        return qemu  # the jailer execs QEMU: the process started is QEMU, pid and start time alike

    def _console_size(self) -> int:
        try:
            with open_regular_nofollow(self.spec.console_log) as f:
                return f.seek(0, os.SEEK_END)
        except OSError:
            return 0

    async def _wait_ready(self, qemu: ProcessIdentity, ready: Ready, timeout: float) -> None:
        readiness = asyncio.ensure_future(ready(self))
        exit_watch = asyncio.ensure_future(wait_exit(qemu))
        try:
            done, _ = await asyncio.wait({readiness, exit_watch}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (readiness, exit_watch):
                task.cancel()
        if readiness in done:
            readiness.result()
            return
        if exit_watch in done:
            raise Unavailable(f"vm {self.spec.name}: QEMU exited during boot: {self._tails()}")
        raise DeadlineExceeded(f"vm {self.spec.name}: not booted within {timeout:g}s: {self._tails()}")

    def _tails(self) -> str:
        try:
            with open(self.spec.qemu_log, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 2000))
                qemu_lines = f.read().decode(errors="replace").strip().splitlines()[-3:]
        except OSError:
            qemu_lines = []
        qemu_part = f"QEMU: {' | '.join(qemu_lines)}; " if qemu_lines else ""
        vfs_part = f"virtiofsd: {self.virtiofsd.log_tail()}; " if self.virtiofsd is not None else ""
        return f"{qemu_part}{vfs_part}console: {self._console_tail()}"

    def _console_tail(self, lines: int = 5) -> str:
        tail = [line.strip() for line in self.console_since_launch().splitlines() if line.strip()][-lines:]
        return " | ".join(tail) or "no console output"

    async def status(self) -> str:
        """QEMU's run state (`running`, `paused`, `shutdown`, ...), from QMP."""
        return (await qmp(self.spec.qmp_socket, "query-status"))["status"]

    async def stop(self, timeout: float = 10.0) -> None:
        """ACPI power-down, then QMP `quit`, then SIGKILL; idempotent; cleans up sockets and virtiofsd."""
        qemu = self.identity()
        if qemu is not None:
            for command, wait in (("system_powerdown", timeout), ("quit", 5.0)):
                try:
                    await qmp(self.spec.qmp_socket, command)
                except (Unavailable, DeadlineExceeded) as e:
                    log.info("vm %s: %s failed: %s", self.spec.name, command, e)
                    continue
                if await wait_exit(qemu, wait):
                    break
        await self.kill()

    async def kill(self) -> None:
        """SIGKILL QEMU (if running), stop virtiofsd and remove the sockets; the logs stay."""
        await self._kill(ProcessIdentity.load(self.spec.pidfile))

    async def _kill(self, qemu: ProcessIdentity | None) -> None:
        if qemu is not None:
            await kill_and_wait(qemu, 10.0)
        if self.virtiofsd is not None:
            await self.virtiofsd.stop()
        self._remove_runtime_files()

    def _remove_runtime_files(self) -> None:
        for path in (
            self.spec.pidfile,
            self.spec.qmp_socket,
            self.spec.console_socket,
            self.spec.agent_socket,
        ):
            path.unlink(missing_ok=True)

    async def wait(self) -> None:
        """Until QEMU exits (the guest powered off, panicked or was killed)."""
        qemu = self.identity()
        if qemu is not None:
            await wait_exit(qemu)
