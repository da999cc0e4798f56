"""What the OCI runtime (crun in the guest, runc in the agent's tests) says when it fails, as agent errors."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from protos import agent_pb2

_NOT_RUNNING = ("not running", "stopped container", "process already finished", "no such process")
_MSG = re.compile(r'msg="((?:[^"\\]|\\.)*)"')


def runtime_message(stderr: bytes) -> str:
    """The runtime's error out of its stderr: runc's logrus `msg="..."` if it used that format, else the last line."""
    lines = stderr.decode(errors="replace").strip().splitlines()
    for line in reversed(lines):
        if m := _MSG.search(line):
            return m[1].replace('\\"', '"')
    return lines[-1] if lines else ""


def logged_error(log_path: Path) -> str:
    """The last error in the runtime's JSON log: crun writes its errors there instead of to stderr."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("level") == "error":
                return str(entry.get("msg", ""))
    return ""


def code_for(message: str) -> agent_pb2.ErrorCode:
    """Only "it is not running" matters to callers; which containers exist the agent knows itself."""
    lowered = message.lower()
    if any(s in lowered for s in _NOT_RUNNING):
        return agent_pb2.FAILED_PRECONDITION
    return agent_pb2.INTERNAL
