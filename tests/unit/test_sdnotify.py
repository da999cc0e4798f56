"""sd_notify: READY=1 reaches the service manager's socket, and no child inherits NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket

import pytest

from cri.sdnotify import Notifier


@pytest.mark.parametrize("abstract", [False, True])
def test_the_state_reaches_the_managers_socket(tmp_path, monkeypatch, abstract):
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = f"@tandem-test-{id(manager)}" if abstract else str(tmp_path / "notify")
    manager.bind("\0" + address[1:] if abstract else address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = Notifier.from_environment()
    assert "NOTIFY_SOCKET" not in os.environ
    notifier.notify("READY=1")
    assert manager.recv(64) == b"READY=1"
    manager.close()


def test_without_a_manager_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    Notifier.from_environment().notify("READY=1")


def test_a_manager_gone_is_not_fatal(tmp_path, caplog):
    Notifier(str(tmp_path / "gone")).notify("READY=1")
    assert "cannot notify the service manager" in caplog.text
