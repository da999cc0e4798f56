"""`make demo`: Tandem on its embedded defaults, pulling through a registry mirror and running a trusted pod.

A local registry stands in for registry.k8s.io (this host has no internet):
the demo pushes a busybox image to it and writes a config that changes only
two things, a mirror for registry.k8s.io and a CNI conf dir holding a private
bridge network (no NAT, no route out). Then it starts `tandem serve`, pulls
over the CRI, runs a trusted pod, shows what runs inside, and removes it all.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from cri.config import Config
from protos import cri_pb2 as pb
from tests.support.daemon import TandemDaemon
from tests.support.images import busybox_image, push
from tests.support.pods import container_config, delete_bridge, pod_config, write_bridge_network
from tests.support.registry import LocalRegistry

IMAGE = "registry.k8s.io/demo/busybox:1.36"


def show_images(daemon: TandemDaemon) -> None:
    print(f"{'IMAGE':<48} {'IMAGE ID':<20} SIZE")
    for image in daemon.images.ListImages(pb.ListImagesRequest()).images:
        for tag in image.repo_tags or ["<none>"]:
            print(f"{tag:<48} {image.id[7:20]:<20} {image.size / 1024:.0f} KiB")


def run_trusted_pod(daemon: TandemDaemon, work: Path) -> None:
    pod = pod_config("demo-trusted", work / "logs")
    pod_id = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    try:
        status = daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status
        config = container_config("app", IMAGE, "sleep", "3600")
        cid = daemon.runtime.CreateContainer(
            pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
        ).container_id
        daemon.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
        uname = daemon.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["uname", "-r"], timeout=10))
        handler = status.runtime_handler or "<default: trusted>"
        print(f"trusted pod {pod_id[:12]} (handler {handler}, runc) has IP {status.network.ip}")
        print(f"  uname -r inside the trusted pod: {uname.stdout.decode().strip()}  (the host's own kernel)")
    finally:
        daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
        print("  pod stopped and removed")


def main() -> int:
    defaults = Config()
    with tempfile.TemporaryDirectory(prefix="tandem-demo-") as tmp, LocalRegistry() as registry:
        work = Path(tmp)
        push(registry.host, "demo/busybox", "1.36", busybox_image())
        bridge = write_bridge_network(work / "net.d", 211)
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
            run_trusted_pod(daemon, work)
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
