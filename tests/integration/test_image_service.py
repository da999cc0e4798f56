"""ImageService end to end: a real `tandem serve`, a real docker-registry, gRPC in between."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import grpc
import pytest

from protos import cri_pb2 as pb
from tests.support.daemon import TandemDaemon
from tests.support.images import busybox_image, layered_image, push, push_index
from tests.support.registry import LocalRegistry

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def images_registry(registry: LocalRegistry) -> LocalRegistry:
    """The session's registry with this module's images (repositories of their own) pushed once."""
    push(registry.host, "test/svc-busybox", "1.0", busybox_image(user="1000:1000"))
    push(registry.host, "test/svc-named", "1.0", busybox_image(user="nobody", media="docker"))
    push(registry.host, "test/svc-layered", "1.0", layered_image(5))
    push_index(registry.host, "test/svc-multi", "1.0")
    return registry


@pytest.fixture
def daemon(tmp_path, images_registry):
    config = f'[registry.mirrors]\n"registry.k8s.io" = ["127.0.0.1:1", "{images_registry.host}"]\n'
    d = TandemDaemon.isolated(tmp_path, config).start()
    yield d
    d.stop()


def pull(daemon: TandemDaemon, image: str, **auth: str) -> str:
    request = pb.PullImageRequest(image=pb.ImageSpec(image=image), auth=pb.AuthConfig(**auth))
    return daemon.images.PullImage(request).image_ref


def status(daemon: TandemDaemon, image: str, verbose: bool = False) -> pb.ImageStatusResponse:
    return daemon.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=image), verbose=verbose))


def layer_dirs(daemon: TandemDaemon) -> list[Path]:
    return [p for p in (daemon.state_dir / "images" / "layers" / "sha256").iterdir()]


def test_pull_list_status_remove(daemon, images_registry):
    name = f"{images_registry.host}/test/svc-busybox"
    image_id = pull(daemon, f"{name}:1.0")
    assert image_id.startswith("sha256:") and len(image_id) == 71

    (image,) = daemon.images.ListImages(pb.ListImagesRequest()).images
    assert image.id == image_id
    assert list(image.repo_tags) == [f"{name}:1.0"]
    (repo_digest,) = image.repo_digests
    assert repo_digest.startswith(f"{name}@sha256:")
    assert image.uid.value == 1000 and image.username == ""
    assert image.size > 500_000  # busybox itself

    for ref in (f"{name}:1.0", image_id, image_id[7:19], repo_digest):
        assert status(daemon, ref).image.id == image_id, ref
    verbose = status(daemon, image_id, verbose=True)
    assert json.loads(verbose.info["info"])["imageSpec"]["config"]["User"] == "1000:1000"

    daemon.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=repo_digest)))
    assert not status(daemon, image_id).HasField("image")
    assert daemon.images.ListImages(pb.ListImagesRequest()).images == []
    assert layer_dirs(daemon) == []
    daemon.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image_id)))  # idempotent


def test_pull_through_a_mirror_keeps_the_original_name(daemon):
    image_id = pull(daemon, "registry.k8s.io/test/svc-named:1.0")
    image = status(daemon, "registry.k8s.io/test/svc-named:1.0").image
    assert image.id == image_id
    assert list(image.repo_tags) == ["registry.k8s.io/test/svc-named:1.0"]
    assert image.repo_digests[0].startswith("registry.k8s.io/test/svc-named@sha256:")
    assert image.username == "nobody" and not image.HasField("uid")


def test_index_resolves_to_linux_amd64(daemon, images_registry):
    image_id = pull(daemon, f"{images_registry.host}/test/svc-multi:1.0")
    config = json.loads(status(daemon, image_id, verbose=True).info["info"])["imageSpec"]
    assert (config["os"], config["architecture"]) == ("linux", "amd64")


def test_layers_are_unpacked_once_and_shared(daemon, images_registry):
    pull(daemon, f"{images_registry.host}/test/svc-busybox:1.0")
    assert len(layer_dirs(daemon)) == 1
    layered = pull(daemon, f"{images_registry.host}/test/svc-layered:1.0")
    assert len(layer_dirs(daemon)) == 6  # the busybox layer is shared, not unpacked again
    root = daemon.state_dir / "images" / "layers" / "sha256"
    whiteouts = list(root.glob("*/data/gone.txt"))
    assert any(p.stat().st_rdev == 0 and not p.is_file() for p in whiteouts)

    daemon.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=layered)))
    assert len(layer_dirs(daemon)) == 1  # busybox's layer stays: the other image still uses it


def test_list_filter_and_a_moved_tag(daemon, images_registry):
    host = images_registry.host
    first = pull(daemon, f"{host}/test/svc-busybox:1.0")
    second = pull(daemon, f"{host}/test/svc-layered:1.0")
    flt = pb.ImageFilter(image=pb.ImageSpec(image=f"{host}/test/svc-layered:1.0"))
    assert [i.id for i in daemon.images.ListImages(pb.ListImagesRequest(filter=flt)).images] == [second]

    push(host, "test/svc-busybox", "moving", busybox_image(user="1000:1000"))
    pull(daemon, f"{host}/test/svc-busybox:moving")
    push(host, "test/svc-busybox", "moving", layered_image(5))
    pull(daemon, f"{host}/test/svc-busybox:moving")
    assert f"{host}/test/svc-busybox:moving" not in status(daemon, first).image.repo_tags
    assert f"{host}/test/svc-busybox:moving" in status(daemon, second).image.repo_tags


def test_errors_have_the_right_codes(daemon, images_registry):
    with pytest.raises(grpc.RpcError) as err:
        pull(daemon, f"{images_registry.host}/test/svc-busybox:no-such-tag")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        pull(daemon, "Not A Reference")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        pull(daemon, "")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not status(daemon, "docker.io/library/absent:latest").HasField("image")


def test_ten_concurrent_pulls_fetch_once(daemon, images_registry):
    ref = f"{images_registry.host}/test/svc-layered:1.0"
    seen_before = len(images_registry.log().splitlines())
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(pull(daemon, ref))) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 10
    new_lines = images_registry.log().splitlines()[seen_before:]
    blob_gets = [line for line in new_lines if '"GET /v2/test/svc-layered/blobs/' in line]
    assert len(blob_gets) == 7  # config + 6 layers, each fetched exactly once


def test_images_survive_restart_and_kill(tmp_path, images_registry):
    daemon = TandemDaemon.isolated(tmp_path).start()
    image_id = pull(daemon, f"{images_registry.host}/test/svc-busybox:1.0")
    assert daemon.stop() == 0
    daemon.start()
    assert status(daemon, f"{images_registry.host}/test/svc-busybox:1.0").image.id == image_id
    daemon.kill()
    daemon.start()
    assert [i.id for i in daemon.images.ListImages(pb.ListImagesRequest()).images] == [image_id]
    fs = daemon.images.ImageFsInfo(pb.ImageFsInfoRequest()).image_filesystems[0]
    assert fs.used_bytes.value > 500_000 and fs.inodes_used.value > 10
    assert fs.fs_id.mountpoint == str(daemon.state_dir / "images")
    daemon.stop()
