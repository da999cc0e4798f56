"""Exec, attach and port-forward sessions on a pod's VM: each registered with the pod's event router first,
so the agent's events for it are taken from the moment it exists (`events.py`), and forgotten if it fails."""

from __future__ import annotations

import secrets
from typing import Any

from core.errors import FailedPrecondition
from sandbox.model import ContainerRecord
from vm_backend.pod import PodVm
from vm_backend.processes import VmAttach, VmExec, VmPort


async def start_exec(
    pod: PodVm,
    container_id: str,
    process_spec: dict[str, Any],
    *,
    tty: bool,
    stdin: bool,
    size: tuple[int, int] | None,
) -> VmExec:
    """`process_spec` run in the container; with `tty`, a terminal `size` (width, height) big from the start."""
    if tty and size is not None:
        process_spec["consoleSize"] = {"width": size[0], "height": size[1]}
    client = pod.client_or_fail()
    exec_id = f"x{secrets.token_hex(8)}"
    process = pod.events.execs[exec_id] = VmExec(client, container_id, exec_id, tty, pod.events.end_stream)
    try:
        await client.start_exec(container_id, exec_id, process_spec, terminal=tty, stdin=stdin, window=process.window)
    except BaseException:
        pod.events.execs.pop(exec_id, None)
        raise
    if tty and size is not None:
        await process.resize(*size)
    return process


def attach(pod: PodVm, container: ContainerRecord, *, stdin: bool) -> VmAttach:
    """The container's own stdio, as its config set it up; an attach to an exited container ends at once."""
    known = pod.events.containers.get(container.id)
    if known is None:
        raise FailedPrecondition(f"container {container.id} is not known to its pod's VM")
    config = container.config
    attacher = VmAttach(
        pod.client_or_fail,
        container.id,
        tty=config.tty,
        stdin=stdin and config.stdin,
        stdin_once=config.stdin_once,
        detach_on_eof=config.stdin and not config.stdin_once and not config.tty,
        on_detach=known.attachers.discard,
    )
    if known.exit is not None:
        attacher.finished()
    else:
        known.attachers.add(attacher)
    return attacher


async def open_port(pod: PodVm, port: int) -> VmPort:
    """A TCP connection to `port` on the guest's loopback."""
    client = pod.client_or_fail()
    stream_id = f"p{secrets.token_hex(8)}"
    ports = pod.events.ports
    channel = ports[stream_id] = VmPort(client, stream_id, pod.events.end_stream)
    try:
        await client.open_port(stream_id, port, window=channel.window)
    except BaseException:
        ports.pop(stream_id, None)
        raise
    return channel
