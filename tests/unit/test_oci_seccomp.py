import ctypes
import ctypes.util
import json

import pytest

from core.errors import InvalidArgument, NotFound
from sandbox.oci.seccomp import CLONE_NAMESPACE_FLAGS, load_localhost_profile, runtime_default_profile

ALLOW = "allow"
CONTAINER_CAPS = ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_SETUID", "CAP_SETGID"]

CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
CLONE_THREAD_FLAGS = 0x003D0F00  # what glibc's pthread_create passes
SIGCHLD = 17
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK, AF_ALG, AF_NFC, AF_VSOCK = 1, 2, 10, 16, 38, 39, 40


def _matches(arg: dict, values: tuple[int, ...]) -> bool:
    value = values[arg["index"]] if arg["index"] < len(values) else 0
    op = arg["op"]
    if op == "SCMP_CMP_MASKED_EQ":
        return value & arg["value"] == arg["valueTwo"]
    return {
        "SCMP_CMP_EQ": value == arg["value"],
        "SCMP_CMP_NE": value != arg["value"],
        "SCMP_CMP_LT": value < arg["value"],
        "SCMP_CMP_LE": value <= arg["value"],
        "SCMP_CMP_GT": value > arg["value"],
        "SCMP_CMP_GE": value >= arg["value"],
    }[op]


def evaluate(profile: dict, name: str, *args: int) -> str | int:
    """What the filter does with a call: ALLOW or the errno it returns (rules with args ANDed, any rule may allow)."""
    for rule in profile["syscalls"]:
        if name in rule["names"] and all(_matches(a, args) for a in rule.get("args", [])):
            if rule["action"] == "SCMP_ACT_ALLOW":
                return ALLOW
            return rule.get("errnoRet", 1)
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    return profile["defaultErrnoRet"]


@pytest.fixture(scope="module")
def default():
    return runtime_default_profile(CONTAINER_CAPS)


def test_shape(default):
    assert default["defaultAction"] == "SCMP_ACT_ERRNO" and default["defaultErrnoRet"] == 1
    assert default["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X32"]
    for rule in default["syscalls"]:
        assert rule["names"] == sorted(set(rule["names"])) and rule["action"] in ("SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO")
    json.dumps(default)
    assert runtime_default_profile(CONTAINER_CAPS) == default  # deterministic
    assert runtime_default_profile() == runtime_default_profile([])


@pytest.mark.parametrize(
    "call",
    [
        ("read",),
        ("write",),
        ("openat",),
        ("close",),
        ("mmap",),
        ("mprotect",),
        ("brk",),
        ("execve",),
        ("exit_group",),
        ("futex",),
        ("epoll_wait",),
        ("epoll_pwait",),
        ("getrandom",),
        ("rt_sigaction",),
        ("arch_prctl",),
        ("newfstatat",),
        ("statx",),
        ("getdents64",),
        ("fchownat",),
        ("chroot",),
        ("clone", SIGCHLD),
        ("clone", CLONE_THREAD_FLAGS),
        ("wait4",),
        ("pipe2",),
        ("dup3",),
        ("setuid",),
        ("socket", AF_UNIX),
        ("socket", AF_INET),
        ("socket", AF_INET6),
        ("socket", AF_NETLINK),
        ("socket", AF_NFC),
        ("connect",),
        ("accept4",),
        ("sendmsg",),
        ("shmget",),
        ("mq_open",),
        ("clock_nanosleep",),
        ("prctl",),
        ("personality", 0),
        ("personality", 0xFFFFFFFF),
        ("ptrace",),
        ("seccomp",),
        ("rseq",),
        ("capset",),
    ],
)
def test_ordinary_workloads_are_allowed(default, call):
    assert evaluate(default, *call) == ALLOW


@pytest.mark.parametrize(
    "call",
    [
        ("kexec_load",),
        ("kexec_file_load",),
        ("init_module",),
        ("finit_module",),
        ("delete_module",),
        ("mount",),
        ("umount2",),
        ("move_mount",),
        ("fsopen",),
        ("pivot_root",),
        ("unshare", CLONE_NEWUSER),
        ("unshare", CLONE_NEWNS),
        ("setns",),
        ("clone", SIGCHLD | CLONE_NEWUSER),
        ("clone", CLONE_NEWNS),
        ("bpf",),
        ("perf_event_open",),
        ("keyctl",),
        ("add_key",),
        ("request_key",),
        ("userfaultfd",),
        ("io_uring_setup",),
        ("kcmp",),
        ("pidfd_getfd",),
        ("process_madvise",),
        ("reboot",),
        ("swapon",),
        ("settimeofday",),
        ("clock_settime",),
        ("iopl",),
        ("ioperm",),
        ("acct",),
        ("syslog",),
        ("sethostname",),
        ("open_by_handle_at",),
        ("mbind",),
        ("vhangup",),
        ("socket", AF_VSOCK),
        ("socket", AF_ALG),
        ("personality", 0x0400000),  # READ_IMPLIES_EXEC
    ],
)
def test_machine_level_calls_are_refused_with_eperm(default, call):
    assert evaluate(default, *call) == 1


def test_the_i386_abi_is_not_admitted(default):
    """On i386 socket calls go through socketcall(2), whose arguments seccomp cannot read, and libseccomp
    turns an allowed socket() into an unconditional socketcall(SYS_SOCKET): no family could be blocked."""
    assert "SCMP_ARCH_X86" not in default["architectures"]
    assert not any("socketcall" in rule["names"] for rule in default["syscalls"])


@pytest.mark.parametrize("name", ["socket", "socketpair"])
def test_socket_families_are_compared_on_the_32_bits_the_kernel_reads(default, name):
    """socket(2) takes an int: 0x1_0000_0028 is AF_VSOCK to the kernel and must be to the filter too."""
    for family in (AF_VSOCK, AF_ALG, 0x1_0000_0000 | AF_VSOCK, 0xFFFF_FFFF_0000_0000 | AF_ALG):
        assert evaluate(default, name, family) == 1, hex(family)
    for family in (AF_UNIX, AF_INET, AF_INET6, AF_NETLINK, AF_NFC, 41, 45, 0x1_0000_0000 | AF_INET):
        assert evaluate(default, name, family) == ALLOW, hex(family)


def test_clone3_reports_enosys_so_libc_falls_back_to_clone(default):
    assert evaluate(default, "clone3") == 38


def test_capabilities_unlock_their_syscalls():
    admin = runtime_default_profile([*CONTAINER_CAPS, "CAP_SYS_ADMIN"])
    for call in [("mount",), ("unshare", CLONE_NEWUSER), ("clone", CLONE_NEWUSER | SIGCHLD), ("clone3",), ("setns",)]:
        assert evaluate(admin, *call) == ALLOW, call
    assert evaluate(admin, "init_module") == 1
    assert evaluate(runtime_default_profile(["CAP_SYS_MODULE"]), "init_module") == ALLOW
    assert evaluate(runtime_default_profile(["CAP_SYS_PTRACE"]), "kcmp") == ALLOW
    assert evaluate(runtime_default_profile(["CAP_BPF"]), "bpf") == ALLOW
    assert evaluate(runtime_default_profile([]), "chroot") == 1  # CAP_SYS_CHROOT dropped: chroot goes too


def test_clone_mask_covers_every_namespace_flag():
    assert CLONE_NAMESPACE_FLAGS == 0x7E020000


# Syscalls newer than Debian 12's libseccomp 2.5.4; runc skips names its libseccomp does not know.
NEWER_THAN_LIBSECCOMP = {
    "mseal",
    "listmount",
    "statmount",
    "getxattrat",
    "setxattrat",
    "listxattrat",
    "removexattrat",
    "uretprobe",
    "lsm_get_self_attr",
    "lsm_set_self_attr",
    "lsm_list_modules",
}


def test_every_name_is_a_real_syscall():
    """A typo (or an i386-only name) would silently deny nothing; libseccomp knows the syscall tables."""
    path = ctypes.util.find_library("seccomp")
    assert path is not None, "libseccomp is not installed (runc needs it: make setup installs it)"
    lib = ctypes.CDLL(path)
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    arches = (0xC000003E, 0x4000003E)  # x86_64, x32
    names = {
        n
        for rule in runtime_default_profile(["CAP_" + c for c in ("SYS_ADMIN", "SYS_NICE")])["syscalls"]
        for n in rule["names"]
    }
    unknown = {n for n in names if all(lib.seccomp_syscall_resolve_name_arch(a, n.encode()) == -1 for a in arches)}
    assert unknown <= NEWER_THAN_LIBSECCOMP


def test_load_localhost_profile(tmp_path):
    good = tmp_path / "good.json"
    rules = [{"names": ["chmod"], "action": "SCMP_ACT_ERRNO"}]
    good.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}))
    assert load_localhost_profile(str(good))["syscalls"][0]["names"] == ["chmod"]
    with pytest.raises(NotFound):
        load_localhost_profile(str(tmp_path / "missing.json"))
    with pytest.raises(InvalidArgument, match="absolute"):
        load_localhost_profile("profiles/good.json")
    for name, text in [("bad.json", "{"), ("list.json", "[]"), ("noaction.json", '{"syscalls": []}')]:
        (tmp_path / name).write_text(text)
        with pytest.raises(InvalidArgument):
            load_localhost_profile(str(tmp_path / name))
    with pytest.raises(InvalidArgument, match="cannot read"):
        load_localhost_profile(str(tmp_path))
