import json
import threading
from dataclasses import dataclass
from typing import Any

import pytest

from core.errors import DataCorruption, FailedPrecondition, InvalidArgument
from core.records import RecordStore


@dataclass
class Pet:
    KIND = "pet"
    SCHEMA = 2
    name: str
    legs: int

    @property
    def id(self) -> str:
        return self.name

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "legs": self.legs}

    @classmethod
    def from_dict(cls, data: dict[str, Any], schema: int) -> "Pet":
        if schema == 1:  # schema 1 had no legs
            return cls(data["name"], 4)
        return cls(**data)


def test_round_trip_and_delete(tmp_path):
    store = RecordStore(tmp_path / "pets", Pet)
    store.put(Pet("rex", 4))
    store.put(Pet("tweety", 2))
    assert RecordStore(tmp_path / "pets", Pet).load_all() == {"rex": Pet("rex", 4), "tweety": Pet("tweety", 2)}
    store.delete("rex")
    store.delete("rex")  # idempotent
    assert list(store.load_all()) == ["tweety"]
    assert (tmp_path / "pets").stat().st_mode & 0o777 == 0o700


def test_older_schema_is_migrated_newer_is_refused(tmp_path):
    root = tmp_path / "pets"
    store = RecordStore(root, Pet)
    (root / "old.json").write_text(json.dumps({"kind": "pet", "schema": 1, "data": {"name": "old"}}))
    assert store.load_all()["old"] == Pet("old", 4)
    (root / "new.json").write_text(json.dumps({"kind": "pet", "schema": 3, "data": {"name": "new"}}))
    with pytest.raises(FailedPrecondition, match="newer"):
        store.load_all()


def test_unreadable_record_is_set_aside_not_fatal(tmp_path):
    root = tmp_path / "pets"
    store = RecordStore(root, Pet)
    store.put(Pet("ok", 3))
    (root / "torn.json").write_text('{"kind": "pet", "sch')
    assert list(store.load_all()) == ["ok"]
    assert (root / "torn.corrupt").exists()


def test_ids_cannot_escape_the_directory(tmp_path):
    store = RecordStore(tmp_path / "pets", Pet)
    for bad in ("../x", "", ".hidden", "a/b"):
        with pytest.raises(InvalidArgument):
            store.put(Pet(bad, 1))


def test_concurrent_writers_never_leave_a_torn_file(tmp_path):
    store = RecordStore(tmp_path / "pets", Pet)

    def write(n: int) -> None:
        for i in range(50):
            store.put(Pet("shared", n * 1000 + i))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    loaded = store.load_all()
    assert loaded["shared"].legs % 1000 == 49
    assert not list((tmp_path / "pets").glob(".*tmp"))


def test_get_reads_one_record_and_leaves_a_bad_file_in_place(tmp_path):
    store = RecordStore(tmp_path / "pets", Pet)
    store.put(Pet("rex", 3))
    (tmp_path / "pets" / "bad.json").write_text("{")
    assert store.ids() == ["bad", "rex"]
    assert store.get("rex") == Pet("rex", 3)
    assert store.get("nobody") is None
    with pytest.raises(DataCorruption):
        store.get("bad")
    assert (tmp_path / "pets" / "bad.json").exists()  # not set aside: a tool beside the daemon must not move it
