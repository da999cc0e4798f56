"""`tandem console`: however QEMU's end of the serial socket goes away, the session ends as "the VM stopped"."""

from __future__ import annotations

import io
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core.records import RecordStore
from core.settings import Config
from protos import cri_pb2 as pb
from sandbox.model import SandboxRecord
from vm_backend.console import relay, run_console
from vm_backend.qemu import VMM_DIR


def reset_by_peer() -> tuple[socket.socket, socket.socket]:
    """Our end, and a peer that closed with our bytes unread in its queue: the next read here is ECONNRESET."""
    ours, peer = socket.socketpair()
    ours.sendall(b"typed\n")
    peer.close()
    return ours, peer


def test_a_console_closed_with_eof_is_the_vm_stopping() -> None:
    ours, peer = socket.socketpair()
    stdin_r, stdin_w = os.pipe()
    peer.close()
    try:
        assert relay(ours, stdin_r, os.open(os.devnull, os.O_WRONLY)) is False
    finally:
        ours.close()
        os.close(stdin_r)
        os.close(stdin_w)


def test_a_console_reset_while_reading_is_the_vm_stopping() -> None:
    ours, _ = reset_by_peer()
    stdin_r, stdin_w = os.pipe()
    try:
        assert relay(ours, stdin_r, os.open(os.devnull, os.O_WRONLY)) is False
    finally:
        ours.close()
        os.close(stdin_r)
        os.close(stdin_w)


def test_a_console_gone_while_writing_is_the_vm_stopping() -> None:
    """Only stdin is polled here, so the write is the first to meet the dead peer (EPIPE)."""
    ours, peer = socket.socketpair()
    peer.close()
    stdin_r, stdin_w = os.pipe()
    os.write(stdin_w, b"input for the guest\n")
    try:
        assert relay(_WriteOnly(ours), stdin_r, os.open(os.devnull, os.O_WRONLY)) is False
    finally:
        ours.close()
        os.close(stdin_r)
        os.close(stdin_w)


def test_ctrl_close_bracket_detaches() -> None:
    ours, peer = socket.socketpair()
    stdin_r, stdin_w = os.pipe()
    os.write(stdin_w, b"ls\x1dignored")
    try:
        assert relay(ours, stdin_r, os.open(os.devnull, os.O_WRONLY)) is True
        assert peer.recv(100) == b"ls"
    finally:
        for s in (ours, peer):
            s.close()
        os.close(stdin_r)
        os.close(stdin_w)


class _WriteOnly:
    """A socket whose fileno() poll() cannot see: an fd that never becomes readable stands in for it."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._quiet_r, self._quiet_w = os.pipe()

    def fileno(self) -> int:
        return self._quiet_r

    def recv(self, size: int) -> bytes:
        raise AssertionError("the quiet fd never polls readable")

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(data)


@pytest.fixture
def vm_pod(tmp_path: Path) -> Iterator[tuple[Config, SandboxRecord, Path]]:
    """A VM pod's record in a state dir, and the path its console socket would be served on."""
    config = Config(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run")
    run_dir = tmp_path / "vm"
    run_dir.mkdir()
    record = SandboxRecord(
        id="ab" * 32,
        config=pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name="doomed", namespace="t", uid="u")),
        runtime_handler="vm",
        backend="vm",
        trust_reason="test",
        backend_state={"run_dir": str(run_dir)},
    )
    RecordStore(config.state_dir / "sandboxes", SandboxRecord).put(record)
    (run_dir / VMM_DIR).mkdir()
    yield config, record, run_dir / VMM_DIR / "console.sock"


def serve_once(path: Path, end: Callable[[socket.socket], None]) -> threading.Thread:
    """Listen on `path`, accept one client and end its connection with `end`."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def accept() -> None:
        with server:
            conn, _ = server.accept()
            end(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return thread


def read_input_then_reset(conn: socket.socket) -> None:
    """QEMU killed with our input unread: wait until it is queued, then go away without reading it."""
    conn.recv(1, socket.MSG_PEEK)
    conn.close()


@pytest.mark.parametrize("end", [socket.socket.close, read_input_then_reset], ids=["eof", "reset"])
def test_the_command_says_the_vm_stopped_and_exits_1(vm_pod, end) -> None:
    config, record, path = vm_pod
    server = serve_once(path, end)
    stdin_r, stdin_w = os.pipe()
    os.write(stdin_w, b"typed into the console\n")  # stdin stays open: only the VM's end ends the session
    out_r, out_w = os.pipe()
    err = io.StringIO()
    try:
        with open(stdin_r, "rb", closefd=False) as stdin, open(out_w, "wb", closefd=False) as out:
            code = run_console(
                config.state_dir, config.vm_backend().run_dir, record.id[:6], tail=False, stdin=stdin, out=out, err=err
            )
    finally:
        for fd in (stdin_r, stdin_w, out_r, out_w):
            os.close(fd)
    server.join(10)
    assert code == 1
    assert err.getvalue().endswith("[tandem: the console closed: the VM stopped]\r\n")
