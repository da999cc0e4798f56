"""Host memory for the benches: a process's PSS by kind of mapping, and KSM switched on for one measurement.

KSM (the kernel's same-page merging) is host-wide and the operator's to set;
Tandem never touches it. A bench may turn it on to measure what it would save:
`ksm_on` sets it for the duration of a `with` block only, then puts back exactly
what it found (every knob it wrote; pages it merged are unmerged when KSM was
off before) and returns lines saying so, for the bench's output.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vm_backend.ksm import KSM_DIR as KSM
from vm_backend.ksm import ksm_status

KSM_PAGES_TO_SCAN = 2000  # while measuring: ~100k pages/s at the default 20 ms sleep, so a few scans take seconds
KSM_SCANS = 3  # full scans after which merging has settled: a page merges on the scan after the one that saw it
KSM_TIMEOUT = 300.0


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def qemu_mapping_kind(perms: str, name: str, files: dict[str, str]) -> str:
    """What a mapping of a VM's QEMU holds: guest RAM, a file Tandem gave it, TCG's code, QEMU's own."""
    if "memory-backend" in name:
        return "guest RAM"
    if name in files:
        return files[name]
    if not name or name.startswith("["):
        return "TCG code" if "x" in perms else "anon"
    return "QEMU, libraries"


def pss_by_kind(pid: int, files: dict[str, str]) -> dict[str, int]:
    """PSS (KiB) of `pid` by `qemu_mapping_kind`; `files` names the mapped files worth telling apart."""
    kinds: dict[str, int] = {}
    kind = "anon"
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return kinds
    for line in text.splitlines():
        first = line.split(maxsplit=5)
        if first and "-" in first[0] and len(first) >= 5 and not first[0].endswith(":"):
            kind = qemu_mapping_kind(first[1], first[5] if len(first) > 5 else "", files)
        elif line.startswith("Pss:"):
            kinds[kind] = kinds.get(kind, 0) + int(line.split()[1])
    return kinds


def _read(name: str) -> int:
    return int((KSM / name).read_text())


def _write(name: str, value: int) -> None:
    (KSM / name).write_text(f"{value}\n")


@dataclass
class KsmRun:
    """What `ksm_on` found and did, for the bench's output."""

    found: dict[str, int]
    log: list[str] = field(default_factory=list)

    def merged(self) -> str:
        status = ksm_status(KSM)
        return "KSM state unreadable" if status is None else status.describe()


def ksm_available() -> bool:
    return ksm_status(KSM) is not None


def ksm_is_on() -> bool:
    status = ksm_status(KSM)
    return status is not None and status.on


@contextmanager
def ksm_on() -> Iterator[KsmRun]:
    """KSM running (scanning faster) inside the block; on leaving, every knob as it was found."""
    found = {name: _read(name) for name in ("run", "pages_to_scan")}
    state = KsmRun(found)
    try:
        _write("pages_to_scan", max(found["pages_to_scan"], KSM_PAGES_TO_SCAN))
        _write("run", 1)
        state.log.append(
            f"KSM switched on for this measurement (found run={found['run']}, pages_to_scan={found['pages_to_scan']}; "
            f"scanning {max(found['pages_to_scan'], KSM_PAGES_TO_SCAN)} pages per wake-up)"
        )
        yield state
    finally:
        # SIGINT and SIGTERM wait until the knobs are back: a second Ctrl-C must not leave KSM on
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            if found["run"] != 1:
                _write("run", 2)  # KSM was not running: unmerge what it merged meanwhile, as if it never ran
            _write("run", found["run"])
            _write("pages_to_scan", found["pages_to_scan"])
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        state.log.append(
            f"KSM restored: run={_read('run')}, pages_to_scan={_read('pages_to_scan')}"
            + (" (pages merged meanwhile were unmerged)" if found["run"] != 1 else "")
        )


def ksm_settle(scans: int = KSM_SCANS, timeout: float = KSM_TIMEOUT) -> str:
    """Wait until ksmd has made `scans` more full scans (or the timeout); say how many it made and how long."""
    start, began = _read("full_scans"), time.monotonic()
    while _read("full_scans") < start + scans and time.monotonic() - began < timeout:
        time.sleep(0.5)
    return f"{_read('full_scans') - start} full KSM scans in {time.monotonic() - began:.0f} s"
