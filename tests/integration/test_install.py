"""`make install` / `make uninstall`: into a temporary root and back out, and a unit systemd accepts."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from core.default_config import default_config_text

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def make(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["make", "-C", str(REPO), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with its kind and content, to compare a tree before and after."""
    tree = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            tree[key] = f"link {path.readlink()}"
        elif path.is_dir():
            tree[key] = f"dir {path.stat().st_mode:o}"
        else:
            tree[key] = f"file {path.stat().st_mode:o} {hashlib.sha256(path.read_bytes()).hexdigest()}"
    return tree


def test_install_into_a_root_then_uninstall_leaves_it_as_it_was(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("node-1\n")
    (root / "usr" / "local" / "bin").mkdir(parents=True)
    (root / "usr" / "local" / "bin" / "kubelet").write_text("#!/bin/sh\n")
    before = snapshot(root)

    make("install", f"DESTDIR={root}")
    unit = (root / "usr/local/lib/systemd/system/tandem.service").read_text()
    assert "ExecStart=/usr/local/bin/tandem serve --config /etc/tandem/tandem.toml" in unit
    assert "KillMode=process" in unit and "Delegate=yes" in unit and "Type=notify" in unit
    assert (root / "etc/tandem/tandem.toml").read_text() == default_config_text()
    classes = (root / "usr/local/share/tandem/runtimeclasses.yaml").read_text()
    assert "handler: vm\noverhead:\n  podFixed:\n" in classes
    drop_in = (root / "usr/local/share/tandem/kubelet.service.d/20-tandem.conf").read_text()
    assert "--container-runtime-endpoint=unix:///run/tandem/tandem.sock --cgroup-driver=cgroupfs" in drop_in
    launcher = (root / "usr/local/bin/tandem").read_text()
    assert launcher.startswith("#!/usr/bin/python3 -I\n") and '"/usr/local/lib/tandem"' in launcher
    assert (root / "usr/local/lib/tandem/cri/server.py").is_file()
    assert (root / "usr/local/lib/tandem/protos/cri_pb2.py").is_file()

    make("uninstall", f"DESTDIR={root}")
    assert snapshot(root) == before


def test_an_operators_config_is_neither_overwritten_nor_removed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    config = root / "etc/tandem/tandem.toml"
    config.parent.mkdir(parents=True)
    config.write_text('default_workload_trust = "untrusted"\n[runtimes.kata]\nbackend = "vm"\n')
    before = snapshot(root)
    installed = make("install", f"DESTDIR={root}")
    assert "tandem.toml exists: kept" in installed.stdout
    classes = (root / "usr/local/share/tandem/runtimeclasses.yaml").read_text()
    assert "name: kata\nhandler: kata\noverhead:" in classes  # made from the operator's config
    make("uninstall", f"DESTDIR={root}")
    assert snapshot(root) == before


def test_the_installed_unit_verifies_and_the_installed_program_runs(tmp_path: Path) -> None:
    prefix = tmp_path / "usr"
    make("install", f"PREFIX={prefix}", f"SYSCONFDIR={tmp_path / 'etc'}")
    unit = prefix / "lib/systemd/system/tandem.service"
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    program = prefix / "bin/tandem"
    version = subprocess.run([program, "version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("tandem "), version.stderr
    printed = subprocess.run([program, "config", "default"], capture_output=True, text=True, timeout=60)
    assert printed.stdout == default_config_text()
    make("uninstall", f"PREFIX={prefix}", f"SYSCONFDIR={tmp_path / 'etc'}")
    assert sorted(tmp_path.iterdir()) == []
