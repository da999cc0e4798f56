"""What the streaming server runs: exec, attach and port-forward, through the pod manager."""

from __future__ import annotations

from protos import cri_pb2 as pb
from sandbox.backend import ByteChannel, Process
from sandbox.manager import PodManager


class PodStreams:
    """The streaming server's runtime: the cached CRI request of a session, carried out by the manager."""

    def __init__(self, pods: PodManager) -> None:
        self.pods = pods

    async def exec(self, request: pb.ExecRequest, terminal_size: tuple[int, int] | None) -> Process:
        return await self.pods.exec(
            request.container_id, list(request.cmd), tty=request.tty, stdin=request.stdin, terminal_size=terminal_size
        )

    async def attach(self, request: pb.AttachRequest) -> Process:
        return await self.pods.attach(request.container_id, tty=request.tty, stdin=request.stdin)

    async def port_forward(self, sandbox_id: str, port: int) -> ByteChannel:
        return await self.pods.port_forward(sandbox_id, port)
