"""systemd's readiness protocol (sd_notify): `Type=notify` in tandem.service waits for READY=1.

The socket's address is taken out of the environment when the daemon starts: runc
treats a NOTIFY_SOCKET it inherits (through conmon) as the container's own and would
hand systemd's socket to the container and wait for the container's readiness.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("tandem.daemon")


class Notifier:
    """Tells the service manager that started the daemon how it is doing; nothing when none did."""

    def __init__(self, address: str | None) -> None:
        self._address = address

    @classmethod
    def from_environment(cls) -> Notifier:
        """The manager's socket, from NOTIFY_SOCKET, which is removed so that no child inherits it."""
        return cls(os.environ.pop("NOTIFY_SOCKET", None) or None)

    def notify(self, state: str) -> None:
        """Send `state` ("READY=1", "STOPPING=1"); a manager that went away is logged, not fatal."""
        if self._address is None:
            return
        address = "\0" + self._address[1:] if self._address.startswith("@") else self._address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(address)
                sock.sendall(state.encode())
        except OSError as e:
            log.warning("cannot notify the service manager", extra={"socket": self._address, "error": str(e)})
