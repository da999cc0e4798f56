"""KSM, the host's same-page merging, as Tandem sees it: read, never written.

KSM is host-wide and the operator's to set (/sys/kernel/mm/ksm/run): Tandem
reports it (`tandem doctor`) and `bench.vm` measures what it saves beside what
the VMs cost without it, but nothing in Tandem changes it. QEMU asks for guest
RAM to be merged (MADV_MERGEABLE, its default mem-merge=on); KSM only ever
merges private anonymous pages, and a VM's RAM here is a memfd shared with
virtiofsd, so what it can merge is QEMU's own anonymous memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

KSM_DIR = Path("/sys/kernel/mm/ksm")
RUN_STATES = {0: "off", 1: "on", 2: "off (merged pages unmerged)"}


@dataclass(frozen=True)
class KsmStatus:
    run: int  # 0 off, 1 running, 2 stopped with every merged page unmerged
    pages_shared: int  # pages KSM keeps, each standing for several
    pages_sharing: int  # further mappings of those: the pages saved

    @property
    def on(self) -> bool:
        return self.run == 1

    def saved_mib(self) -> float:
        return self.pages_sharing * 4096 / 2**20

    def describe(self) -> str:
        state = RUN_STATES.get(self.run, f"run={self.run}")
        if not self.pages_sharing:
            return state
        return f"{state}, {self.saved_mib():.0f} MiB saved now ({self.pages_shared} pages shared)"


def ksm_status(directory: Path = KSM_DIR) -> KsmStatus | None:
    """KSM's state, or None where the kernel has no KSM (or its files cannot be read)."""
    try:
        values = {name: int((directory / name).read_text()) for name in ("run", "pages_shared", "pages_sharing")}
    except (OSError, ValueError):
        return None
    return KsmStatus(values["run"], values["pages_shared"], values["pages_sharing"])
