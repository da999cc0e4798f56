"""cri.encoded: list answers joined from per-record encodings are the very answers protobuf would build."""

from __future__ import annotations

from cri import convert
from cri.encoded import EntryCache
from protos import cri_pb2 as pb
from sandbox.model import ContainerRecord, ContainerState


def record(ident: str) -> ContainerRecord:
    config = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=f"n{ident}"), labels={"app": ident})
    return ContainerRecord(id=ident, sandbox_id="p", config=config, image_id="i", image_ref="r", log_path="")


def cache(encoded: list[str]) -> EntryCache[ContainerRecord]:
    def encode(c: ContainerRecord) -> bytes:
        encoded.append(c.id)
        return pb.ListContainersResponse(containers=[convert.container(c)]).SerializeToString()

    return EntryCache("test", lambda c: c.state, encode)


def test_the_joined_answer_parses_as_the_list_it_stands_for():
    records = [record(str(i)) for i in range(5)]
    answer = cache([]).answer(records)
    parsed = pb.ListContainersResponse.FromString(answer.data)
    assert parsed == pb.ListContainersResponse(containers=[convert.container(c) for c in records])
    assert pb.ListContainersResponse.FromString(cache([]).answer([]).data) == pb.ListContainersResponse()


def test_an_entry_is_encoded_again_only_when_its_key_changes():
    encoded: list[str] = []
    entries = cache(encoded)
    a, b = record("a"), record("b")
    entries.answer([a, b])
    entries.answer([a, b])
    assert encoded == ["a", "b"]
    a.state = ContainerState.RUNNING
    parsed = pb.ListContainersResponse.FromString(entries.answer([a, b]).data)
    assert encoded == ["a", "b", "a"]
    assert [c.state for c in parsed.containers] == [pb.CONTAINER_RUNNING, pb.CONTAINER_CREATED]
