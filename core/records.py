"""Typed, versioned records persisted one JSON file each, written atomically.

Every piece of state Tandem must remember across a restart (images now, pods
and containers next) is a dataclass implementing `Record`. A record file is
either the old version or the new one, never half of either; a file written by
a newer Tandem stops the daemon rather than being misread.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar

from core.errors import DataCorruption, FailedPrecondition, InvalidArgument
from core.files import atomic_write_json, private_dir

log = logging.getLogger("tandem.records")


class Record(Protocol):
    KIND: ClassVar[str]
    SCHEMA: ClassVar[int]

    @property
    def id(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_dict(cls, data: dict[str, Any], schema: int) -> Self: ...


R = TypeVar("R", bound=Record)


class RecordStore(Generic[R]):
    """A directory of `<id>.json` files holding records of one type."""

    def __init__(self, root: Path, record_type: type[R]) -> None:
        self.root = private_dir(root)
        self.record_type = record_type

    def _path(self, record_id: str) -> Path:
        if not record_id or "/" in record_id or record_id.startswith("."):
            raise InvalidArgument(f"invalid {self.record_type.KIND} id {record_id!r}")
        return self.root / f"{record_id}.json"

    def put(self, record: R) -> None:
        envelope = {"kind": record.KIND, "schema": record.SCHEMA, "data": record.to_dict()}
        atomic_write_json(self._path(record.id), envelope)

    def delete(self, record_id: str) -> None:
        try:
            os.unlink(self._path(record_id))
        except FileNotFoundError:
            pass

    def ids(self) -> list[str]:
        return sorted(path.stem for path in self.root.glob("*.json"))

    def get(self, record_id: str) -> R | None:
        """One record, read only (for tools beside a running daemon): None if absent; an unreadable file raises."""
        path = self._path(record_id)
        try:
            envelope = json.loads(path.read_bytes())
            kind, schema, data = envelope["kind"], int(envelope["schema"]), envelope["data"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataCorruption(f"{path} is unreadable: {e}") from None
        if kind != self.record_type.KIND:
            raise DataCorruption(f"{path} holds a {kind!r} record, expected {self.record_type.KIND!r}")
        if schema > self.record_type.SCHEMA:
            raise FailedPrecondition(f"{path} has schema {schema}, newer than this Tandem understands")
        return self.record_type.from_dict(data, schema)

    def load_all(self) -> dict[str, R]:
        """Read every record; an unreadable file is set aside as `.corrupt` and reported, not fatal."""
        records: dict[str, R] = {}
        for path in sorted(self.root.glob("*.json")):
            try:
                envelope = json.loads(path.read_bytes())
                kind, schema, data = envelope["kind"], int(envelope["schema"]), envelope["data"]
                if kind != self.record_type.KIND:
                    raise ValueError(f"kind {kind!r}, expected {self.record_type.KIND!r}")
            except (OSError, ValueError, KeyError, TypeError) as e:
                aside = path.with_suffix(".corrupt")
                os.replace(path, aside)
                log.error("unreadable state record set aside", extra={"path": str(aside), "error": str(e)})
                continue
            if schema > self.record_type.SCHEMA:
                raise FailedPrecondition(
                    f"{path} has schema {schema}, newer than this Tandem understands "
                    f"({self.record_type.SCHEMA}); run the newer Tandem"
                )
            record = self.record_type.from_dict(data, schema)
            records[record.id] = record
        return records
