"""The daemon's handle on one running pod VM: its QEMU, its agent connection, and the watch on its end.

Rebuilt after a daemon restart from the pod's records (`VmBackend.resume_sandbox`):
the QEMU identity saved in its run dir says whether the VM survived, and the agent
connection is opened in the background (it replays every event the last daemon
did not acknowledge). Nothing that answers kubelet's List* or Status calls waits
for it: whether the pod is alive is QEMU's process identity.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import FailedPrecondition, TandemError, Unavailable
from core.proc import reap
from vm_backend.channel import AgentClient
from vm_backend.events import PodEvents
from vm_backend.qemu import QemuVm

log = logging.getLogger("tandem.vm")

RECONNECT_DEADLINE = 10.0
"""Seconds a background reconnection after a restart may take before it is logged as late (it goes on)."""


@dataclass(eq=False)
class PodVm:
    """What the daemon holds for one pod VM."""

    run_dir: Path
    vm: QemuVm
    events: PodEvents
    on_end: Callable[[], None]  # told when the VM is gone, after its containers were
    client: AgentClient | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _watch: int | None = None  # a pidfd of QEMU while its end is watched
    _reconnecting: asyncio.Task[None] | None = None

    def container_dir(self, container_id: str) -> Path:
        """Where the host keeps a container's rootfs mount point and process spec (never under the share)."""
        return self.run_dir / "c" / container_id

    def client_or_fail(self) -> AgentClient:
        if self.client is None:
            raise Unavailable(f"no connection to the agent of the VM in {self.run_dir}")
        return self.client

    def open_client(self) -> AgentClient:
        """The agent connection, opening (and from then on re-opening) in the background if there is none."""
        if self.client is None:
            self.client = AgentClient(self.vm.spec.agent_socket, self.events)
            self.client.open()
        return self.client

    async def connect(self, timeout: float) -> AgentClient:
        """The agent connection, up: waits at most `timeout` seconds for the agent to answer."""
        if not self.vm.alive():
            raise FailedPrecondition(f"the VM in {self.run_dir} is not running")
        client = self.open_client()
        await client.wait_connected(timeout)
        return client

    def reconnect(self, pod_id: str) -> None:
        """After a daemon restart: connect in the background (its unacknowledged events follow), logging a late
        agent; what needs the agent waits for it then, nothing else does."""
        if self._reconnecting is not None or not self.vm.alive():
            return
        client = self.open_client()

        async def report() -> None:
            try:
                await client.wait_connected(RECONNECT_DEADLINE)
            except TandemError as e:
                log.warning("pod %s: %s; still trying in the background", pod_id[:12], e)
            else:
                log.info("pod %s: reconnected to its agent", pod_id[:12])

        self._reconnecting = asyncio.create_task(report())

    def watch(self) -> None:
        """Tell the pod's containers that they ended when QEMU does (it died, or the guest went down)."""
        if self._watch is not None:
            return
        qemu = self.vm.identity()
        pidfd = None if qemu is None else qemu.open()
        if qemu is None or pidfd is None:
            return
        self._watch = pidfd

        def ended() -> None:
            self.unwatch()
            reap(qemu.pid)
            log.warning("the VM in %s is gone", self.run_dir)
            self.events.vm_died()
            self.on_end()

        asyncio.get_running_loop().add_reader(pidfd, ended)

    def unwatch(self) -> None:
        """Stop watching QEMU (before stopping it on purpose)."""
        if self._watch is not None:
            asyncio.get_running_loop().remove_reader(self._watch)
            os.close(self._watch)
            self._watch = None

    async def close(self) -> None:
        """Drop the agent connection; what listened to it ends. The VM itself is not touched."""
        self.unwatch()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self.client is not None:
            await self.client.close()
            self.client = None
        self.events.close()
