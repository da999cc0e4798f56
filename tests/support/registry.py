"""A throwaway CNCF distribution registry on loopback, for tests, the demo and benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

import httpx

from tests.support.wait import wait_for

REGISTRY_BIN = Path("/usr/bin/docker-registry")

_CONFIG = """\
version: 0.1
log:
  level: info
  formatter: text
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
"""


def free_port() -> int:
    """A port nobody listens on right now (racy, but good enough on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRegistry:
    """`docker-registry serve` on 127.0.0.1:<free port>, with its storage and log in a temp dir."""

    def __init__(self, startup_timeout: float = 15.0) -> None:
        if not REGISTRY_BIN.exists():
            raise FileNotFoundError(f"{REGISTRY_BIN} is not installed (apt-get install docker-registry)")
        self._tmp = tempfile.TemporaryDirectory(prefix="tandem-registry-")
        self.dir = Path(self._tmp.name)
        self.log_path = self.dir / "registry.log"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        config = self.dir / "config.yml"
        config.write_text(_CONFIG.format(root=self.dir / "data", port=self.port))
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [str(REGISTRY_BIN), "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")},
            )
        try:
            self._wait_ready(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        def answering() -> bool:
            if self._proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited early:\n{self.log()[-2000:]}")
            try:
                return httpx.get(f"{self.url}/v2/", timeout=1.0).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(answering, timeout, f"docker-registry on {self.host}")

    def log(self) -> str:
        """Everything the registry logged so far, its access log included."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._tmp.cleanup()

    def __enter__(self) -> LocalRegistry:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
