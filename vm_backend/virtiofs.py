"""One virtiofsd per pod, serving the pod's share (`vm_backend/share.py`) into its VM from inside the share's namespace.

virtiofsd starts through the jailer, which puts it in the VM's cgroup (with a jail)
and in the pod's share namespace, where the share is `/share` and nothing of the
host is mounted; from there it sandboxes itself (`sandbox=namespace`: new mount, PID
and network namespaces, pivot_root into the share, capabilities dropped, seccomp). The
daemon creates the vhost-user socket and hands virtiofsd its listening descriptor
(`--fd`): virtiofsd never names a host path, and writes no lock file on the host as it
does for `--socket-path`. With a jail the socket is handed to the jailed QEMU's uid
before QEMU starts. virtiofsd serves one QEMU connection and exits when QEMU goes
away: every QEMU launch (including a boot retry) gets a fresh one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path

from core.proc import ProcessIdentity, start_detached, wait_exit
from vm_backend.jail import Jail, join_prefix
from vm_backend.share import PodShare
from vm_backend.sharens import share_path

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
# RLIMIT_NOFILE of virtiofsd. With cache=auto it holds an O_PATH descriptor for every inode the guest has looked up
# and not yet forgotten, and one per file the guest holds open: measured, 40 descriptors for an idle pod, then one
# more per file a container walks or creates (`find /` over busybox: +300; 5000 files created: +5000) for as long
# as the guest caches them. Past the limit the guest's lookups fail with EMFILE, so it follows the guest's memory:
# a cached FUSE inode with its dentry takes over 1 KiB of guest RAM, so a guest that gives half its memory to them
# holds ~512 per MiB (131072 for the default 256 MiB). The host memory those descriptors pin is charged to the
# VM's cgroup; the limit keeps one hostile guest from holding a million of the node's open files (virtiofsd's
# own default).
FILES_PER_MIB = 512
NOFILE_MIN, NOFILE_MAX = 65536, 1 << 20


def virtiofsd_nofile(memory_mib: int) -> int:
    """RLIMIT_NOFILE for the virtiofsd of a VM with `memory_mib` of RAM."""
    return min(NOFILE_MAX, max(NOFILE_MIN, memory_mib * FILES_PER_MIB))


class Virtiofsd:
    """The pod's virtiofsd: socket, pidfile and log in the VM's run dir; its share in the namespace at `share_ns`."""

    def __init__(self, run_dir: Path, share_ns: Path, binary: str = VIRTIOFSD, nofile: int = NOFILE_MIN) -> None:
        self.run_dir = run_dir
        self.share_ns = share_ns
        self.binary = binary
        self.nofile = nofile
        self.socket = run_dir / "virtiofsd.sock"
        self.pidfile = run_dir / "virtiofsd.pid"
        self.log_file = run_dir / "virtiofsd.log"

    @classmethod
    def of_vm(cls, run_dir: Path, binary: str, memory_mib: int) -> Virtiofsd:
        """The virtiofsd of the VM whose run dir is `run_dir` (a pod's or a warm one): its share's namespace, and
        as many files as its RAM warrants."""
        return cls(run_dir, PodShare(run_dir).ns_file, binary=binary, nofile=virtiofsd_nofile(memory_mib))

    def argv(self, listen_fd: int) -> list[str]:
        return [
            self.binary,
            f"--fd={listen_fd}",
            "-o", f"source={share_path(str(self.share_ns))}",  # there only in the share namespace
            "-o", "cache=auto",
            "-o", "sandbox=namespace",
            "-o", "announce_submounts",  # each attached rootfs keeps its own st_dev in the guest
            f"--rlimit-nofile={self.nofile}",
        ]  # fmt: skip

    def identity(self) -> ProcessIdentity | None:
        """The virtiofsd started for this share, while it runs (the pidfile holds its pid and start time)."""
        identity = ProcessIdentity.load(self.pidfile)
        return identity if identity is not None and identity.alive() else None

    def alive(self) -> bool:
        return self.identity() is not None

    def _listen(self, jail: Jail | None) -> socket.socket:
        """The vhost-user socket, listening; only root (and the jailed QEMU's uid) can connect."""
        self.socket.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.socket))
            if jail is not None:
                # No race: the socket's directory is root's alone, and QEMU starts only after this.
                os.chown(self.socket, jail.uid, jail.gid)
            os.chmod(self.socket, 0o600)
            listener.listen(1)
        except BaseException:
            listener.close()
            raise
        return listener

    async def start(self, jail: Jail | None = None) -> None:
        """Launch a fresh virtiofsd (stopping a previous one) listening on a fresh socket."""
        await self.stop()
        listener = self._listen(jail)
        try:
            fd = listener.fileno()
            prefix = join_prefix(jail.cgroup_dirs if jail is not None else (), self.share_ns)
            await start_detached([*prefix, *self.argv(fd)], self.log_file, self.pidfile, (fd,))
        finally:
            listener.close()  # virtiofsd holds it now

    def log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(lines[-3:]) or "no output"

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; remove the socket and pidfile. Idempotent."""
        virtiofsd = ProcessIdentity.load(self.pidfile)
        pidfd = None if virtiofsd is None else virtiofsd.open()
        if virtiofsd is not None and pidfd is not None:
            try:
                for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, sig)
                    if await wait_exit(virtiofsd, wait):
                        break
            finally:
                os.close(pidfd)
        self.socket.unlink(missing_ok=True)
        self.pidfile.unlink(missing_ok=True)
