"""`tandem doctor`'s page and exit status: sections, a fix under each finding that is not OK, a summary."""

from __future__ import annotations

from pathlib import Path

from core.settings import parse_config
from cri.doctor import EXIT_FAILED, EXIT_OK, EXIT_WARNINGS, Finding, accel_finding, check_ksm, exit_status, report
from vm_backend.accel import AccelChoice


def test_the_exit_status_says_the_worst_finding() -> None:
    ok = Finding("ok", "runc", "fine", section="trusted pods")
    warn = Finding("warn", "accel", "tcg", "get KVM", section="untrusted pods")
    fail = Finding("FAIL", "conmon", "missing", "apt-get install conmon", section="trusted pods")
    assert exit_status([ok]) == EXIT_OK == 0
    assert exit_status([ok, warn]) == EXIT_WARNINGS == 2
    assert exit_status([ok, warn, fail]) == EXIT_FAILED == 1


def test_the_page_groups_by_section_and_gives_each_problem_its_fix() -> None:
    findings = [
        Finding("ok", "runc", "/usr/sbin/runc", "never shown", section="trusted pods (runc)"),
        Finding("FAIL", "conmon", "not installed", "apt-get install conmon", section="trusted pods (runc)"),
        Finding("warn", "accel", "tcg", "a usable /dev/kvm", section="untrusted pods (VMs)"),
    ]
    page = report(findings, None).splitlines()
    assert page[0].startswith("tandem doctor: tandem ")
    assert page[1:] == [
        "",
        "Trusted pods (runc)",
        "  OK    runc          /usr/sbin/runc",
        "  FAIL  conmon        not installed",
        "                      fix: apt-get install conmon",
        "",
        "Untrusted pods (VMs)",
        "  WARN  accel         tcg",
        "                      fix: a usable /dev/kvm",
        "",
        "1 OK, 1 WARN, 1 FAIL: exit 1 (something FAILed)",
    ]


def ksm_dir(tmp_path: Path, run: int, shared: int = 0, sharing: int = 0) -> Path:
    for name, value in (("run", run), ("pages_shared", shared), ("pages_sharing", sharing)):
        (tmp_path / name).write_text(f"{value}\n")
    return tmp_path


def test_ksm_is_reported_on_or_off_and_never_a_problem(tmp_path: Path) -> None:
    off = check_ksm(ksm_dir(tmp_path, 0))
    assert (off.level, off.what) == ("ok", "ksm") and off.detail.startswith("off;")
    assert "Tandem never sets it" in off.detail
    on = check_ksm(ksm_dir(tmp_path, 1, shared=100, sharing=2560))
    assert on.level == "ok" and on.detail == "on, 10 MiB saved now (100 pages shared)"  # 2560 pages of 4 KiB
    assert check_ksm(ksm_dir(tmp_path, 2)).detail.startswith("off (merged pages unmerged);")
    assert "not in this kernel" in check_ksm(tmp_path / "absent").detail
    before = {name: (tmp_path / name).read_text() for name in ("run", "pages_shared", "pages_sharing")}
    check_ksm(tmp_path)
    assert {name: (tmp_path / name).read_text() for name in before} == before  # read, never written


def test_the_accel_finding_names_the_translation_cache_under_tcg_only() -> None:
    probed = parse_config({"vm": {"tcg_cache_mib": 64}})
    finding = accel_finding(probed, AccelChoice("tcg", "no /dev/kvm"))
    assert finding.level == "warn" and finding.detail == (
        "tcg: no /dev/kvm; a 64 MiB translation cache per VM ([vm] tcg_cache_mib)"
    )
    chosen = parse_config({"vm": {"accel": "tcg"}})
    finding = accel_finding(chosen, AccelChoice("tcg", "set by [vm] accel"))
    assert finding.level == "ok" and "a 24 MiB translation cache per VM" in finding.detail
    finding = accel_finding(probed, AccelChoice("kvm", "probe booted"))
    assert (finding.level, finding.detail) == ("ok", "kvm: probe booted")
