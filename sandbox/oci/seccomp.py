"""Seccomp profiles for containers: Tandem's own RuntimeDefault, and loading Localhost profiles.

Both runtimes apply them: runc on the node, crun in a VM's guest.

RuntimeDefault is an allowlist: anything not named here fails with EPERM. The
syscalls are grouped by what they are for, so a reviewer can see why each one
is safe to hand an unprivileged container. Syscalls that manage the machine
rather than the process (modules, kexec, mounts, namespaces, keyrings, clocks,
BPF, ...) are allowed only when the container also holds the capability the
kernel would demand for them, the way Docker and containerd do it; without
that capability seccomp is the second fence in case a kernel check is buggy.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from core.errors import InvalidArgument, NotFound

# The kernel ABIs a RuntimeDefault container may use: native x86_64 and x32. Not i386: there socket
# calls go through socketcall(2), whose arguments sit in memory seccomp cannot read, and libseccomp
# turns every allowed socket() rule into an unconditional socketcall(SYS_SOCKET) one, so no family
# could be blocked. An i386 program is killed (SIGSYS) at its first syscall; it needs a Localhost profile.
ARCHITECTURES = ("SCMP_ARCH_X86_64", "SCMP_ARCH_X32")

EPERM = 1
ENOSYS = 38

# Syscalls every container may make, by purpose, by their x86_64 and x32 names.
_ALLOWED: dict[str, tuple[str, ...]] = {
    "file descriptors and I/O": (
        "read",
        "write",
        "readv",
        "writev",
        "pread64",
        "pwrite64",
        "preadv",
        "preadv2",
        "pwritev",
        "pwritev2",
        "lseek",
        "sendfile",
        "splice",
        "tee",
        "vmsplice",
        "copy_file_range",
        "close",
        "close_range",
        "dup",
        "dup2",
        "dup3",
        "fcntl",
        "ioctl",
        "flock",
        "fsync",
        "fdatasync",
        "sync",
        "syncfs",
        "sync_file_range",
        "fadvise64",
        "readahead",
        "fallocate",
        "ftruncate",
        "truncate",
        "pipe",
        "pipe2",
    ),
    "paths and directories": (
        "open",
        "openat",
        "openat2",
        "creat",
        "access",
        "faccessat",
        "faccessat2",
        "chdir",
        "fchdir",
        "getcwd",
        "mkdir",
        "mkdirat",
        "mknod",
        "mknodat",
        "rmdir",
        "rename",
        "renameat",
        "renameat2",
        "link",
        "linkat",
        "symlink",
        "symlinkat",
        "unlink",
        "unlinkat",
        "readlink",
        "readlinkat",
        "getdents",
        "getdents64",
        "umask",
        "name_to_handle_at",
    ),
    "file metadata": (
        "stat",
        "lstat",
        "fstat",
        "newfstatat",
        "statx",
        "statfs",
        "fstatfs",
        "chmod",
        "fchmod",
        "fchmodat",
        "fchmodat2",
        "chown",
        "fchown",
        "fchownat",
        "lchown",
        "utime",
        "utimes",
        "utimensat",
        "futimesat",
        "getxattr",
        "lgetxattr",
        "fgetxattr",
        "getxattrat",
        "setxattr",
        "lsetxattr",
        "fsetxattr",
        "setxattrat",
        "listxattr",
        "llistxattr",
        "flistxattr",
        "listxattrat",
        "removexattr",
        "lremovexattr",
        "fremovexattr",
        "removexattrat",
        # Read-only views of the mount table; changing it needs CAP_SYS_ADMIN below.
        "listmount",
        "statmount",
    ),
    "waiting for events": (
        "select",
        "pselect6",
        "poll",
        "ppoll",
        "epoll_create",
        "epoll_create1",
        "epoll_ctl",
        "epoll_ctl_old",
        "epoll_wait",
        "epoll_wait_old",
        "epoll_pwait",
        "epoll_pwait2",
        "eventfd",
        "eventfd2",
        "signalfd",
        "signalfd4",
        "timerfd_create",
        "timerfd_settime",
        "timerfd_gettime",
        "inotify_init",
        "inotify_init1",
        "inotify_add_watch",
        "inotify_rm_watch",
        "fanotify_mark",
        "io_setup",
        "io_destroy",
        "io_submit",
        "io_cancel",
        "io_getevents",
        "io_pgetevents",
    ),
    "memory": (
        "brk",
        "mmap",
        "munmap",
        "mremap",
        "mprotect",
        "madvise",
        "mincore",
        "msync",
        "mlock",
        "mlock2",
        "mlockall",
        "munlock",
        "munlockall",
        "remap_file_pages",
        "memfd_create",
        "memfd_secret",
        "membarrier",
        "pkey_alloc",
        "pkey_free",
        "pkey_mprotect",
        "mseal",
        "map_shadow_stack",
        "cachestat",
    ),
    "processes and threads": (
        "fork",
        "vfork",
        "execve",
        "execveat",
        "exit",
        "exit_group",
        "wait4",
        "waitid",
        "getpid",
        "getppid",
        "gettid",
        "getpgid",
        "setpgid",
        "getpgrp",
        "getsid",
        "setsid",
        "set_tid_address",
        "set_robust_list",
        "get_robust_list",
        "rseq",
        "restart_syscall",
        "prctl",
        "arch_prctl",
        "modify_ldt",
        "get_thread_area",
        "set_thread_area",
        "futex",
        "futex_waitv",
        "futex_wait",
        "futex_wake",
        "futex_requeue",
        "pidfd_open",
        "pidfd_send_signal",
        "process_mrelease",
        "uretprobe",
        # Since kernel 4.8 a tracer cannot rewrite syscalls past seccomp; whom a
        # process may trace is the kernel's usual rule (same uid, or CAP_SYS_PTRACE).
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "capget",
        "capset",
        "seccomp",
        "landlock_create_ruleset",
        "landlock_add_rule",
        "landlock_restrict_self",
    ),
    "scheduling and limits": (
        "sched_yield",
        "sched_getaffinity",
        "sched_setaffinity",
        "sched_getparam",
        "sched_setparam",
        "sched_getscheduler",
        "sched_setscheduler",
        "sched_get_priority_max",
        "sched_get_priority_min",
        "sched_rr_get_interval",
        "sched_getattr",
        "sched_setattr",
        "getpriority",
        "setpriority",
        "ioprio_get",
        "ioprio_set",
        "getrlimit",
        "setrlimit",
        "prlimit64",
        "getrusage",
        "times",
        "sysinfo",
        "uname",
        "getrandom",
        "getcpu",
    ),
    "signals": (
        "kill",
        "tkill",
        "tgkill",
        "rt_sigaction",
        "rt_sigprocmask",
        "rt_sigreturn",
        "rt_sigpending",
        "rt_sigsuspend",
        "rt_sigtimedwait",
        "rt_sigqueueinfo",
        "rt_tgsigqueueinfo",
        "sigaltstack",
        "pause",
        "alarm",
    ),
    "time (reading clocks; setting them needs CAP_SYS_TIME)": (
        "clock_gettime",
        "clock_getres",
        "clock_nanosleep",
        "nanosleep",
        "gettimeofday",
        "time",
        "getitimer",
        "setitimer",
        "timer_create",
        "timer_delete",
        "timer_settime",
        "timer_gettime",
        "timer_getoverrun",
        # adjtimex with modes=0 only reads; the kernel demands CAP_SYS_TIME for changes.
        "adjtimex",
        "clock_adjtime",
    ),
    "user and group IDs": (
        "getuid",
        "geteuid",
        "getgid",
        "getegid",
        "getresuid",
        "getresgid",
        "getgroups",
        "setuid",
        "setgid",
        "setreuid",
        "setregid",
        "setresuid",
        "setresgid",
        "setfsuid",
        "setfsgid",
        "setgroups",
    ),
    "System V and POSIX IPC (namespaced per pod)": (
        "shmget",
        "shmat",
        "shmdt",
        "shmctl",
        "semget",
        "semop",
        "semtimedop",
        "semctl",
        "msgget",
        "msgsnd",
        "msgrcv",
        "msgctl",
        "mq_open",
        "mq_unlink",
        "mq_timedsend",
        "mq_timedreceive",
        "mq_notify",
        "mq_getsetattr",
    ),
    "sockets (socket() and socketpair() are filtered by family below)": (
        "bind",
        "connect",
        "listen",
        "accept",
        "accept4",
        "getsockname",
        "getpeername",
        "getsockopt",
        "setsockopt",
        "send",
        "sendto",
        "sendmsg",
        "sendmmsg",
        "recv",
        "recvfrom",
        "recvmsg",
        "recvmmsg",
        "shutdown",
    ),
}

# Syscalls that are only as safe as the capability the kernel checks for them.
_NEEDS_CAPABILITY: dict[str, tuple[str, ...]] = {
    "CAP_SYS_ADMIN": (
        "mount",
        "umount2",
        "mount_setattr",
        "move_mount",
        "open_tree",
        "fsopen",
        "fsconfig",
        "fsmount",
        "fspick",
        "unshare",
        "setns",
        "clone3",
        "sethostname",
        "setdomainname",
        "quotactl",
        "quotactl_fd",
        "lookup_dcookie",
        "perf_event_open",
        "bpf",
        "fanotify_init",
        "syslog",
        "lsm_get_self_attr",
        "lsm_set_self_attr",
        "lsm_list_modules",
    ),
    "CAP_SYS_BOOT": ("reboot",),
    "CAP_SYS_CHROOT": ("chroot",),
    "CAP_SYS_MODULE": ("init_module", "finit_module", "delete_module"),
    "CAP_SYS_PACCT": ("acct",),
    "CAP_SYS_PTRACE": ("kcmp", "pidfd_getfd", "process_madvise"),
    "CAP_SYS_RAWIO": ("iopl", "ioperm"),
    "CAP_SYS_TIME": ("settimeofday", "clock_settime"),
    "CAP_SYS_TTY_CONFIG": ("vhangup",),
    "CAP_SYS_NICE": ("get_mempolicy", "set_mempolicy", "set_mempolicy_home_node", "mbind"),
    "CAP_SYSLOG": ("syslog",),
    "CAP_BPF": ("bpf",),
    "CAP_PERFMON": ("perf_event_open",),
    "CAP_DAC_READ_SEARCH": ("open_by_handle_at",),
}

# clone() flags that create namespaces (CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC,
# NEWUSER, NEWPID, NEWNET): without CAP_SYS_ADMIN a container may clone threads
# and processes, but not new namespaces, user namespaces above all.
CLONE_NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000

# personality() personas a normal program asks for: PER_LINUX, UNAME26,
# PER_LINUX | ADDR_NO_RANDOMIZE, UNAME26 | ADDR_NO_RANDOMIZE, and the 0xffffffff query.
_PERSONAS = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

# Socket families with a record of kernel bugs and no use inside a pod: AF_ALG
# (kernel crypto API) and AF_VSOCK (hypervisor sockets).
_BLOCKED_SOCKET_FAMILIES = (38, 40)
# Every family Linux has is below 64 (AF_MAX is 46 in 6.x); socket() fails for the others anyway.
_FAMILY_LIMIT = 64


def _arg(index: int, op: str, value: int, value_two: int = 0) -> dict[str, Any]:
    return {"index": index, "value": value, "valueTwo": value_two, "op": op}


def _allow(names: Iterable[str], *args: dict[str, Any]) -> dict[str, Any]:
    rule: dict[str, Any] = {"names": sorted(set(names)), "action": "SCMP_ACT_ALLOW"}
    if args:
        rule["args"] = list(args)
    return rule


def _masked_blocks(values: Iterable[int], limit: int) -> list[tuple[int, int]]:
    """(mask, value) pairs whose matches, on the low 32 bits, are exactly `values` (all below `limit`).

    Each pair is an aligned power-of-two block, so "every family but 38 and 40" takes a handful of
    rules; libseccomp cannot test one argument twice within a rule.
    """
    wanted = set(values)
    blocks = []
    start = 0
    while start < limit:
        if start not in wanted:
            start += 1
            continue
        size = 1
        while start % (2 * size) == 0 and all(v in wanted for v in range(start, start + 2 * size)):
            size *= 2
        blocks.append((0xFFFFFFFF & ~(size - 1), start))
        start += size
    return blocks


def _socket_rules() -> list[dict[str, Any]]:
    """socket() and socketpair() for every family but the blocked ones.

    The family is an `int`: the kernel reads the low 32 bits of the register, so the comparison masks
    the upper half (a plain `>= 41` would let 0x1_0000_0028, AF_VSOCK to the kernel, through).
    """
    families = set(range(_FAMILY_LIMIT)) - set(_BLOCKED_SOCKET_FAMILIES)
    return [
        _allow([name], _arg(0, "SCMP_CMP_MASKED_EQ", mask, value))
        for name in ("socket", "socketpair")
        for mask, value in _masked_blocks(families, _FAMILY_LIMIT)
    ]


def runtime_default_profile(capabilities: Iterable[str] = ()) -> dict[str, Any]:
    """The RuntimeDefault seccomp profile for a process holding `capabilities` (bounding set)."""
    caps = set(capabilities)
    allowed = {name for names in _ALLOWED.values() for name in names}
    for cap, names in _NEEDS_CAPABILITY.items():
        if cap in caps:
            allowed.update(names)
    syscalls = [_allow(allowed)]
    syscalls += [_allow(["personality"], _arg(0, "SCMP_CMP_EQ", persona)) for persona in _PERSONAS]
    syscalls += _socket_rules()
    if "CAP_SYS_ADMIN" in caps:
        syscalls.append(_allow(["clone"]))
    else:
        syscalls.append(_allow(["clone"], _arg(0, "SCMP_CMP_MASKED_EQ", CLONE_NAMESPACE_FLAGS, 0)))
        # clone3 passes its flags in memory seccomp cannot read; answering ENOSYS
        # makes libcs fall back to clone(), whose flags are checked above.
        syscalls.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS})
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "architectures": list(ARCHITECTURES),
        "syscalls": syscalls,
    }


def load_localhost_profile(path: str) -> dict[str, Any]:
    """Read a Localhost profile (an OCI `linux.seccomp` object) from the node, as kubelet names it."""
    if not path.startswith("/"):
        raise InvalidArgument(f"seccomp profile path {path!r} must be absolute")
    try:
        with open(path, "rb") as f:
            text = f.read(4 << 20)
    except FileNotFoundError:
        raise NotFound(f"seccomp profile {path} does not exist") from None
    except OSError as e:
        raise InvalidArgument(f"cannot read seccomp profile {path}: {e.strerror}") from None
    try:
        profile = json.loads(text)
    except ValueError as e:
        raise InvalidArgument(f"seccomp profile {path} is not valid JSON: {e}") from None
    if not isinstance(profile, dict) or not isinstance(profile.get("defaultAction"), str):
        raise InvalidArgument(f"seccomp profile {path} has no defaultAction")
    return profile
