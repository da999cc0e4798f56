"""The guest agent's command line (parsed with getopt: argparse is too slow to import under TCG)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vm_backend.agent.__main__ import Options, _parse


def test_defaults_are_the_guests() -> None:
    assert _parse([]) == Options(port=None, socket=None, port_name="agent", run_dir=Path("/run/tandem"), runtime="crun")


def test_every_option() -> None:
    options = _parse(
        ["--socket", "/tmp/a.sock", "--port-name", "p", "--run-dir", "/r", "--runtime", "runc", "--dry-setup",
         "--log-level=debug"]
    )  # fmt: skip
    assert options == Options(
        socket=Path("/tmp/a.sock"), port_name="p", run_dir=Path("/r"), runtime="runc", dry_setup=True,
        log_level="debug",
    )  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [["--port", "/dev/vport0p1", "--socket", "/s"], ["--bogus"], ["extra"], ["--runtime"]],
)
def test_bad_command_lines_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        _parse(argv)
    assert exit_.value.code == 2
    assert "usage:" in capsys.readouterr().err
