"""`make demo`: Tandem on its embedded defaults, pulling through a registry mirror and running a trusted pod.

A local registry stands in for registry.k8s.io (this host has no internet):
the demo pushes a busybox image to it and writes a config that changes only
two things, a mirror for registry.k8s.io and a CNI conf dir holding a private
bridge network (no NAT, no route out). Then it starts `tandem serve`, pulls
over the CRI, runs a trusted pod and an untrusted one, shows the kernel each
runs on (the host's, and the VM's own), and removes it all.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from core.settings import Config
from protos import cri_pb2 as pb
from tests.support.daemon import TandemDaemon
from tests.support.images import busybox_image, push
from tests.support.network import delete_bridge, write_bridge_network
from tests.support.pods import container_config, pod_config
from tests.support.registry import LocalRegistry

IMAGE = "registry.k8s.io/demo/busybox:1.36"


def show_images(daemon: TandemDaemon) -> None:
    print(f"{'IMAGE':<48} {'IMAGE ID':<20} SIZE")
    for image in daemon.images.ListImages(pb.ListImagesRequest()).images:
        for tag in image.repo_tags or ["<none>"]:
            print(f"{tag:<48} {image.id[7:20]:<20} {image.size / 1024:.0f} KiB")


def run_pod(daemon: TandemDaemon, work: Path, name: str, handler: str) -> tuple[str, str]:
    """Run a pod with one busybox container under `handler`; return (pod IP, `uname -r` inside it)."""
    pod = pod_config(name, work / "logs")
    pod_id = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod, runtime_handler=handler)).pod_sandbox_id
    try:
        status = daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status
        config = container_config("app", IMAGE, "sleep", "3600")
        cid = daemon.runtime.CreateContainer(
            pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
        ).container_id
        daemon.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
        uname = daemon.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["uname", "-r"], timeout=30))
        return status.network.ip, uname.stdout.decode().strip()
    finally:
        daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


def run_both_kinds(daemon: TandemDaemon, work: Path) -> None:
    trusted_ip, trusted_kernel = run_pod(daemon, work, "demo-trusted", "")
    print(f"trusted pod   (default handler -> runc): IP {trusted_ip:<12} uname -r: {trusted_kernel}")
    started = time.monotonic()
    untrusted_ip, guest_kernel = run_pod(daemon, work, "demo-untrusted", "vm")
    print(f"untrusted pod (handler vm -> micro-VM):  IP {untrusted_ip:<12} uname -r: {guest_kernel}")
    print(f"  (the VM pod booted, ran and was removed in {time.monotonic() - started:.1f} s; both pods are gone)")
    if trusted_kernel == guest_kernel:
        raise SystemExit("the untrusted pod ran on the host's kernel: that must never happen")


def main() -> int:
    defaults = Config()
    with tempfile.TemporaryDirectory(prefix="tandem-demo-") as tmp, LocalRegistry() as registry:
        work = Path(tmp)
        push(registry.host, "demo/busybox", "1.36", busybox_image())
        bridge = write_bridge_network(work / "net.d").bridge
        config = work / "tandem.toml"
        config.write_text(
            f'[registry.mirrors]\n"registry.k8s.io" = ["{registry.host}"]\n[cni]\nconf_dir = "{work / "net.d"}"\n'
        )
        print(f"registry.k8s.io is mirrored by the local registry at {registry.host}")
        daemon = TandemDaemon(config, defaults.socket, defaults.state_dir, work / "tandem.log").start()
        try:
            version = daemon.runtime.Version(pb.VersionRequest())
            print(f"tandem {version.runtime_version} serving CRI {version.runtime_api_version} on {defaults.socket}")
            ref = daemon.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=IMAGE))).image_ref
            print(f"pulled {IMAGE} -> {ref}")
            show_images(daemon)
            run_both_kinds(daemon, work)
        except Exception:
            print(daemon.log(), file=sys.stderr)
            raise
        finally:
            daemon.stop()
            delete_bridge(bridge)
        print("tandem stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
