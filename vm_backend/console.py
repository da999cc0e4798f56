"""`tandem console POD`: the operator's terminal on a VM pod's serial console (ttyS0).

QEMU serves the serial port on `vmm/console.sock` in the pod's run dir (one client at a
time) and copies everything the guest prints to `vmm/console.log`; both are opened
without following symlinks (a jailed QEMU owns that directory). This prints the log's tail (the
boot log: the guest reads nothing from ttyS0, so the live socket may stay quiet), then
relays bytes both ways until Ctrl-] (or the end of stdin), or until QEMU closes the socket.
It reads the pod's record from the state dir, never touching it, so it works beside a
running daemon.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import termios
import tty
from pathlib import Path
from typing import BinaryIO, TextIO

from core.errors import FailedPrecondition, InvalidArgument, NotFound
from core.files import open_regular_nofollow, socket_nofollow
from core.records import RecordStore
from sandbox.model import SandboxRecord
from vm_backend.qemu import VMM_DIR

DETACH = b"\x1d"  # Ctrl-]
TAIL_BYTES = 4096


def find_pod(state_dir: Path, ident: str) -> SandboxRecord:
    """The pod whose ID is or starts with `ident`, from the daemon's records under `state_dir`."""
    if not ident:
        raise InvalidArgument("pod ID is empty")
    root = state_dir / "sandboxes"
    if not root.is_dir():
        raise NotFound(f"no pods in {state_dir}")
    store = RecordStore(root, SandboxRecord)
    matches = [i for i in store.ids() if i.startswith(ident)]
    if ident in matches:
        matches = [ident]
    if len(matches) > 1:
        raise InvalidArgument(f"pod ID prefix {ident!r} is ambiguous")
    record = store.get(matches[0]) if matches else None
    if record is None:
        raise NotFound(f"pod {ident!r} not found in {root}")
    return record


def run_dir(vm_run_dir: Path, sandbox: SandboxRecord) -> Path:
    """The pod VM's run dir (as VmBackend names it, under its `vm_run_dir`)."""
    return Path(sandbox.backend_state.get("run_dir") or vm_run_dir / sandbox.id[:16])


def connect(vm_run_dir: Path, sandbox: SandboxRecord) -> socket.socket:
    if sandbox.backend != "vm":
        raise FailedPrecondition(
            f"pod {sandbox.id[:12]} runs in the {sandbox.backend} backend, not in a VM: it has no console "
            f"(use crictl exec for its containers)"
        )
    path = run_dir(vm_run_dir, sandbox) / VMM_DIR / "console.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with socket_nofollow(path) as reachable:
            sock.connect(reachable)
    except OSError as e:
        sock.close()
        raise FailedPrecondition(f"the VM of pod {sandbox.id[:12]} is not running ({path}: {e.strerror})") from None
    return sock


def log_tail(vm_run_dir: Path, sandbox: SandboxRecord, size: int = TAIL_BYTES) -> bytes:
    """The last whole lines (about `size` bytes) of what the guest printed on its console."""
    try:
        with open_regular_nofollow(run_dir(vm_run_dir, sandbox) / VMM_DIR / "console.log") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(0, end - size))
            data = f.read()
    except OSError:
        return b""
    if end > size and b"\n" in data:
        data = data[data.index(b"\n") + 1 :]
    return data


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def relay(sock: socket.socket, stdin: int, stdout: int) -> bool:
    """Copy stdin to the console and the console to stdout; True on detach (Ctrl-] or the end of stdin),
    False when the console closed (QEMU stopped).

    A QEMU that dies ends the socket with EOF or, when it had unread input from us, with a reset
    (ECONNRESET on read, EPIPE on write): all of them mean the same thing, the VM is gone.
    """
    poller = select.poll()
    poller.register(stdin, select.POLLIN)
    poller.register(sock.fileno(), select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == sock.fileno():
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    return False
                if not data:
                    return False
                _write_all(stdout, data)
            else:
                data = os.read(stdin, 4096)
                if not data:
                    return True
                before, detach, _ = data.partition(DETACH)
                if before:
                    try:
                        sock.sendall(before)
                    except (ConnectionResetError, BrokenPipeError):
                        return False
                if detach:
                    return True


def run_console(state_dir: Path, vm_run_dir: Path, ident: str, *, tail: bool = True, stdin: BinaryIO | None = None,
                out: BinaryIO | None = None, err: TextIO | None = None) -> int:  # fmt: skip
    """The whole command: 0 after a detach, 1 when the VM went away while connected. Notes go to `err`.

    The pod's record is read from `state_dir`; its VM's run dir is under `vm_run_dir`.
    """
    stdin, out, err = stdin or sys.stdin.buffer, out or sys.stdout.buffer, err or sys.stderr
    sandbox = find_pod(state_dir, ident)
    sock = connect(vm_run_dir, sandbox)
    with sock:
        if tail:
            out.write(log_tail(vm_run_dir, sandbox))
            out.flush()
        in_fd, out_fd = stdin.fileno(), out.fileno()
        saved = termios.tcgetattr(in_fd) if os.isatty(in_fd) else None
        try:
            if saved is not None:
                tty.setraw(in_fd)
            err.write(f"[tandem: console of pod {sandbox.name} ({sandbox.id[:12]}); Ctrl-] detaches]\r\n")
            err.flush()  # once connected (and raw): from here on, input reaches the guest
            detached = relay(sock, in_fd, out_fd)
        finally:
            if saved is not None:
                termios.tcsetattr(in_fd, termios.TCSADRAIN, saved)
    with contextlib.suppress(OSError):
        err.write("\r\n[tandem: detached]\r\n" if detached else "\r\n[tandem: the console closed: the VM stopped]\r\n")
        err.flush()
    return 0 if detached else 1
