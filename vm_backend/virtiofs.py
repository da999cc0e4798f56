"""One virtiofsd per pod, sharing only that pod's directory (`<run_dir>/share`) into its VM.

Container rootfs directories reach the guest by being bind-mounted into the
share as they are created; nothing else of the host is ever exported. The share
is its own private mount, so those binds stay out of other mount namespaces.
virtiofsd serves one QEMU connection and exits when QEMU goes away: every QEMU
launch (including a boot retry) gets a fresh one. With a jail, it starts inside
the VM's cgroup (through the jailer, which does nothing else to it) and its socket
is handed to the jailed QEMU's uid before QEMU starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from pathlib import Path

from core import mounts, proc
from core.errors import FailedPrecondition, InvalidArgument, Unavailable
from core.proc import ProcessIdentity, spawn_detached, wait_exit
from vm_backend.jail import Jail

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
_SOCKET_WAIT = 10.0


def _check_id(container_id: str) -> None:
    if not container_id or "/" in container_id or container_id in (".", ".."):
        raise InvalidArgument(f"container id {container_id!r} cannot name a directory")


class Virtiofsd:
    """The pod's virtiofsd and its share directory, all under the pod's VM run dir."""

    def __init__(self, run_dir: Path, binary: str = VIRTIOFSD) -> None:
        self.run_dir = run_dir
        self.binary = binary
        self.share = run_dir / "share"
        self.socket = run_dir / "virtiofsd.sock"
        self.pidfile = run_dir / "virtiofsd.pid"
        self.log_file = run_dir / "virtiofsd.log"

    def argv(self) -> list[str]:
        return [
            self.binary,
            f"--socket-path={self.socket}",
            "-o", f"source={self.share}",
            "-o", "cache=auto",
            "-o", "sandbox=chroot",  # chroot into the share: nothing outside it can be named
            "-o", "announce_submounts",  # each bind-mounted rootfs keeps its own st_dev in the guest
        ]  # fmt: skip

    async def prepare_share(self) -> None:
        """Create the share and make it a private mount of its own (once)."""
        self.share.mkdir(parents=True, exist_ok=True)
        os.chmod(self.share, 0o755)
        await asyncio.to_thread(mounts.make_private, self.share)

    def identity(self) -> ProcessIdentity | None:
        """The virtiofsd started for this share, while it runs (the pidfile holds its pid and start time)."""
        identity = ProcessIdentity.load(self.pidfile)
        return identity if identity is not None and identity.alive() else None

    def alive(self) -> bool:
        return self.identity() is not None

    async def start(self, jail: Jail | None = None) -> None:
        """Launch a fresh virtiofsd (stopping a previous one) and wait for its socket (then `jail`'s uid's)."""
        await self.prepare_share()
        await self.stop()
        argv = self.argv() if jail is None else [*jail.join_prefix(), *self.argv()]
        virtiofsd = await asyncio.to_thread(spawn_detached, argv, self.log_file)
        virtiofsd.save(self.pidfile)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _SOCKET_WAIT
        while not self.socket.exists():
            if not virtiofsd.alive() or loop.time() > deadline:
                await self.stop()
                raise Unavailable(f"virtiofsd did not start: {self._log_tail()}")
            await asyncio.sleep(0.02)
        if jail is not None:
            # No race: the socket's directory is root's alone, and QEMU starts only after this.
            os.chown(self.socket, jail.uid, jail.gid)
            os.chmod(self.socket, 0o600)

    def _log_tail(self) -> str:
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

    async def remove_share(self) -> None:
        """Unmount and delete the share; refused while a rootfs is still bound inside (rmtree would go through it)."""
        inside = mounts.mounts_below(self.share)
        if inside:
            raise FailedPrecondition(f"{self.share} still has mounts inside: {', '.join(inside)}")
        await asyncio.to_thread(mounts.unmount, self.share)
        await asyncio.to_thread(shutil.rmtree, self.share, True)

    def guest_rootfs(self, container_id: str) -> str:
        """Where the container's rootfs appears relative to the share (CreateContainer.rootfs)."""
        _check_id(container_id)
        return f"{container_id}/rootfs"

    async def bind_rootfs(self, container_id: str, rootfs: Path) -> str:
        """Bind-mount a prepared rootfs into the share; return its path relative to the share."""
        relative = self.guest_rootfs(container_id)
        target = self.share / relative
        target.mkdir(parents=True, exist_ok=True)
        if not mounts.is_mounted(target):
            await proc.run(["mount", "--bind", rootfs, target])  # private too, as a mount under the share
        return relative

    async def unbind_rootfs(self, container_id: str) -> None:
        """Undo `bind_rootfs`; not bound is success."""
        target = self.share / self.guest_rootfs(container_id)
        await asyncio.to_thread(mounts.unmount, target)
        for directory in (target, target.parent):
            with contextlib.suppress(OSError):  # gone already, or still holding something else
                directory.rmdir()
