"""The event router of a VM pod: container output into CRI logs and attached clients, exec output to its
session, port data to its channel, and exits on to the pod manager.

Everything here is guest data, so the rule of the VM boundary applies: the host
never derives a host path, a size or a decision from guest data without checking
it against what the host itself created. An event is accepted only for an ID the
host created for THIS pod and still holds: a container the manager told it of
(at CreateContainer, or from the records after a restart), an exec or a port
stream the host opened. Anything else (another pod's container, `../x`, `/etc`,
an exec the host never started, a kind this host does not know) is dropped,
counted, and logged once per pod; what still comes for a stream that ended
(in flight while the host closed it) is dropped without being counted. A
container's log writer is made by the host from its record, never from an
event; guest timestamps are clamped between the container's creation or start
and the host's clock (plus `CLOCK_SKEW_NS`), exit codes to 0-255.

One `PodEvents` per pod VM; it is the agent connection's event callback, so the
agent's at-least-once delivery (events replayed after a daemon restart) lands in
the same logs, and an exit reaches the manager, which persists it before the
callback returns and the event is acknowledged.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protos import agent_pb2
from sandbox.crilog import STDERR, STDOUT, CriLogWriter
from sandbox.model import ExitStatus
from vm_backend.channel import guest_text
from vm_backend.processes import VmAttach, VmExec, VmPort

log = logging.getLogger("tandem.vm")

ENDED_STREAMS = 256  # how many ended exec and port stream IDs are remembered, for the events still in flight
CLOCK_SKEW_NS = 5 * 10**9
"""How far ahead of the host's clock a guest timestamp may be (the guest's clock is set from the host's at
boot and may drift); beyond it, the host's time is used."""


@dataclass(eq=False)
class KnownContainer:
    """A container the host created in this pod, and what the router keeps for it."""

    log: CriLogWriter | None
    since: int  # no guest timestamp of it is earlier: its creation, then its start (ns)
    attachers: set[VmAttach] = field(default_factory=set)
    exit: ExitStatus | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)


def _clamp(unix_ns: int, since: int) -> int:
    """A guest timestamp made sane: not before `since`, and not in the future (then: now)."""
    now = time.time_ns()
    if unix_ns <= 0 or unix_ns > now + CLOCK_SKEW_NS:
        return now
    return max(unix_ns, since)


class PodEvents:
    """Routes one pod's agent events; `on_exit(container_id, status)` is the manager's exit listener."""

    def __init__(self, pod_id: str, on_exit: Callable[[str, ExitStatus | None], None], log_size_max: int) -> None:
        self.pod_id = pod_id
        self._on_exit = on_exit
        self._log_size_max = log_size_max
        self.containers: dict[str, KnownContainer] = {}
        self.execs: dict[str, VmExec] = {}
        self.ports: dict[str, VmPort] = {}
        self.dropped = 0  # events for IDs the host did not create for this pod (or of no known kind)
        self.overruns = 0  # streams closed because the guest sent past their credit
        self._warned: set[str | tuple[str, str]] = set()  # what was said once: kinds, and ("log", container)
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()

    # ---- what the host created ---------------------------------------------------------------

    def add_container(self, container_id: str, log_path: str, since: int, *, create_log: bool) -> None:
        """A container of this pod: at CreateContainer (`create_log`: its log file exists from then on, at the path
        the host chose), or from its record after a restart (the file is opened when output comes)."""
        writer = CriLogWriter(Path(log_path), self._log_size_max) if log_path else None
        if writer is not None and create_log:
            writer.open()
        self.containers[container_id] = KnownContainer(writer, since)

    def starting(self, container_id: str) -> None:
        """The container is about to start: none of its process's output or exit can be older than now."""
        if (known := self.containers.get(container_id)) is not None:
            known.since = time.time_ns()

    def forget_container(self, container_id: str) -> None:
        """The container is removed: its log closed, its attachers ended; its events are strangers from now."""
        known = self.containers.pop(container_id, None)
        self._warned.discard(("log", container_id))
        if known is not None:
            if known.log is not None:
                known.log.close()
            for attacher in known.attachers:
                attacher.finished()

    def exit_of(self, container_id: str) -> ExitStatus | None:
        known = self.containers.get(container_id)
        return None if known is None else known.exit

    async def wait_exit(self, container_id: str, timeout: float) -> bool:
        """Whether the container's exit was heard within `timeout` seconds."""
        known = self.containers.get(container_id)
        if known is None:
            return False
        try:
            await asyncio.wait_for(known.exited.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def reopen_log(self, container_id: str) -> None:
        known = self.containers.get(container_id)
        if known is not None and known.log is not None:
            known.log.reopen()

    def end_stream(self, stream_id: str) -> None:
        """An exec or port stream the host is done with: forgotten, what is still in flight for it ignored."""
        self.execs.pop(stream_id, None)
        self.ports.pop(stream_id, None)
        self._ended[stream_id] = None
        if len(self._ended) > ENDED_STREAMS:
            self._ended.popitem(last=False)

    def info(self) -> dict[str, Any]:
        return {"droppedEvents": self.dropped, "overrunStreams": self.overruns}

    # ---- routing -----------------------------------------------------------------------------

    def __call__(self, event: agent_pb2.Event) -> None:
        kind = event.WhichOneof("kind")
        if kind == "output":
            self._output(event.output)
        elif kind == "process_exited":
            self._exited(event.process_exited)
        elif kind == "port_data":
            self._port_data(event.port_data)
        elif kind == "port_closed":
            if (port := self.ports.get(event.port_closed.stream_id)) is None:
                self._drop("port_closed", event.port_closed.stream_id, event.port_closed.stream_id)
            else:
                self.end_stream(event.port_closed.stream_id)
                port.ended()
        else:
            self._drop("an unknown kind of", str(event.seq))

    def _drop(self, kind: str, ident: str, stream_id: str = "") -> None:
        """Count an event the host has no business with (not one for a stream that just ended); say so once."""
        if stream_id in self._ended:
            return
        self.dropped += 1
        if "dropped" not in self._warned:
            self._warned.add("dropped")
            log.warning("pod %s: the agent sent a %s event for %s, which this pod does not have: dropped (and every "
                        "other such event; their count is in the pod's verbose info)", self.pod_id[:12], kind,
                        guest_text(repr(ident), 200))  # fmt: skip

    def _overrun(self, what: str) -> None:
        self.overruns += 1
        if "overrun" not in self._warned:
            self._warned.add("overrun")
            log.warning("pod %s: the agent sent %s past its credit: the stream is closed (and every other stream "
                        "that does so)", self.pod_id[:12], what)  # fmt: skip

    def _exec(self, container_id: str, process_id: str) -> VmExec | None:
        process = self.execs.get(process_id)
        return process if process is not None and process.container_id == container_id else None

    def _output(self, out: agent_pb2.Output) -> None:
        if out.process_id:
            if (process := self._exec(out.container_id, out.process_id)) is None:
                self._drop("exec output", f"{out.container_id}/{out.process_id}", out.process_id)
            elif not process.output(out.stream, out.data):
                self.end_stream(out.process_id)
                self._overrun("exec output")
                process.overrun()
            return
        known = self.containers.get(out.container_id)
        if known is None:
            self._drop("output", out.container_id)
            return
        if known.log is not None:
            stream = STDERR if out.stream == agent_pb2.STDERR else STDOUT
            try:
                known.log.write(stream, out.data, _clamp(out.timestamp_unix_ns, known.since))
            except OSError as e:  # a full disk, say: said once per container, however much the guest sends
                if ("log", out.container_id) not in self._warned:
                    self._warned.add(("log", out.container_id))
                    log.warning("cannot write the log of %s (said once; its output is lost until it can): %s",
                                out.container_id[:12], e)  # fmt: skip
        for attacher in list(known.attachers):
            attacher.output(out.stream, out.data)

    def _exited(self, exited: agent_pb2.ProcessExited) -> None:
        if exited.process_id:
            if (process := self._exec(exited.container_id, exited.process_id)) is None:
                self._drop("exec exit", f"{exited.container_id}/{exited.process_id}", exited.process_id)
            else:
                self.end_stream(exited.process_id)
                process.finished(exited.exit_code if 0 <= exited.exit_code <= 255 else 255)
            return
        known = self.containers.get(exited.container_id)
        if known is None:
            self._drop("exit", exited.container_id)
            return
        if known.exit is not None:
            return  # told again (replayed after a reconnect): the first one stands
        code = exited.exit_code if 0 <= exited.exit_code <= 255 else 255
        finished = _clamp(exited.finished_unix_ns, known.since)
        status = ExitStatus(code, finished, reason="OOMKilled" if exited.oom_killed else "")
        self._on_exit(exited.container_id, status)  # persisted when it returns; then the event may be acked
        known.exit = status
        known.exited.set()
        for attacher in known.attachers:
            attacher.finished()
        known.attachers.clear()

    def _port_data(self, data: agent_pb2.PortData) -> None:
        port = self.ports.get(data.stream_id)
        if port is None:
            self._drop("port_data", data.stream_id, data.stream_id)
        elif not port.received(data.data, data.eof):
            self.end_stream(data.stream_id)
            self._overrun("port data")
            task = asyncio.create_task(port.close())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # ---- the VM and the connection -----------------------------------------------------------

    def vm_died(self) -> None:
        """The pod's VM is gone: every container still without an exit ended with it."""
        for container_id, known in list(self.containers.items()):
            if known.exit is None:
                self._on_exit(container_id, None)

    def close(self) -> None:
        """The agent connection is gone: logs closed, sessions ended."""
        for known in self.containers.values():
            if known.log is not None:
                known.log.close()
            for attacher in known.attachers:
                attacher.finished()
            known.attachers.clear()
        for process in self.execs.values():
            process.finished(255)
        self.execs.clear()
        for port in self.ports.values():
            port.ended()
        self.ports.clear()
