"""Which backends this host can run, built once at start-up: the map from backend name to implementation."""

from __future__ import annotations

import logging

from core.errors import TandemError
from core.settings import Config
from runc_backend.backend import RuncBackend
from sandbox.backend import Backend
from vm_backend.backend import VmBackend

log = logging.getLogger("tandem.backends")


def available_backends(config: Config) -> dict[str, Backend]:
    """Every backend that can start on this host; one that can't is logged and left out.

    A pod routed to a missing backend is refused with FAILED_PRECONDITION by the
    manager: it never falls back to another kind of isolation.
    """
    backends: dict[str, Backend] = {}
    for factory in (RuncBackend.create, VmBackend.create):
        try:
            backend = factory(config)
        except TandemError as e:
            log.warning("backend unavailable", extra={"error": str(e)})
            continue
        backends[backend.name] = backend
    log.info("backends", extra={"available": ",".join(sorted(backends)) or "none"})
    return backends
