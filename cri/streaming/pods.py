"""What the streaming server runs: exec, attach and port-forward on the backend of the pod concerned."""

from __future__ import annotations

import asyncio
from typing import Any

from core.errors import FailedPrecondition
from protos import cri_pb2 as pb
from sandbox.backend import Backend, Process
from sandbox.manager import PodManager
from sandbox.model import SandboxRecord


class PodStreams:
    """Looks the container or pod up again when its connection arrives: it may have stopped since the URL."""

    def __init__(self, pods: PodManager) -> None:
        self.pods = pods

    def _backend(self, sandbox: SandboxRecord) -> Backend[Any]:
        backend = self.pods.backends.get(sandbox.backend)
        if backend is None:
            raise FailedPrecondition(f"{sandbox.backend} backend not available")
        return backend

    async def exec(self, request: pb.ExecRequest, terminal_size: tuple[int, int] | None) -> Process:
        sandbox, container = await self.pods.running(request.container_id)
        return await self._backend(sandbox).exec(
            sandbox, container, list(request.cmd), tty=request.tty, stdin=request.stdin, terminal_size=terminal_size
        )

    async def attach(self, request: pb.AttachRequest) -> Process:
        sandbox, container = await self.pods.running(request.container_id)
        return await self._backend(sandbox).attach(sandbox, container, tty=request.tty, stdin=request.stdin)

    async def port_forward(self, sandbox_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sandbox = self.pods.sandbox(sandbox_id)
        if not await self.pods.sandbox_ready(sandbox):
            raise FailedPrecondition(f"pod sandbox {sandbox.id} is not ready")
        return await self._backend(sandbox).port_forward(sandbox, port)
