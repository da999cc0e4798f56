"""Parsing and checking of image manifests and configs: registry JSON is untrusted input."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from core.errors import InvalidArgument, ResourceExhausted

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})

CONFIG_TYPES = frozenset({"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"})
LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    }
)
MAX_CONFIG_BYTES = 8 * 2**20


@dataclass(frozen=True)
class BlobRef:
    """A descriptor as a manifest names it: what to fetch, how big it must be."""

    media_type: str
    digest: str
    size: int


@dataclass(frozen=True)
class ImageManifest:
    config: BlobRef
    layers: list[BlobRef]


@dataclass(frozen=True)
class ImageConfig:
    diff_ids: list[str]
    user: str
    os: str
    architecture: str
    raw: dict[str, Any]


def _load(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"{what} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} is not a JSON object")
    return value


def _blob_ref(value: Any, what: str) -> BlobRef:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} is not a descriptor")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str) or not digest.startswith("sha256:"):
        raise InvalidArgument(f"{what} has no usable mediaType/sha256 digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArgument(f"{what} has an invalid size {size!r}")
    return BlobRef(media_type, digest, size)


def parse_manifest(data: bytes, max_layers: int) -> ImageManifest:
    """Check a single-platform manifest and return what must be fetched for it."""
    doc = _load(data, "manifest")
    if doc.get("schemaVersion") != 2:
        raise InvalidArgument(f"manifest schemaVersion {doc.get('schemaVersion')!r} is not supported")
    config = _blob_ref(doc.get("config"), "manifest config")
    if config.media_type not in CONFIG_TYPES:
        raise InvalidArgument(f"manifest config has unsupported media type {config.media_type}")
    if config.size > MAX_CONFIG_BYTES:
        raise ResourceExhausted(f"image config is {config.size} bytes, over the {MAX_CONFIG_BYTES} limit")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise InvalidArgument("manifest has no layers list")
    if len(raw_layers) > max_layers:
        raise ResourceExhausted(f"image has {len(raw_layers)} layers, over the limit of {max_layers}")
    layers = [_blob_ref(layer, f"layer {i}") for i, layer in enumerate(raw_layers)]
    for i, layer in enumerate(layers):
        if layer.media_type not in LAYER_TYPES:
            raise InvalidArgument(f"layer {i} has unsupported media type {layer.media_type}")
    return ImageManifest(config, layers)


def parse_config(data: bytes, layer_count: int) -> ImageConfig:
    """Check an image config against its manifest: one diff_id per layer, in order."""
    doc = _load(data, "image config")
    rootfs = doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(
        isinstance(d, str) and d.startswith("sha256:") and len(d) == 71 for d in diff_ids
    ):
        raise InvalidArgument("image config has no valid rootfs.diff_ids")
    if len(diff_ids) != layer_count:
        raise InvalidArgument(f"image config lists {len(diff_ids)} diff_ids for {layer_count} layers")
    runtime = doc.get("config") if isinstance(doc.get("config"), dict) else {}
    user = runtime.get("User") or ""
    return ImageConfig(
        diff_ids=list(diff_ids),
        user=user if isinstance(user, str) else "",
        os=str(doc.get("os", "")),
        architecture=str(doc.get("architecture", "")),
        raw=doc,
    )


def user_of(user: str) -> tuple[int | None, str]:
    """The (uid, username) the CRI reports for an image's `User`: numeric → uid, else a name."""
    name = user.split(":", 1)[0]
    if not name:
        return None, ""
    if name.isdigit():
        return int(name), ""
    return None, name
