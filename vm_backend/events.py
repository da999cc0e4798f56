"""Where a pod agent's events go: container output into CRI logs and attached clients, exec output to its
session, port data to its channel, and exits into the container's exit file and on to the pod manager.

One `PodEvents` per pod VM; it is the agent connection's event callback, so the
agent's at-least-once delivery (events replayed after a daemon restart) lands
in the same logs and exit files.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.files import atomic_write_json
from protos import agent_pb2
from sandbox.crilog import STDERR, STDOUT, CriLogWriter
from vm_backend.processes import VmAttach, VmExec, VmPort

log = logging.getLogger("tandem.vm")


class PodEvents:
    """Routes one pod's agent events; `on_exit(container_id)` hears of every container exit it records."""

    def __init__(self, run_dir: Path, on_exit: Callable[[str], None]) -> None:
        self.run_dir = run_dir
        self._on_exit = on_exit
        self.logs: dict[str, CriLogWriter] = {}
        self.attachers: dict[str, set[VmAttach]] = {}
        self.execs: dict[str, VmExec] = {}
        self.ports: dict[str, VmPort] = {}

    def container_dir(self, container_id: str) -> Path:
        return self.run_dir / "c" / container_id

    def container_ids(self) -> list[str]:
        """The containers created on this pod that the host still holds state for."""
        directory = self.run_dir / "c"
        return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []

    def read_exit(self, container_id: str) -> dict[str, Any] | None:
        """The exit recorded for a container (`code`, `finished`, `oom`), None while it runs."""
        try:
            exited = json.loads((self.container_dir(container_id) / "exit").read_text())
        except (OSError, ValueError):
            return None
        return exited if isinstance(exited, dict) else None

    # ---- logs --------------------------------------------------------------------------------

    def open_log(self, container_id: str, path: Path) -> None:
        """Create the container's CRI log file now: it exists from the container's creation on."""
        self.logs[container_id] = CriLogWriter(path)
        self.logs[container_id].open()

    def reopen_log(self, container_id: str) -> None:
        writer = self.logs.get(container_id)
        if writer is not None:
            writer.reopen()

    def close_log(self, container_id: str) -> None:
        writer = self.logs.pop(container_id, None)
        if writer is not None:
            writer.close()

    def _log(self, container_id: str) -> CriLogWriter | None:
        writer = self.logs.get(container_id)
        if writer is None:
            try:
                path = (self.container_dir(container_id) / "log_path").read_text()
            except OSError:
                return None
            if not path:
                return None
            writer = self.logs[container_id] = CriLogWriter(Path(path))
        return writer

    # ---- routing -----------------------------------------------------------------------------

    def __call__(self, event: agent_pb2.Event) -> None:
        kind = event.WhichOneof("kind")
        if kind == "output":
            self._output(event.output)
        elif kind == "process_exited":
            self._exited(event.process_exited)
        elif kind == "port_data":
            if (port := self.ports.get(event.port_data.stream_id)) is not None:
                port.received(event.port_data.data)
        elif kind == "port_closed":
            if (port := self.ports.pop(event.port_closed.stream_id, None)) is not None:
                port.ended()

    def _output(self, out: agent_pb2.Output) -> None:
        if out.process_id:
            if (process := self.execs.get(out.process_id)) is not None:
                process.output(out.stream, out.data)
            return
        writer = self._log(out.container_id)
        if writer is not None:
            stream = STDERR if out.stream == agent_pb2.STDERR else STDOUT
            try:
                writer.write(stream, out.data, out.timestamp_unix_ns or time.time_ns())
            except OSError as e:
                log.warning("cannot write the log of %s: %s", out.container_id[:12], e)
        for attacher in list(self.attachers.get(out.container_id, ())):
            attacher.output(out.stream, out.data)

    def _exited(self, exited: agent_pb2.ProcessExited) -> None:
        if exited.process_id:
            if (process := self.execs.pop(exited.process_id, None)) is not None:
                process.finished(exited.exit_code)
            return
        directory = self.container_dir(exited.container_id)
        if directory.is_dir():
            record = {"code": exited.exit_code, "finished": exited.finished_unix_ns, "oom": exited.oom_killed}
            atomic_write_json(directory / "exit", record)
            self._on_exit(exited.container_id)
        for attacher in self.attachers.pop(exited.container_id, set()):
            attacher.finished()

    def vm_died(self) -> None:
        """The pod's VM is gone: every container still without an exit ended with it."""
        for container_id in self.container_ids():
            if self.read_exit(container_id) is None:
                self._on_exit(container_id)

    def close(self) -> None:
        """The agent connection is gone: logs closed, sessions ended."""
        for writer in self.logs.values():
            writer.close()
        self.logs.clear()
        for process in self.execs.values():
            process.finished(255)
        for attachers in self.attachers.values():
            for attacher in attachers:
                attacher.finished()
        for port in self.ports.values():
            port.ended()
