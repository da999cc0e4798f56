import logging

from protos import agent_pb2
from vm_backend.events import PodEvents

CID = "c" * 64


def output(data: bytes) -> agent_pb2.Event:
    return agent_pb2.Event(output=agent_pb2.Output(container_id=CID, stream=agent_pb2.STDOUT, data=data))


def test_a_log_that_cannot_be_written_is_said_once_however_much_the_guest_sends(caplog):
    events = PodEvents("p" * 64, lambda cid, status: None, 2**20)
    events.add_container(CID, "/dev/full", 1, create_log=True)  # every write: ENOSPC, as on a full disk
    with caplog.at_level(logging.WARNING, logger="tandem"):
        for _ in range(100):
            events(output(b"line\n"))
    assert len([r for r in caplog.records if "cannot write the log" in r.getMessage()]) == 1
    events.forget_container(CID)
    events.add_container(CID, "/dev/full", 1, create_log=True)  # a new container of that ID is told again
    with caplog.at_level(logging.WARNING, logger="tandem"):
        events(output(b"line\n"))
    assert len([r for r in caplog.records if "cannot write the log" in r.getMessage()]) == 2
