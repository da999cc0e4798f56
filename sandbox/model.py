"""The pod model: what Tandem remembers about each sandbox and container.

The CRI configs are kept as the protobuf messages kubelet sent (they are the
specification of the pod); everything Tandem learned or decided while running
it sits beside them. Records are persisted through `core.records`, so a daemon
restart sees exactly what the last one knew.

Each record also has a `memo`: what a layer above derived from it (a list answer's
encoded entry) and keeps for as long as the record lives. It is never persisted, and
whoever keeps something there keys it by what it was derived from.
"""

from __future__ import annotations

import base64
import dataclasses
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Self

from protos import cri_pb2 as pb


class SandboxState(StrEnum):
    READY = "ready"
    NOTREADY = "notready"


class ContainerState(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    UNKNOWN = "unknown"


def _encode(message: Any) -> str:
    return base64.b64encode(message.SerializeToString()).decode()


def _decode(cls: type, text: str) -> Any:
    message = cls()
    message.ParseFromString(base64.b64decode(text))
    return message


def now_ns() -> int:
    return time.time_ns()


@dataclass
class SandboxRecord:
    KIND: ClassVar[str] = "sandbox"
    SCHEMA: ClassVar[int] = 1

    id: str
    config: pb.PodSandboxConfig
    runtime_handler: str
    backend: str
    trust_reason: str
    state: SandboxState = SandboxState.NOTREADY
    created_at: int = field(default_factory=now_ns)
    netns_path: str = ""
    ips: list[str] = field(default_factory=list)
    cni_result: dict[str, Any] | None = None
    backend_state: dict[str, Any] = field(default_factory=dict)
    memo: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.config.metadata.name

    @property
    def host_network(self) -> bool:
        return self.config.linux.security_context.namespace_options.network == pb.NODE

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "config": _encode(self.config),
            "runtime_handler": self.runtime_handler,
            "backend": self.backend,
            "trust_reason": self.trust_reason,
            "state": self.state.value,
            "created_at": self.created_at,
            "netns_path": self.netns_path,
            "ips": self.ips,
            "cni_result": self.cni_result,
            "backend_state": self.backend_state,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], schema: int) -> Self:
        return cls(
            **{
                **data,
                "config": _decode(pb.PodSandboxConfig, data["config"]),
                "state": SandboxState(data["state"]),
            }
        )


@dataclass(frozen=True)
class ExitStatus:
    """A container process that has ended."""

    exit_code: int
    finished_at: int
    reason: str = ""  # "Completed", "Error", "OOMKilled"
    message: str = ""


@dataclass(frozen=True)
class ProcessUser:
    """The identity a container's process runs as, once the backend resolved it against the image."""

    uid: int
    gid: int
    groups: list[int]


@dataclass
class ContainerRecord:
    KIND: ClassVar[str] = "container"
    SCHEMA: ClassVar[int] = 1

    id: str
    sandbox_id: str
    config: pb.ContainerConfig
    image_id: str
    image_ref: str
    log_path: str
    state: ContainerState = ContainerState.CREATED
    created_at: int = field(default_factory=now_ns)
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    user: ProcessUser | None = None
    backend_state: dict[str, Any] = field(default_factory=dict)
    exit_report: ExitStatus | None = None  # an exit a backend reported before the container was marked running
    memo: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.config.metadata.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sandbox_id": self.sandbox_id,
            "config": _encode(self.config),
            "image_id": self.image_id,
            "image_ref": self.image_ref,
            "log_path": self.log_path,
            "state": self.state.value,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "message": self.message,
            "user": None if self.user is None else [self.user.uid, self.user.gid, self.user.groups],
            "backend_state": self.backend_state,
            "exit_report": None if self.exit_report is None else dataclasses.asdict(self.exit_report),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], schema: int) -> Self:
        user = data.get("user")
        report = data.get("exit_report")
        return cls(
            **{
                **data,
                "config": _decode(pb.ContainerConfig, data["config"]),
                "state": ContainerState(data["state"]),
                "user": None if user is None else ProcessUser(user[0], user[1], list(user[2])),
                "exit_report": None if report is None else ExitStatus(**report),
            }
        )
