from pathlib import Path

import pytest

from cri.doctor import _ids_in_use, _is_static_elf, diagnose

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
    assert {"jail ids", "vm cgroups", "jail"} <= set(findings)  # the VMM's jail, with a jailed QEMU started
    assert findings["jail"].level == "ok" and "QEMU runs jailed" in findings["jail"].detail
    assert not list((tmp_path / "run" / "vm" / "jail-ids").glob("*"))  # the probe's uid is free again


def test_a_jail_switched_off_is_a_warning(tmp_path):
    config = tmp_path / "tandem.toml"
    config.write_text(f'runtime_dir = "{tmp_path / "run"}"\nstate_dir = "{tmp_path / "state"}"\n[vm]\njail = false\n')
    findings = {f.what: f for f in diagnose(config)}
    assert findings["jail"].level == "warn" and "root" in findings["jail"].detail


def test_jail_uids_owned_by_someone_are_found():
    assert "user root (0)" in _ids_in_use(0, 1) and "group root (0)" in _ids_in_use(0, 1)
    assert _ids_in_use(0x70000000, 65536) == []  # the default range is free on this host


def test_a_bad_config_is_the_one_finding(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("nonsense = 1\n")
    (finding,) = diagnose(config)
    assert finding.level == "FAIL" and "nonsense" in finding.detail


def test_static_elf_detection():
    assert _is_static_elf(Path("/usr/bin/catatonit"))
    assert _is_static_elf(Path("/bin/busybox"))
    assert not _is_static_elf(Path("/usr/bin/conmon"))


def test_a_running_daemon_is_on_the_page(pod_env, tmp_path):
    env = pod_env()
    config = tmp_path / "doctor.toml"
    config.write_text(
        f'state_dir = "{env.daemon.state_dir}"\nruntime_dir = "{tmp_path / "run"}"\nsocket = "{env.daemon.socket}"\n'
        f'[cni]\nconf_dir = "{tmp_path / "net.d"}"\n'
    )
    findings = {f.what: f for f in diagnose(config)}
    assert findings["daemon"].level == "ok" and "0 pods, 0 of 0 containers running" in findings["daemon"].detail
    assert findings["RuntimeReady"].level == "ok" and findings["NetworkReady"].level == "ok"
    assert findings["daemon"].section == "daemon" and findings["jail"].section == "untrusted pods (VMs)"


def test_no_daemon_is_a_warning_with_its_fix(tmp_path):
    config = tmp_path / "tandem.toml"
    config.write_text(f'runtime_dir = "{tmp_path / "run"}"\nstate_dir = "{tmp_path / "state"}"\n')
    findings = {f.what: f for f in diagnose(config)}
    assert findings["daemon"].level == "warn" and "systemctl start tandem" in findings["daemon"].fix
