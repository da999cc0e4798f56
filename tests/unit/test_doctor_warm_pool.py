"""`tandem doctor` counts the warm pool's VMs from its records, alive by QEMU's process identity."""

from __future__ import annotations

import os
from pathlib import Path

from core.proc import ProcessIdentity
from core.settings import parse_config
from cri.doctor import _check_warm_pool
from vm_backend.pool import WarmPool, WarmRecord


def test_doctor_counts_live_warm_vms(tmp_path: Path) -> None:
    config = parse_config({"runtime_dir": str(tmp_path), "vm": {"warm_pool": 2}})
    me = ProcessIdentity.of(os.getpid())
    assert me is not None
    alive = {"pid": me.pid, "start_time": me.start_time}
    pool = WarmPool(2, None, tmp_path / "vm" / "pool")  # type: ignore[arg-type]  # only its records are used
    pool.save(WarmRecord("warm-00000001", 1, 256, 256, ready=True, qemu=alive))
    pool.save(WarmRecord("warm-00000002", 1, 256, 256, qemu=alive))  # booting
    pool.save(WarmRecord("warm-00000003", 1, 256, 256, ready=True, qemu={"pid": me.pid, "start_time": 1}))  # gone
    pool.save(WarmRecord("warm-00000004", 1, 256, 256, ready=True, qemu=alive, claimed_by="pod"))  # a pod's
    finding = _check_warm_pool(config)
    assert finding.level == "ok" and finding.detail.startswith("2 configured: 1 ready, 1 booting")
    off = _check_warm_pool(parse_config({"runtime_dir": str(tmp_path), "vm": {"warm_pool": 0}}))
    assert "off" in off.detail
