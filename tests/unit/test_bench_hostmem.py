"""bench/hostmem.py: KSM switched on for a measurement is put back exactly as found, also when the bench fails."""

from pathlib import Path

import pytest

from bench import hostmem


@pytest.fixture
def ksm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name, value in (("run", 0), ("pages_to_scan", 100), ("pages_shared", 0), ("pages_sharing", 0)):
        (tmp_path / name).write_text(f"{value}\n")
    monkeypatch.setattr(hostmem, "KSM", tmp_path)
    return tmp_path


def knobs(directory: Path) -> tuple[str, str]:
    return (directory / "run").read_text(), (directory / "pages_to_scan").read_text()


def test_ksm_is_on_inside_the_block_and_as_found_after_it_even_on_failure(ksm: Path) -> None:
    found = knobs(ksm)
    with pytest.raises(RuntimeError), hostmem.ksm_on() as run:
        assert hostmem.ksm_is_on() and knobs(ksm) == ("1\n", f"{hostmem.KSM_PAGES_TO_SCAN}\n")
        raise RuntimeError("the bench failed")
    assert knobs(ksm) == found and not hostmem.ksm_is_on()
    assert run.log[-1] == "KSM restored: run=0, pages_to_scan=100 (pages merged meanwhile were unmerged)"


def test_ksm_found_on_stays_on_and_keeps_its_scan_rate(ksm: Path) -> None:
    (ksm / "run").write_text("1\n")
    (ksm / "pages_to_scan").write_text("5000\n")
    with hostmem.ksm_on():
        assert knobs(ksm) == ("1\n", "5000\n")  # never slower than the operator's
    assert knobs(ksm) == ("1\n", "5000\n")


def test_qemu_mappings_are_told_apart() -> None:
    files = {"/s/userland.img": "userland image"}
    assert hostmem.qemu_mapping_kind("rw-s", "/memfd:memory-backend-memfd (deleted)", files) == "guest RAM"
    assert hostmem.qemu_mapping_kind("r--p", "/s/userland.img", files) == "userland image"
    assert hostmem.qemu_mapping_kind("rwxp", "", files) == "TCG code"
    assert hostmem.qemu_mapping_kind("rw-p", "[heap]", files) == "anon"
    assert hostmem.qemu_mapping_kind("r-xp", "/usr/bin/qemu-system-x86_64", files) == "QEMU, libraries"
