"""The few system calls Python's standard library lacks, through ctypes: subreaper, mount, power off."""

from __future__ import annotations

import ctypes
import functools
import os

_PR_SET_CHILD_SUBREAPER = 36
_RB_POWER_OFF = 0x4321FEDC
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def set_child_subreaper() -> None:
    """Become the parent of orphaned descendants: container processes outlive the runtime that started them."""
    _check(_libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


def mount(source: str, target: str, fstype: str, flags: int = 0, options: str = "") -> None:
    _check(
        _libc().mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags), options.encode()),
        f"mount {fstype} {source} on {target}",
    )


def power_off() -> None:
    """Turn the VM off at once (the caller synced): what PID 1 does instead of exiting."""
    _check(_libc().reboot(_RB_POWER_OFF), "reboot(RB_POWER_OFF)")
