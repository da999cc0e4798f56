"""A real `tandem serve` process on a temporary socket, and gRPC stubs to talk to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc

from protos import cri_pb2_grpc
from tests.support.network import PrivateNetwork, private_network
from tests.support.wait import wait_for


def wait_for_grpc(
    process: subprocess.Popen[bytes], socket: Path, timeout: float, name: str, log: Callable[[], str]
) -> grpc.Channel:
    """A channel to a gRPC server `process` is starting on `socket`, once it answers; its log if it dies."""

    def answering() -> grpc.Channel | None:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log()[-3000:]}")
        if not socket.exists():
            return None
        channel = grpc.insecure_channel(f"unix://{socket}")
        try:
            grpc.channel_ready_future(channel).result(timeout=1)
        except grpc.FutureTimeoutError:
            channel.close()
            return None
        return channel

    try:
        return wait_for(answering, timeout, f"{name} to listen on {socket}")
    except AssertionError as e:
        raise RuntimeError(f"{e}:\n{log()[-3000:]}") from None


class TandemDaemon:
    """A `python -m cri.cli serve` child process with the given config, socket and state dir."""

    def __init__(self, config_path: Path, socket: Path, state_dir: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.socket = socket
        self.state_dir = state_dir
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.default_network: PrivateNetwork | None = None  # set by isolated(): its bridge is the test's to delete
        self._channel: grpc.Channel | None = None

    @classmethod
    def isolated(cls, workdir: Path, config_toml: str = "") -> TandemDaemon:
        """Everything under `workdir`: socket, state, runtime dir, an empty CNI conf dir, the log.

        Unless `config_toml` sets `[cni.default]`, the default network is a private one (its own bridge name,
        a free /24, masquerade off), so a pod that lands on it touches nothing of the host's.
        """
        default = None
        if "[cni.default]" not in config_toml:
            default = private_network()
            config_toml += "\n" + default.toml()
        config_path = workdir / "tandem.toml"
        config_path.write_text(
            f'runtime_dir = "{workdir / "run"}"\n{config_toml}\n[cni]\nconf_dir = "{workdir / "net.d"}"\n'
        )
        daemon = cls(config_path, workdir / "run" / "tandem.sock", workdir / "state", workdir / "tandem.log")
        daemon.default_network = default
        return daemon

    def start(self, timeout: float = 30.0, log_level: str = "debug") -> TandemDaemon:
        """Start it; benchmarks log at "info", as a node would (debug logs a line per call)."""
        if self.socket.exists():
            probe = grpc.insecure_channel(f"unix://{self.socket}")
            try:
                grpc.channel_ready_future(probe).result(timeout=1)
            except grpc.FutureTimeoutError:
                pass
            else:
                raise RuntimeError(f"another daemon is already serving {self.socket}; stop it first")
            finally:
                probe.close()
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cri.cli",
                "serve",
                "--config",
                str(self.config_path),
                "--socket",
                str(self.socket),
                "--state-dir",
                str(self.state_dir),
                "--log-level",
                log_level,
            ],
            stdout=log,
            stderr=log,
        )
        log.close()
        self._channel = wait_for_grpc(self.process, self.socket, timeout, "tandem", self.log)
        return self

    @property
    def runtime(self) -> cri_pb2_grpc.RuntimeServiceStub:
        assert self._channel is not None, "daemon not started"
        return cri_pb2_grpc.RuntimeServiceStub(self._channel)

    @property
    def images(self) -> cri_pb2_grpc.ImageServiceStub:
        assert self._channel is not None, "daemon not started"
        return cri_pb2_grpc.ImageServiceStub(self._channel)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, as an init system would; returns the exit status."""
        self._close_channel()
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self.process = None
        return code

    def unmount_workdir(self, workdir: Path) -> None:
        """Detach every mount left under `workdir` (the netns root's bind, say) so pytest can delete it."""
        points = [line.split()[4] for line in open("/proc/self/mountinfo")]
        for point in sorted((p for p in points if p.startswith(f"{workdir}/")), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)

    def kill(self) -> None:
        """SIGKILL: the crash that recovery must survive."""
        self._close_channel()
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None
