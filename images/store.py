"""The image store both backends share: pull, look up, list and remove images.

Layout under its root (all 0700):
    blobs/sha256/<hex>        manifests, indexes and configs, by digest, verified
    blobs/ingest/             downloads in progress (cleared at start)
    layers/sha256/<hex>/      one unpacked layer (a diff directory for overlayfs), by diff_id
    layer-records/, records/  typed records of layers and images (see core.records)

Compressed layer blobs are verified, unpacked (the unpacker verifies the
diff_id), then dropped: only the unpacked layer is ever used.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from core import metrics
from core.errors import AlreadyExists, InvalidArgument
from core.files import private_dir
from core.records import RecordStore
from images.auth import Credentials
from images.blobs import BlobStore, digest_hex, sha256_digest
from images.manifest import INDEX_TYPES, Descriptor, ImageConfig, parse_config, parse_manifest, select_platform
from images.reference import Reference, parse_reference
from images.registry import RegistryClient, Repository
from images.unpack import UnpackLimits, unpack_layer

log = logging.getLogger("tandem.images")


@dataclass
class ImageRecord:
    """An image as the CRI sees it: identified by its config digest."""

    KIND: ClassVar[str] = "image"
    SCHEMA: ClassVar[int] = 1

    image_id: str
    repo_tags: list[str]
    repo_digests: list[str]
    manifest_digest: str
    layers: list[str]
    blobs: list[str]
    size: int
    user: str
    pulled_at: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        return self.image_id

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "repo_tags": self.repo_tags,
            "repo_digests": self.repo_digests,
            "manifest_digest": self.manifest_digest,
            "layers": self.layers,
            "blobs": self.blobs,
            "size": self.size,
            "user": self.user,
            "pulled_at": self.pulled_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], schema: int) -> Self:
        return cls(**data)


@dataclass
class LayerRecord:
    """Written once a layer is fully unpacked and verified: its presence marks the layer usable."""

    KIND: ClassVar[str] = "layer"
    SCHEMA: ClassVar[int] = 1

    diff_id: str
    size: int
    entries: int

    @property
    def id(self) -> str:
        return self.diff_id

    def to_dict(self) -> dict[str, Any]:
        return {"diff_id": self.diff_id, "size": self.size, "entries": self.entries}

    @classmethod
    def from_dict(cls, data: dict[str, Any], schema: int) -> Self:
        return cls(**data)


@dataclass(frozen=True)
class FsUsage:
    mountpoint: Path
    used_bytes: int
    inodes_used: int


class ImageStore:
    def __init__(
        self,
        root: Path,
        registry: RegistryClient,
        *,
        limits: UnpackLimits,
        max_layers: int = 128,
        parallel_downloads: int = 4,
    ) -> None:
        self.root = private_dir(root)
        self._registry = registry
        self._limits = limits
        self._max_layers = max_layers
        self._download_slots = asyncio.Semaphore(parallel_downloads)
        self._blobs = BlobStore(root / "blobs")
        self._layer_root = private_dir(root / "layers" / "sha256")
        self._image_records = RecordStore(root / "records", ImageRecord)
        self._layer_records = RecordStore(root / "layer-records", LayerRecord)
        self._images: dict[str, ImageRecord] = {}
        self._layers: dict[str, LayerRecord] = {}
        self._meta = asyncio.Lock()
        self._holds: Counter[str] = Counter()
        self._pulls: dict[str, asyncio.Task[ImageRecord]] = {}
        self._layer_tasks: dict[str, asyncio.Task[LayerRecord]] = {}

    # ---- start-up -------------------------------------------------------------------------

    def load(self) -> None:
        """Reload records and drop whatever a crash left half-done (downloads, unpacks, orphans)."""
        self._images = self._image_records.load_all()
        self._layers = self._layer_records.load_all()
        self._blobs.clear_ingest()
        for leftover in self._layer_root.glob(".unpack-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        self._collect_garbage()
        log.info("image store loaded", extra={"images": len(self._images), "layers": len(self._layers)})

    # ---- queries --------------------------------------------------------------------------

    # This method shadows the builtin `list` in the class body, so annotations here say builtins.list.
    def list(self) -> builtins.list[ImageRecord]:
        return sorted(self._images.values(), key=lambda r: r.pulled_at)

    def resolve(self, ref_or_id: str) -> ImageRecord | None:
        """Find an image by ID (full or unique prefix), tag or digest reference, as containerd does."""
        if not ref_or_id:
            raise InvalidArgument("image reference is empty")
        if ref_or_id.startswith("sha256:"):
            return self._by_id_prefix(ref_or_id.removeprefix("sha256:"))
        try:
            ref = parse_reference(ref_or_id)
        except InvalidArgument:
            ref = None
        if ref is not None:
            wanted = str(ref)
            for record in self._images.values():
                if wanted in record.repo_tags or wanted in record.repo_digests:
                    return record
        if all(c in "0123456789abcdef" for c in ref_or_id):
            return self._by_id_prefix(ref_or_id)
        if ref is None:
            raise InvalidArgument(f"{ref_or_id!r} is neither an image reference nor an image ID")
        return None

    def _by_id_prefix(self, prefix: str) -> ImageRecord | None:
        matches = [r for r in self._images.values() if digest_hex(r.image_id).startswith(prefix)]
        if len(matches) > 1:
            raise InvalidArgument(f"image ID prefix {prefix!r} is ambiguous")
        return matches[0] if matches else None

    def config_of(self, record: ImageRecord) -> dict[str, Any]:
        """The image's config JSON; parse_config made sure it is an object before the pull stored it."""
        config: dict[str, Any] = json.loads(self._blobs.read(record.image_id))
        return config

    def layer_dirs(self, record: ImageRecord) -> builtins.list[Path]:
        """The image's unpacked layers, bottom first, for an overlay mount."""
        return [self._layer_root / digest_hex(d) for d in record.layers]

    def usage(self) -> FsUsage:
        used = sum(layer.size for layer in self._layers.values())
        inodes = sum(layer.entries for layer in self._layers.values())
        for digest in self._blobs.digests():
            with contextlib.suppress(FileNotFoundError):
                used += self._blobs.path(digest).stat().st_size
                inodes += 1
        return FsUsage(self.root, used, inodes)

    # ---- pull -----------------------------------------------------------------------------

    async def pull(self, image: str, creds: Credentials | None = None) -> ImageRecord:
        """Pull `image`; concurrent pulls of the same reference share one download."""
        ref = parse_reference(image)
        key = str(ref)
        task = self._pulls.get(key)
        if task is None:
            task = asyncio.create_task(self._pull(ref, creds), name=f"pull {key}")
            self._pulls[key] = task
            task.add_done_callback(lambda _t: self._pulls.pop(key, None))
        return await asyncio.shield(task)

    async def _pull(self, ref: Reference, creds: Credentials | None) -> ImageRecord:
        try:
            return await self._pull_once(ref, creds)
        except Exception:
            metrics.amount(metrics.Amount.IMAGE_PULL_FAILURES)
            raise

    async def _pull_once(self, ref: Reference, creds: Credentials | None) -> ImageRecord:
        started = time.monotonic()
        repo = self._registry.repository(ref, creds)
        top, top_bytes = await repo.get_manifest(ref.digest or ref.tag or "latest")
        metrics.amount(metrics.Amount.IMAGE_PULL_BYTES, len(top_bytes))
        held: list[str] = [top.digest]
        self._hold(held)
        try:
            keep = [top.digest]
            self._blobs.put(top_bytes, top.digest)
            manifest_desc, manifest_bytes = top, top_bytes
            if top.media_type in INDEX_TYPES:
                chosen = select_platform(top_bytes)
                manifest_desc, manifest_bytes = await repo.get_manifest(chosen.digest)
                metrics.amount(metrics.Amount.IMAGE_PULL_BYTES, len(manifest_bytes))
                self._hold([manifest_desc.digest])
                held.append(manifest_desc.digest)
                self._blobs.put(manifest_bytes, manifest_desc.digest)
                keep.append(manifest_desc.digest)
            manifest = parse_manifest(manifest_bytes, self._max_layers)
            self._hold([manifest.config.digest])
            held.append(manifest.config.digest)
            config_bytes = await self._fetch_small_blob(repo, manifest.config)
            config = parse_config(config_bytes, len(manifest.layers))
            keep.append(manifest.config.digest)
            self._hold(config.diff_ids)
            held.extend(config.diff_ids)
            await asyncio.gather(
                *(
                    self._ensure_layer(repo, blob, diff_id)
                    for blob, diff_id in zip(manifest.layers, config.diff_ids, strict=True)
                )
            )
            size = len(manifest_bytes) + manifest.config.size + sum(layer.size for layer in manifest.layers)
            record = await self._record_pull(ref, top.digest, manifest_desc.digest, config, keep, size)
        finally:
            self._release(held)
        metrics.timing(metrics.Timing.IMAGE_PULL, time.monotonic() - started)
        log.info(
            "pulled image",
            extra={"image": str(ref), "id": record.image_id, "seconds": round(time.monotonic() - started, 3)},
        )
        return record

    async def _fetch_small_blob(self, repo: Repository, blob: Descriptor) -> bytes:
        if not self._blobs.has(blob.digest):
            tmp = self._blobs.new_ingest_path()
            try:
                await repo.fetch_blob(blob, tmp)
                metrics.amount(metrics.Amount.IMAGE_PULL_BYTES, blob.size)
                self._blobs.commit(tmp, blob.digest)
            finally:
                tmp.unlink(missing_ok=True)
        data = self._blobs.read(blob.digest)
        if sha256_digest(data) != blob.digest:
            self._blobs.delete(blob.digest)
            raise InvalidArgument(f"stored blob {blob.digest} was altered on disk; pull again")
        return data

    async def _ensure_layer(self, repo: Repository, blob: Descriptor, diff_id: str) -> LayerRecord:
        if diff_id in self._layers:
            return self._layers[diff_id]
        task = self._layer_tasks.get(diff_id)
        if task is None:
            task = asyncio.create_task(self._fetch_layer(repo, blob, diff_id), name=f"layer {diff_id}")
            self._layer_tasks[diff_id] = task
            task.add_done_callback(lambda _t: self._layer_tasks.pop(diff_id, None))
        return await asyncio.shield(task)

    async def _fetch_layer(self, repo: Repository, blob: Descriptor, diff_id: str) -> LayerRecord:
        dest = self._layer_root / digest_hex(diff_id)
        tmp = self._blobs.new_ingest_path()
        try:
            async with self._download_slots:
                await repo.fetch_blob(blob, tmp)
            metrics.amount(metrics.Amount.IMAGE_PULL_BYTES, blob.size)
            if dest.exists():
                # left by a crash after the unpack but before its record: redo it from scratch
                await asyncio.to_thread(shutil.rmtree, dest)
            result = await asyncio.to_thread(unpack_layer, tmp, dest, expected_diff_id=diff_id, limits=self._limits)
        finally:
            tmp.unlink(missing_ok=True)
        layer = LayerRecord(diff_id=diff_id, size=result.size, entries=result.entries)
        self._layer_records.put(layer)
        self._layers[diff_id] = layer
        return layer

    async def _record_pull(
        self,
        ref: Reference,
        top_digest: str,
        manifest_digest: str,
        config: ImageConfig,
        blobs: builtins.list[str],
        size: int,
    ) -> ImageRecord:
        image_id = blobs[-1]
        repo_digest = f"{ref.name}@{top_digest}"
        async with self._meta:
            record = self._images.get(image_id) or ImageRecord(
                image_id=image_id,
                repo_tags=[],
                repo_digests=[],
                manifest_digest=manifest_digest,
                layers=config.diff_ids,
                blobs=[],
                size=size,
                user=config.user,
            )
            changed: list[ImageRecord] = [record]
            if ref.tag and not ref.digest:
                tag = str(ref)
                for other in self._images.values():
                    if other is not record and tag in other.repo_tags:
                        other.repo_tags.remove(tag)
                        changed.append(other)
                if tag not in record.repo_tags:
                    record.repo_tags.append(tag)
            if repo_digest not in record.repo_digests:
                record.repo_digests.append(repo_digest)
            record.blobs = sorted(set(record.blobs) | set(blobs))
            record.manifest_digest = manifest_digest
            record.pulled_at = time.time()
            for r in changed:
                self._image_records.put(r)
            self._images[image_id] = record
            return record

    # ---- removal --------------------------------------------------------------------------

    async def remove(self, ref_or_id: str, in_use: Callable[[str], Awaitable[bool]] | None = None) -> None:
        """Remove an image with all its tags; removing an absent image succeeds (kubelet retries)."""
        async with self._meta:
            record = self.resolve(ref_or_id)
            if record is None:
                return
            if in_use is not None and await in_use(record.image_id):
                raise AlreadyExists(f"image {record.image_id} is in use by a container")
            self._image_records.delete(record.image_id)
            del self._images[record.image_id]
            self._collect_garbage()
        log.info("removed image", extra={"image": ref_or_id, "id": record.image_id})

    def _hold(self, digests: Iterable[str]) -> None:
        self._holds.update(digests)

    def _release(self, digests: Iterable[str]) -> None:
        self._holds.subtract(digests)
        self._holds += Counter()

    def _collect_garbage(self) -> None:
        """Delete blobs and layers that no image references and no pull in progress holds."""
        wanted = set(self._holds)
        for record in self._images.values():
            wanted.update(record.blobs)
            wanted.update(record.layers)
        for digest in self._blobs.digests() - wanted:
            self._blobs.delete(digest)
        for diff_id in set(self._layers) - wanted:
            self._layer_records.delete(diff_id)
            del self._layers[diff_id]
        for path in self._layer_root.iterdir():
            if not path.name.startswith(".") and f"sha256:{path.name}" not in self._layers:
                if f"sha256:{path.name}" not in wanted:
                    shutil.rmtree(path, ignore_errors=True)
