"""Content-addressed storage: a blob lives at `sha256/<hex>` and is only ever placed there verified."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from core.errors import DataCorruption, InvalidArgument
from core.files import fsync_dir, private_dir
from images.reference import is_digest


def digest_hex(digest: str) -> str:
    if not is_digest(digest):
        raise InvalidArgument(f"unsupported or malformed digest {digest!r}")
    return digest.split(":", 1)[1]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class BlobStore:
    """Blobs by digest, plus an ingest area for downloads not yet verified."""

    def __init__(self, root: Path) -> None:
        self.root = private_dir(root)
        self.blobs = private_dir(root / "sha256")
        self.ingest = private_dir(root / "ingest")

    def path(self, digest: str) -> Path:
        return self.blobs / digest_hex(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def new_ingest_path(self) -> Path:
        fd, name = tempfile.mkstemp(dir=self.ingest)
        os.close(fd)
        return Path(name)

    def commit(self, verified: Path, digest: str) -> None:
        """Move a file whose content was already checked against `digest` into the store."""
        os.replace(verified, self.path(digest))
        fsync_dir(self.blobs)

    def put(self, data: bytes, digest: str) -> None:
        """Store bytes held in memory after checking them against `digest`."""
        actual = sha256_digest(data)
        if actual != digest:
            raise DataCorruption(f"content {actual} does not match expected {digest}")
        if self.has(digest):
            return
        tmp = self.new_ingest_path()
        tmp.write_bytes(data)
        self.commit(tmp, digest)

    def delete(self, digest: str) -> None:
        try:
            os.unlink(self.path(digest))
        except FileNotFoundError:
            pass

    def digests(self) -> set[str]:
        return {f"sha256:{p.name}" for p in self.blobs.iterdir() if is_digest(f"sha256:{p.name}")}

    def clear_ingest(self) -> None:
        for leftover in self.ingest.iterdir():
            leftover.unlink()
