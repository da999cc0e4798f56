"""Which signal stops a container: the CRI config's, else the image's StopSignal, else SIGTERM.

One rule for every backend, so a container stops the same way in a VM as under runc.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from typing import Any

from protos import cri_pb2 as pb

log = logging.getLogger("tandem.signals")


def signal_number(name: str) -> int:
    """`SIGTERM`, `TERM`, `15` or `SIGRTMIN+3` → its number; unknown names fall back to SIGTERM."""
    name = name.strip().upper()
    if name.isdigit():
        return int(name)
    if not name.startswith("SIG"):
        name = "SIG" + name
    if name.startswith("SIGRTMIN+") and name[9:].isdigit():
        return signal.SIGRTMIN + int(name[9:])
    with contextlib.suppress(KeyError):
        return signal.Signals[name].value
    log.warning("unknown stop signal, using SIGTERM", extra={"signal": name})
    return signal.SIGTERM


def stop_signal(config: pb.ContainerConfig, image_config: dict[str, Any]) -> int:
    if config.stop_signal:
        return signal_number(pb.Signal.Name(config.stop_signal))
    return signal_number((image_config.get("config") or {}).get("StopSignal") or "SIGTERM")
