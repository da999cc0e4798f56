from pathlib import Path

import pytest

from cri.doctor import _is_static_elf, diagnose

pytestmark = pytest.mark.integration


def test_this_host_passes_every_check(tmp_path):
    config = tmp_path / "tandem.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n'
        f'socket = "{tmp_path / "run" / "t.sock"}"\n'
    )
    findings = {f.what: f for f in diagnose(config)}
    failed = [f"{f.what}: {f.detail}" for f in findings.values() if f.level == "FAIL"]
    assert failed == []
    assert {"config", "state dir", "overlayfs", "runc", "conmon", "catatonit", "cgroups", "cni"} <= set(findings)


def test_a_bad_config_is_the_one_finding(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("nonsense = 1\n")
    (finding,) = diagnose(config)
    assert finding.level == "FAIL" and "nonsense" in finding.detail


def test_static_elf_detection():
    assert _is_static_elf(Path("/usr/bin/catatonit"))
    assert _is_static_elf(Path("/bin/busybox"))
    assert not _is_static_elf(Path("/usr/bin/conmon"))
