"""Build small, reproducible OCI / Docker schema2 images and push them to a registry over HTTP.

The root filesystem is the host's static busybox, so images run anywhere without
network access. Tars and gzip streams carry fixed timestamps: building the same
image twice gives the same digests.

CLI, for scripts:
    python -m tests.support.images push-busybox HOST REPO:TAG [--media docker] [--user U]
    python -m tests.support.images push-layered HOST REPO:TAG N [--media docker]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import httpx

Media = Literal["oci", "docker"]

BUSYBOX = Path("/bin/busybox")
APPLETS = (
    "sh", "ls", "cat", "echo", "sleep", "id", "uname", "true", "false", "env", "hostname",
    "wget", "nc", "top", "ps", "mkdir", "touch", "test",
)  # fmt: skip
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CREATED = "2024-01-01T00:00:00Z"
_MTIME = 1704067200  # CREATED as a Unix time

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
IN_TOTO = "application/vnd.in-toto+json"

_TYPES: dict[str, tuple[str, str, str]] = {
    "oci": (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER),
    "docker": (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER),
}

FileSpec = bytes | tuple[bytes, int]
"""File content, or (content, mode); the default mode is 0644."""


def sha256_digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data), **extra}


@dataclass(frozen=True)
class Layer:
    """A gzip layer and the digest of its uncompressed tar (the config's diff_id)."""

    blob: Blob
    diff_id: str


@dataclass(frozen=True)
class Image:
    manifest_type: str
    config: Blob
    layers: tuple[Blob, ...]
    platform: dict[str, str] = field(default_factory=lambda: {"os": "linux", "architecture": "amd64"})

    @cached_property
    def manifest(self) -> bytes:
        doc = {
            "schemaVersion": 2,
            "mediaType": self.manifest_type,
            "config": self.config.descriptor(),
            "layers": [layer.descriptor() for layer in self.layers],
        }
        return json.dumps(doc, indent=2).encode()

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def blobs(self) -> tuple[Blob, ...]:
        return (self.config, *self.layers)


class _TarBuilder:
    """Deterministic tar entries: root-owned, one fixed mtime, parents created on demand."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT)
        self._dirs: set[str] = set()

    def _info(self, path: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        path = path.strip("/")
        self._parents(path)
        info = tarfile.TarInfo(path)
        info.type, info.mode, info.mtime = kind, mode, _MTIME
        return info

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.dir("/".join(parts[:i]))

    def dir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        if path in self._dirs:
            return
        info = self._info(path, tarfile.DIRTYPE, mode)
        self._dirs.add(path)
        self._tar.addfile(info)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        info = self._info(path, tarfile.REGTYPE, mode)
        info.size = len(data)
        self._tar.addfile(info, io.BytesIO(data))

    def symlink(self, path: str, target: str) -> None:
        info = self._info(path, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self._tar.addfile(info)

    def layer(self, media_type: str) -> Layer:
        self._tar.close()
        raw = self._buf.getvalue()
        return Layer(Blob(media_type, gzip.compress(raw, mtime=0)), sha256_digest(raw))


def _image(
    media: Media,
    layers: Sequence[Layer],
    *,
    user: str = "",
    cmd: Sequence[str] = ("sh",),
    arch: str = "amd64",
    variant: str | None = None,
) -> Image:
    manifest_type, config_type, _ = _TYPES[media]
    platform = {"os": "linux", "architecture": arch} | ({"variant": variant} if variant else {})
    config = {
        "created": CREATED,
        **platform,
        "config": {"Env": [PATH_ENV], "Cmd": list(cmd), "User": user, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": CREATED, "created_by": "tests.support.images"} for _ in layers],
    }
    config_blob = Blob(config_type, json.dumps(config, indent=2, sort_keys=True).encode())
    return Image(manifest_type, config_blob, tuple(layer.blob for layer in layers), platform)


def busybox_layer(media: Media = "oci", extra_files: Mapping[str, FileSpec] | None = None) -> Layer:
    """/bin/busybox, its applet symlinks, a minimal /etc, plus `extra_files` (path -> content)."""
    tar = _TarBuilder()
    for d in ("bin", "dev", "etc", "proc", "sys"):
        tar.dir(d)
    tar.dir("tmp", 0o1777)
    tar.dir("root", 0o700)
    tar.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in APPLETS:
        tar.symlink(f"bin/{applet}", "busybox")
    tar.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    tar.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    for path, spec in (extra_files or {}).items():
        data, mode = spec if isinstance(spec, tuple) else (spec, 0o644)
        tar.file(path, data, mode)
    return tar.layer(_TYPES[media][2])


def busybox_image(
    extra_files: Mapping[str, FileSpec] | None = None,
    user: str = "",
    media: Media = "oci",
    cmd: Sequence[str] = ("sh",),
) -> Image:
    """A one-layer linux/amd64 busybox image; `User` in its config is `user`."""
    return _image(media, [busybox_layer(media, extra_files)], user=user, cmd=cmd)


def layered_image(n_layers: int, media: Media = "oci", user: str = "") -> Image:
    """Busybox plus `n_layers` (>= 2) small layers that exercise whiteouts.

    Expected merged tree on top of busybox:
      /data/keep.txt              (/data/gone.txt is whited out by layer 2)
      /opaque/new.txt             (layer 2 makes /opaque opaque, hiding old.txt)
      /layers/1 .. /layers/N      each holding "layer i\\n"
    """
    if n_layers < 2:
        raise ValueError("layered_image needs at least 2 layers to hold a whiteout and an opaque dir")
    layer_type = _TYPES[media][2]
    layers = [busybox_layer(media)]
    for i in range(1, n_layers + 1):
        tar = _TarBuilder()
        tar.file(f"layers/{i}", f"layer {i}\n".encode())
        if i == 1:
            tar.file("data/keep.txt", b"keep\n")
            tar.file("data/gone.txt", b"gone\n")
            tar.file("opaque/old.txt", b"old\n")
        elif i == 2:
            tar.file("data/.wh.gone.txt", b"")
            tar.file("opaque/.wh..wh..opq", b"")
            tar.file("opaque/new.txt", b"new\n")
        layers.append(tar.layer(layer_type))
    return _image(media, layers, user=user)


def dummy_image(arch: str = "arm64", variant: str | None = "v8", media: Media = "oci") -> Image:
    """An image for another platform whose only layer holds a text file: never meant to run."""
    tar = _TarBuilder()
    tar.file("README", f"placeholder {arch} image for tests\n".encode())
    return _image(media, [tar.layer(_TYPES[media][2])], arch=arch, variant=variant)


def attestation_image(subject: Image) -> Image:
    """A BuildKit-style attestation manifest for `subject`: an OCI manifest that is not an image."""
    statement = json.dumps({"_type": "https://in-toto.io/Statement/v0.1", "subject": subject.digest})
    layer = Blob(IN_TOTO, statement.encode())
    return Image(OCI_MANIFEST, Blob(OCI_CONFIG, b"{}"), (layer,), {"os": "unknown", "architecture": "unknown"})


# ---- pushing --------------------------------------------------------------------------------


def _client(host: str) -> httpx.Client:
    return httpx.Client(base_url=f"http://{host}", timeout=60.0)


def push_blob(client: httpx.Client, repo: str, blob: Blob) -> None:
    """Monolithic upload: POST for an upload URL, then PUT the whole blob with its digest."""
    if client.head(f"/v2/{repo}/blobs/{blob.digest}").status_code == 200:
        return
    started = client.post(f"/v2/{repo}/blobs/uploads/")
    started.raise_for_status()
    location = started.headers["location"]
    # httpx's params= would replace the upload URL's own query (its _state), so append by hand
    separator = "&" if "?" in location else "?"
    done = client.put(
        f"{location}{separator}digest={blob.digest}",
        content=blob.data,
        headers={"Content-Type": "application/octet-stream"},
    )
    done.raise_for_status()


def put_manifest(client: httpx.Client, repo: str, reference: str, media_type: str, body: bytes) -> str:
    resp = client.put(f"/v2/{repo}/manifests/{reference}", content=body, headers={"Content-Type": media_type})
    if resp.status_code != 201:
        raise RuntimeError(f"PUT manifest {repo}:{reference}: HTTP {resp.status_code}: {resp.text}")
    return sha256_digest(body)


def _push_image(client: httpx.Client, repo: str, reference: str, image: Image) -> str:
    for blob in image.blobs:
        push_blob(client, repo, blob)
    return put_manifest(client, repo, reference, image.manifest_type, image.manifest)


def push(host: str, repo: str, tag: str, image: Image) -> str:
    """Push `image` as HOST/REPO:TAG; returns the manifest digest."""
    with _client(host) as client:
        return _push_image(client, repo, tag, image)


def push_index(
    host: str, repo: str, tag: str, images: Mapping[str, Image] | None = None, attestation: bool = True
) -> str:
    """Push a multi-platform index as HOST/REPO:TAG; returns the index digest.

    `images` maps "os/arch[/variant]" to images; by default linux/amd64 is real
    busybox and linux/arm64/v8 a dummy. With `attestation`, each image also gets
    a BuildKit attestation entry (platform unknown/unknown) that pullers must skip.
    An index of Docker schema2 images is pushed as a Docker manifest list.
    """
    if images is None:
        images = {"linux/amd64": busybox_image(), "linux/arm64/v8": dummy_image()}
    docker = all(image.manifest_type == DOCKER_MANIFEST for image in images.values())
    entries: list[dict[str, Any]] = []
    with _client(host) as client:
        for key, image in images.items():
            os_, arch, *variant = key.split("/")
            platform = {"os": os_, "architecture": arch} | ({"variant": variant[0]} if variant else {})
            digest = _push_image(client, repo, sha256_digest(image.manifest), image)
            entries.append({**Blob(image.manifest_type, image.manifest).descriptor(), "platform": platform})
            if attestation and not docker:
                att = attestation_image(image)
                _push_image(client, repo, att.digest, att)
                annotations = {
                    "vnd.docker.reference.digest": digest,
                    "vnd.docker.reference.type": "attestation-manifest",
                }
                entries.append(
                    Blob(OCI_MANIFEST, att.manifest).descriptor(platform=att.platform, annotations=annotations)
                )
        media_type = DOCKER_LIST if docker else OCI_INDEX
        index = json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": entries}, indent=2).encode()
        return put_manifest(client, repo, tag, media_type, index)


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.images", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bb = sub.add_parser("push-busybox", help="push a one-layer busybox image")
    layered = sub.add_parser("push-layered", help="push busybox plus N small layers")
    for p in (bb, layered):
        p.add_argument("host", help="registry host:port (plain HTTP)")
        p.add_argument("repo_tag", metavar="REPO:TAG")
        p.add_argument("--media", choices=sorted(_TYPES), default="oci")
    bb.add_argument("--user", default="")
    layered.add_argument("n", type=int)
    args = parser.parse_args(argv)
    repo, _, tag = args.repo_tag.rpartition(":")
    if not repo:
        parser.error("REPO:TAG needs a tag")
    if args.command == "push-busybox":
        image = busybox_image(user=args.user, media=args.media)
    else:
        image = layered_image(args.n, media=args.media)
    print(push(args.host, repo, tag, image))


if __name__ == "__main__":
    _main()
