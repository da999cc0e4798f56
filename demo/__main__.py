"""`make demo`: Tandem on its embedded defaults, pulling through a registry mirror.

A local registry stands in for registry.k8s.io (this host has no internet):
the demo pushes a busybox image to it, maps registry.k8s.io to it in a config
that changes nothing else, starts `tandem serve`, pulls and lists over the CRI,
and stops everything again.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from cri.config import Config
from protos import cri_pb2 as pb
from tests.support.daemon import TandemDaemon
from tests.support.images import busybox_image, push
from tests.support.registry import LocalRegistry

IMAGE = "registry.k8s.io/demo/busybox:1.36"


def main() -> int:
    defaults = Config()
    with tempfile.TemporaryDirectory(prefix="tandem-demo-") as tmp, LocalRegistry() as registry:
        work = Path(tmp)
        push(registry.host, "demo/busybox", "1.36", busybox_image())
        config = work / "tandem.toml"
        config.write_text(f'[registry.mirrors]\n"registry.k8s.io" = ["{registry.host}"]\n')
        print(f"registry.k8s.io is mirrored by the local registry at {registry.host}")
        daemon = TandemDaemon(config, defaults.socket, defaults.state_dir, work / "tandem.log").start()
        try:
            version = daemon.runtime.Version(pb.VersionRequest())
            print(
                f"tandem {version.runtime_version} serving CRI {version.runtime_api_version} on {defaults.socket}"
            )
            ref = daemon.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=IMAGE))).image_ref
            print(f"pulled {IMAGE} -> {ref}")
            print(f"{'IMAGE':<48} {'IMAGE ID':<20} SIZE")
            for image in daemon.images.ListImages(pb.ListImagesRequest()).images:
                for tag in image.repo_tags or ["<none>"]:
                    print(f"{tag:<48} {image.id[7:20]:<20} {image.size / 1024:.0f} KiB")
        except Exception:
            print(daemon.log(), file=sys.stderr)
            raise
        finally:
            daemon.stop()
        print("tandem stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
