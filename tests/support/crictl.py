"""crictl pointed at a test daemon, plain or on a pseudo-terminal (for its -t modes, which insist on one)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

from tests.support.daemon import TandemDaemon


class Crictl:
    """crictl with a config file naming the daemon's socket for both endpoints."""

    def __init__(self, daemon: TandemDaemon, workdir: Path) -> None:
        binary = shutil.which("crictl")
        if binary is None:
            raise FileNotFoundError("crictl is not on PATH (tests that use it are marked crictl and skipped)")
        self.binary = binary
        self.config = workdir / "crictl.yaml"
        endpoint = f"unix://{daemon.socket}"
        self.config.write_text(f"runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\ntimeout: 30\n")

    def argv(self, *args: str) -> list[str]:
        return [self.binary, "--config", str(self.config), *args]

    def run(self, *args: str, input: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.argv(*args), input=input, capture_output=True, timeout=timeout, check=False)

    def on_pty(self, *args: str, width: int = 100, height: int = 40) -> PtySession:
        return PtySession(self.argv(*args), width, height)

    def background(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen(self.argv(*args), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


class PtySession:
    """A process whose stdio is a pty we hold the other side of, sized `width` x `height`."""

    def __init__(self, argv: list[str], width: int, height: int) -> None:
        self.master, slave = pty.openpty()
        self._set_size(width, height)
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.output = b""

    def _set_size(self, width: int, height: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def resize(self, width: int, height: int) -> None:
        """Resize the terminal and tell the process, as a terminal emulator would (SIGWINCH)."""
        self._set_size(width, height)
        self.process.send_signal(signal.SIGWINCH)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def read_until(self, token: bytes, timeout: float = 20.0) -> bytes:
        deadline = time.monotonic() + timeout
        while token not in self.output:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {token!r}; the terminal shows {self.output!r}")
            if select.select([self.master], [], [], min(left, 0.2))[0]:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: the process and everything it started closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"terminal closed before {token!r}; it showed {self.output!r}")
                self.output += chunk
        return self.output

    def wait(self, timeout: float = 20.0) -> int:
        code = self.process.wait(timeout)
        while select.select([self.master], [], [], 0.1)[0]:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                break
            if not chunk:
                break
            self.output += chunk
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)
