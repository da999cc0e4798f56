"""The OCI image model: descriptors, indexes, manifests and configs, parsed and checked.

Registry JSON is untrusted input: every field is type-checked before use, and a
manifest's own claims (its media type, its layer count, its config's size) are
held to what Tandem can and will pull.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from core.errors import InvalidArgument, NotFound, ResourceExhausted
from images.blobs import sha256_digest
from images.reference import is_digest

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
_SCHEMA1_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
_ATTESTATION_ANNOTATION = "vnd.docker.reference.type"


@dataclass(frozen=True)
class Descriptor:
    """What a manifest or index says about another object: type, digest and exact size."""

    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] | None = field(default=None, hash=False)
    annotations: dict[str, str] | None = field(default=None, hash=False)

    @classmethod
    def from_json(cls, obj: object, what: str = "descriptor") -> Descriptor:
        """Validate an untrusted descriptor object from a manifest or index; `what` names it in errors."""
        if not isinstance(obj, dict):
            raise InvalidArgument(f"{what} is not a JSON object")
        media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
        platform, annotations = obj.get("platform"), obj.get("annotations")
        if not isinstance(media_type, str) or not media_type:
            raise InvalidArgument(f"{what} has no mediaType")
        if not isinstance(digest, str) or not is_digest(digest):
            raise InvalidArgument(f"{what} has a bad digest {digest!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument(f"{what} {digest} has a bad size {size!r}")
        if platform is not None and not isinstance(platform, dict):
            raise InvalidArgument(f"{what} {digest} has a bad platform")
        if annotations is not None and not isinstance(annotations, dict):
            raise InvalidArgument(f"{what} {digest} has bad annotations")
        return cls(media_type, digest, size, platform, annotations)


@dataclass(frozen=True)
class ImageManifest:
    config: Descriptor
    layers: list[Descriptor]


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


def parse_manifest(data: bytes, max_layers: int) -> ImageManifest:
    """Check a single-platform manifest and return what must be fetched for it."""
    doc = _load(data, "manifest")
    if doc.get("schemaVersion") != 2:
        raise InvalidArgument(f"manifest schemaVersion {doc.get('schemaVersion')!r} is not supported")
    config = Descriptor.from_json(doc.get("config"), "manifest config")
    if config.media_type not in CONFIG_TYPES:
        raise InvalidArgument(f"manifest config has unsupported media type {config.media_type}")
    if config.size > MAX_CONFIG_BYTES:
        raise ResourceExhausted(f"image config is {config.size} bytes, over the {MAX_CONFIG_BYTES} limit")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise InvalidArgument("manifest has no layers list")
    if len(raw_layers) > max_layers:
        raise ResourceExhausted(f"image has {len(raw_layers)} layers, over the limit of {max_layers}")
    layers = [Descriptor.from_json(layer, f"layer {i}") for i, layer in enumerate(raw_layers)]
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
    runtime = doc.get("config")
    user = runtime.get("User") if isinstance(runtime, dict) else None
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


def select_platform(
    index_json: bytes | dict[str, Any], os: str = "linux", arch: str = "amd64", variant: str | None = None
) -> Descriptor:
    """Pick the manifest for one platform out of an OCI index or Docker manifest list.

    Attestation manifests (BuildKit's `vnd.docker.reference.type`) are never
    images. An entry whose variant equals `variant` (absent when None) wins over
    other variants of the same os/arch.
    """
    where = f" {sha256_digest(index_json)}" if isinstance(index_json, bytes) else ""
    if isinstance(index_json, bytes):
        try:
            index_json = json.loads(index_json)
        except ValueError:
            raise InvalidArgument(f"index{where} is not valid JSON") from None
    manifests = index_json.get("manifests") if isinstance(index_json, dict) else None
    if not isinstance(manifests, list):
        raise InvalidArgument(f"index{where} has no manifests list")
    matches: list[Descriptor] = []
    offered: list[str] = []
    for entry in manifests:
        desc = Descriptor.from_json(entry)
        if _ATTESTATION_ANNOTATION in (desc.annotations or {}):
            continue
        platform = desc.platform or {}
        offered.append("/".join(str(platform.get(k)) for k in ("os", "architecture", "variant") if k in platform))
        if platform.get("os") == os and platform.get("architecture") == arch:
            matches.append(desc)
    if not matches:
        raise NotFound(f"no {os}/{arch} image in index{where} (it offers {', '.join(offered) or 'nothing'})")
    exact = [d for d in matches if (d.platform or {}).get("variant") == variant]
    return (exact or matches)[0]


def manifest_media_type(content_type: str, data: bytes, what: str) -> str:
    """A fetched manifest's type from Content-Type, else its own mediaType field, else its shape.

    `what` (`host: manifest v1`) starts every error message.
    """
    header = content_type.split(";")[0].strip().lower()
    try:
        doc = json.loads(data)
    except ValueError:
        raise InvalidArgument(f"{what} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what} is not a JSON object")
    if header in _SCHEMA1_TYPES or doc.get("schemaVersion") == 1:
        raise InvalidArgument(f"{what}: schema1 is not supported; push it again with a current tool")
    supported = INDEX_TYPES | MANIFEST_TYPES
    declared = doc.get("mediaType")
    if header in supported:
        media_type = header
    elif declared in supported:
        media_type = declared
    elif "manifests" in doc:
        media_type = OCI_INDEX
    elif "config" in doc and "layers" in doc:
        media_type = OCI_MANIFEST
    else:
        raise InvalidArgument(f"{what} has unsupported media type {header or declared!r}")
    if declared is not None and declared != media_type:
        raise InvalidArgument(f"{what} was served as {media_type} but declares {declared!r}")
    return media_type
