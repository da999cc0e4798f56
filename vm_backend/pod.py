"""The daemon's handle on one running pod VM: its QEMU, its agent connection, and the watch on its end.

Rebuilt lazily after a daemon restart from the pod's run dir: the QEMU identity
saved there says whether the VM survived, and a new agent connection replays
every event the last daemon did not acknowledge.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import Unavailable
from core.proc import reap
from vm_backend.channel import AgentClient
from vm_backend.events import PodEvents
from vm_backend.qemu import QemuVm

log = logging.getLogger("tandem.vm")


@dataclass(eq=False)
class PodVm:
    """What the daemon holds for one pod VM."""

    run_dir: Path
    vm: QemuVm
    events: PodEvents
    on_end: Callable[[], None]  # told when the VM is gone, after its containers were
    client: AgentClient | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    connect_failed_at: float = -math.inf
    _watch: int | None = None  # a pidfd of QEMU while its end is watched

    def container_dir(self, container_id: str) -> Path:
        return self.events.container_dir(container_id)

    def client_or_fail(self) -> AgentClient:
        if self.client is None:
            raise Unavailable(f"no connection to the agent of the VM in {self.run_dir}")
        return self.client

    async def connect(self, timeout: float) -> AgentClient:
        """The agent connection, made now if there is none (the agent then replays its unacknowledged events)."""
        if self.client is None:
            client = AgentClient(self.vm.spec.agent_socket, self.events)
            await client.start(timeout)
            self.client = client
        return self.client

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
        if self.client is not None:
            await self.client.close()
            self.client = None
        self.events.close()
