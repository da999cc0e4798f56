"""A private containerd for side-by-side benchmarks: its own root, state and socket in a temp dir.

It is modelled on /etc/containerd-bench/config.toml (CRI plugin, overlayfs,
cgroupfs, `restrict_oom_score_adj`, registry mirrors) but shares nothing with
that long-running instance, so a benchmark neither disturbs it nor inherits
its content store. Garbage collection runs after every deletion, so content
of a removed image leaves the disk promptly (and `content_files()` can prove it).
Pod network namespaces and runc's state live under the work dir too, like
Tandem's, so pods cost both runtimes the same filesystem and a crashed run
leaves nothing outside it (`reap()` cleans what is left there).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

import grpc

from protos import cri_pb2_grpc
from tests.support.daemon import wait_for_grpc

CONTAINERD = "containerd"

_CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
oom_score = 0
# snapshotters that cannot work here only add warnings to the log
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = "{debug_socket}"
  level = "info"

[metrics]
  address = ""

[plugins]
  # collect garbage after every single deletion, at once
  [plugins."io.containerd.gc.v1.scheduler"]
    deletion_threshold = 1
    schedule_delay = "0s"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{sandbox_image}"
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    enable_selinux = false
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          Root = "{runc_root}"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "{cni_dir}"
      max_conf_num = 1
    [plugins."io.containerd.grpc.v1.cri".registry]
      [plugins."io.containerd.grpc.v1.cri".registry.mirrors]
{mirrors}"""

_MIRROR = """\
        [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{host}"]
          endpoint = ["{endpoint}"]
"""


def installed() -> bool:
    return shutil.which(CONTAINERD) is not None


class ContainerdInstance:
    """`containerd --config <workdir>/config.toml` as a child process, everything under `workdir`."""

    def __init__(
        self, workdir: Path, mirrors: Mapping[str, str], sandbox_image: str = "registry.k8s.io/pause:3.9"
    ) -> None:
        """`mirrors` maps a registry host to one endpoint URL, e.g. "gcr.io" -> "http://127.0.0.1:5000".

        Pods join the first network in `cni_dir` (<workdir>/net.d) and are held by `sandbox_image`.
        """
        self.workdir = workdir
        self.root = workdir / "root"
        self.cni_dir = workdir / "net.d"
        self.runc_root = workdir / "runc"
        self.socket = workdir / "run" / "containerd.sock"
        self.config_path = workdir / "config.toml"
        self.log_path = workdir / "containerd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None
        (workdir / "run").mkdir(parents=True, exist_ok=True)
        (workdir / "net.d").mkdir(exist_ok=True)
        self.config_path.write_text(
            _CONFIG.format(
                root=self.root,
                state=workdir / "state",
                socket=self.socket,
                debug_socket=workdir / "run" / "debug.sock",
                cni_dir=self.cni_dir,
                sandbox_image=sandbox_image,
                runc_root=self.runc_root,
                mirrors="".join(_MIRROR.format(host=h, endpoint=e) for h, e in mirrors.items()),
            )
        )

    def start(self, timeout: float = 30.0) -> ContainerdInstance:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [CONTAINERD, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,  # a Ctrl-C meant for the benchmark reaches us, not containerd
            )
        self._channel = wait_for_grpc(self.process, self.socket, timeout, "containerd", self.log)
        return self

    @property
    def images(self) -> cri_pb2_grpc.ImageServiceStub:
        assert self._channel is not None, "containerd not started"
        return cri_pb2_grpc.ImageServiceStub(self._channel)

    @property
    def runtime(self) -> cri_pb2_grpc.RuntimeServiceStub:
        assert self._channel is not None, "containerd not started"
        return cri_pb2_grpc.RuntimeServiceStub(self._channel)

    def content_files(self) -> list[Path]:
        """Blobs in the content store and snapshots on disk: empty once every image is gone and GC ran."""
        dirs = (
            self.root / "io.containerd.content.v1.content" / "blobs" / "sha256",
            self.root / "io.containerd.content.v1.content" / "ingest",
            self.root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots",
        )
        return [entry for d in dirs if d.is_dir() for entry in d.iterdir()]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it lingers. Pods (their shims) outlive it: remove them first, or `reap()`."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def reap(self) -> list[str]:
        """After `stop()`: kill what pods left behind (shims, runc containers), unmount the work dir.

        Only needed when pods could not be removed through CRI; returns what it found, for the log.
        """
        found = []
        for root in self.runc_root.glob("*"):  # one runc root per containerd namespace (k8s.io)
            listed = subprocess.run(["runc", "--root", str(root), "list", "-q"], capture_output=True, text=True)
            for cid in listed.stdout.split():
                found.append(f"runc container {cid}")
                subprocess.run(["runc", "--root", str(root), "delete", "--force", cid], capture_output=True)
        for pid in _pids_with_arg(str(self.socket)):  # shims get `-address <socket>`
            found.append(f"shim {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        found += [f"mount {point}" for point in unmount_under(self.workdir)]
        return found


def _pids_with_arg(arg: str) -> list[int]:
    """Processes with `arg` as one of their command-line arguments."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if arg.encode() in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0"):
                    pids.append(int(entry))
    return pids


def unmount_under(directory: Path) -> list[str]:
    """Lazily unmount everything mounted below `directory`, deepest first; returns the mount points."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    below = sorted((p for p in points if p.startswith(f"{directory}/")), key=len, reverse=True)
    for point in below:
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
    return below
