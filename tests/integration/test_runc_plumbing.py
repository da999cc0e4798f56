"""runc, conmon, overlay rootfs and cgroups against the real programs, without the CRI layer above them.

Every test gets its own runc root, attach socket dir and cgroup parent; the
fixture's teardown fails the test if a container, a conmon, a mount or a
cgroup directory outlived it (after removing them, so one leak does not spread).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core import cgroups
from core.errors import CommandFailed, DeadlineExceeded, FailedPrecondition, NotFound
from core.mounts import is_mounted, mountinfo
from core.proc import run
from runc_backend.cgroups import CgroupStats
from runc_backend.conmon import Conmon, oom_killed, read_exit, running_monitor, wait_exit
from runc_backend.runc import Runc
from sandbox.oci.layer_usage import measure
from sandbox.oci.rootfs import LINKS_DIR, mount_rootfs, unmount
from tests.support.pods import log_entries
from tests.support.wait import eventually

pytestmark = pytest.mark.integration

PATH_ENV = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
REPO = Path(__file__).resolve().parents[2]
LOOP = ["sh", "-c", 'i=0; while :; do echo "line $i"; i=$((i+1)); sleep 0.1; done']
IDLE = ["tail", "-f", "/dev/null"]


def busybox_tree(root: Path) -> Path:
    """A root filesystem of static busybox: /bin/<applet> symlinks plus the mount points runc needs."""
    for d in ("bin", "proc", "dev", "sys", "tmp", "etc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    return root


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return busybox_tree(tmp_path_factory.mktemp("busybox") / "rootfs")


def config(
    args: list[str], cgroups_path: str, root: Path, *, memory_limit: int | None = None, readonly: bool = True
) -> dict[str, Any]:
    """A minimal OCI runtime spec: new pid/ipc/uts/mount/network namespaces and the standard mounts."""
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if memory_limit is not None:
        resources["memory"] = {"limit": memory_limit}
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": [PATH_ENV],
            "cwd": "/",
            "noNewPrivileges": True,
        },
        "root": {"path": str(root), "readonly": readonly},
        "hostname": "plumbing",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "cgroupsPath": cgroups_path,
            "resources": resources,
        },
    }


def process(args: list[str]) -> dict[str, Any]:
    return {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args, "env": [PATH_ENV], "cwd": "/"}


@dataclass
class Container:
    cid: str
    bundle: Path
    log_path: Path
    persist_dir: Path
    cgroups_path: str
    pid: int = 0

    def log_entries(self) -> list[tuple[str, str, str, str]]:
        """(timestamp, stream, tag, text) per line of the CRI log."""
        return log_entries(self.log_path)


@dataclass
class Plumbing:
    """One test's runc root, conmon, directories and cgroup parent."""

    base: Path
    rootfs: Path
    runc: Runc
    conmon: Conmon
    exit_dir: Path
    parent: str

    def bundle(self, args: list[str], *, root: Path | None = None, **options: Any) -> Container:
        cid = f"c{secrets.token_hex(8)}"
        bundle = self.base / "bundles" / cid
        bundle.mkdir(parents=True)
        path = cgroups.cgroups_path(self.parent, cid)
        (bundle / "config.json").write_text(json.dumps(config(args, path, root or self.rootfs, **options)))
        return Container(cid, bundle, self.base / "logs" / f"{cid}.log", self.base / "persist" / cid, path)

    async def create(self, c: Container, **options: Any) -> Container:
        c.pid = await self.conmon.create(
            c.cid, c.bundle, log_path=c.log_path, exit_dir=self.exit_dir, persist_dir=c.persist_dir, **options
        )
        return c

    async def run(self, args: list[str], **options: Any) -> Container:
        c = await self.create(self.bundle(args, **options))
        await self.runc.start(c.cid)
        return c

    async def exit_of(self, c: Container, timeout: float = 10.0) -> int:
        result = await wait_exit(self.exit_dir, c.cid, timeout)
        assert result is not None, f"no exit recorded for {c.cid}"
        return result[0]

    async def remove(self, c: Container) -> None:
        """What the backend does on RemoveContainer: runc delete, then conmon's leftover link."""
        await self.runc.delete(c.cid, force=True)
        await wait_exit(self.exit_dir, c.cid, 10.0)
        self.conmon.remove_attach_link(c.cid)


def conmons_of(runc_root: Path) -> list[int]:
    """Live conmon processes started for this runc root (the root is in their command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"conmon") and f"--root={runc_root}".encode() in argv:
                found.append(int(entry))
    return found


def cgroup_dirs(path: str) -> list[Path]:
    return [root / path.lstrip("/") for root in cgroups.hierarchies() if (root / path.lstrip("/")).exists()]


def memory_limit_file(path: str) -> Path:
    if cgroups.detect_mode() == "v2":
        return Path(cgroups.CGROUP_ROOT) / path.lstrip("/") / "memory.max"
    return Path(cgroups.CGROUP_ROOT) / "memory" / path.lstrip("/") / "memory.limit_in_bytes"


@pytest.fixture
async def plumbing(tmp_path: Path, rootfs: Path) -> AsyncIterator[Plumbing]:
    socket_dir = Path(tempfile.mkdtemp(prefix="tq-", dir="/tmp"))  # attach socket paths must stay short
    runc = Runc(tmp_path / "runc")
    p = Plumbing(
        base=tmp_path,
        rootfs=rootfs,
        runc=runc,
        conmon=Conmon(runc, socket_dir=socket_dir),
        exit_dir=tmp_path / "exits",
        parent=f"/tandem-test-{secrets.token_hex(4)}",
    )
    yield p

    leaks: list[str] = []
    listed = await run([runc.binary, "--root", str(runc.root), "list", "-q"])
    for cid in listed.stdout.decode().split():
        leaks.append(f"runc container {cid}")
        await runc.delete(cid, force=True)
    with contextlib.suppress(AssertionError):  # conmon exits shortly after its container; a leak is listed below
        await eventually(lambda: not conmons_of(runc.root), 10, "conmon to exit")
    for pid in conmons_of(runc.root):
        leaks.append(f"conmon {pid}")
        os.kill(pid, signal.SIGKILL)
    for m in reversed(mountinfo()):
        if m.mount_point.startswith(str(tmp_path)):
            leaks.append(f"mount {m.mount_point}")
            await unmount(Path(m.mount_point))
    cgroups.remove(p.parent)  # the pod-level parent is the caller's to remove; leaves are runc's
    leaks += [f"attach link {x}" for x in os.listdir(socket_dir)]
    shutil.rmtree(socket_dir)
    assert not leaks, f"left behind: {leaks}"
    assert not cgroup_dirs(p.parent)


# ---- conmon + runc lifecycle -----------------------------------------------------------------


async def test_logs_are_cri_format_with_partial_lines_and_exit_code_is_recorded(plumbing: Plumbing):
    script = 'echo out; echo err >&2; head -c 20000 /dev/zero | tr "\\0" x; echo; printf tail; exit 3'
    before = time.time_ns()
    c = await plumbing.run(["sh", "-c", script])
    assert c.pid > 0
    assert await plumbing.exit_of(c) == 3
    code, finished = read_exit(plumbing.exit_dir, c.cid) or (None, 0)
    assert code == 3 and before < finished <= time.time_ns()
    assert (c.persist_dir / "exit").read_text() == "3"

    entries = c.log_entries()
    assert ("stderr", "F", "err") in [(s, t, x) for _, s, t, x in entries]
    lines, partial = [], ""
    for _, _, tag, text in (e for e in entries if e[1] == "stdout"):
        partial += text
        if tag == "F":
            lines.append(partial)
            partial = ""
    assert lines == ["out", "x" * 20000]
    assert partial == "tail"  # the output ended without a newline: partial entries only, no F
    assert any(tag == "P" for _, s, tag, text in entries if text.startswith("x"))  # the long line was split
    assert entries[-1][1:3] == ("stdout", "P")
    await plumbing.remove(c)


async def test_sigterm_to_a_trapping_init_records_143(plumbing: Plumbing):
    # A pid namespace's init only dies of signals it handles (except SIGKILL): it must trap TERM.
    c = await plumbing.run(["sh", "-c", 'trap "exit 143" TERM; sleep 1000 & wait'])
    state = await plumbing.runc.state(c.cid)
    assert state and state["status"] == "running" and state["pid"] == c.pid
    await plumbing.runc.kill(c.cid, signal.SIGTERM)
    assert await plumbing.exit_of(c) == 143
    await plumbing.runc.kill(c.cid, signal.SIGTERM)  # stopped already: not an error
    await plumbing.runc.kill(c.cid, signal.SIGKILL, all_processes=True)
    await plumbing.remove(c)


async def test_sigkill_records_137_and_unknown_containers(plumbing: Plumbing):
    c = await plumbing.run(IDLE)
    await plumbing.runc.kill(c.cid, signal.SIGKILL)
    assert await plumbing.exit_of(c) == 137
    assert not oom_killed(c.persist_dir)
    await plumbing.remove(c)
    assert await plumbing.runc.state("nosuch") is None
    with pytest.raises(NotFound):
        await plumbing.runc.kill("nosuch", signal.SIGTERM)
    with pytest.raises(NotFound):
        await plumbing.runc.start("nosuch")


async def test_delete_is_idempotent_and_removes_the_container_cgroup(plumbing: Plumbing):
    c = await plumbing.run(IDLE)
    assert cgroup_dirs(c.cgroups_path), "runc created no cgroup"
    with pytest.raises(FailedPrecondition):
        await plumbing.runc.delete(c.cid)  # running: only force deletes it
    await plumbing.runc.delete(c.cid, force=True)
    await plumbing.runc.delete(c.cid, force=True)
    await plumbing.runc.delete(c.cid)
    assert await plumbing.runc.state(c.cid) is None
    assert cgroup_dirs(c.cgroups_path) == []
    assert cgroup_dirs(plumbing.parent), "the parent is not runc's to remove"
    assert await plumbing.exit_of(c) == 137
    plumbing.conmon.remove_attach_link(c.cid)
    cgroups.remove(plumbing.parent)
    cgroups.remove(plumbing.parent)
    assert cgroup_dirs(plumbing.parent) == []


async def test_stopped_container_is_deleted_without_runc_and_cgroup_kill_gets_every_process(plumbing: Plumbing):
    c = await plumbing.run(["sh", "-c", "sleep 1001 & exec sleep 1002"])
    procs = cgroup_dirs(c.cgroups_path)[0] / "cgroup.procs"
    assert await eventually(lambda: len(procs.read_text().split()) == 2)
    pidfd = os.pidfd_open(c.pid)
    try:
        assert plumbing.runc.kill_cgroup(c.cid)
        result = await wait_exit(plumbing.exit_dir, c.cid, 10.0, pidfd=pidfd)
        assert result is not None and result[0] == 137
    finally:
        os.close(pidfd)
    assert not plumbing.runc.kill_cgroup("nosuch")
    assert plumbing.runc._delete_stopped(c.cid)  # init dead, cgroups empty: no runc needed
    assert await plumbing.runc.state(c.cid) is None
    assert cgroup_dirs(c.cgroups_path) == []
    await plumbing.runc.delete(c.cid)  # and unknown stays success
    plumbing.conmon.remove_attach_link(c.cid)


async def test_create_failure_carries_runc_message_and_leaves_nothing(plumbing: Plumbing):
    c = plumbing.bundle(IDLE, root=plumbing.base / "no-such-rootfs")
    with pytest.raises(CommandFailed) as failure:
        await plumbing.create(c)
    assert "no-such-rootfs" in str(failure.value) or "no such file" in failure.value.stderr
    assert await plumbing.runc.state(c.cid) is None
    assert running_monitor(c.persist_dir) is None
    assert read_exit(plumbing.exit_dir, c.cid) is None


async def test_terminal_container_logs_everything_as_stdout(plumbing: Plumbing):
    c = plumbing.bundle(["sh", "-c", "tty; echo hi; echo err >&2"])
    spec = json.loads((c.bundle / "config.json").read_text())
    spec["process"]["terminal"] = True
    (c.bundle / "config.json").write_text(json.dumps(spec))
    await plumbing.create(c, terminal=True)
    await plumbing.runc.start(c.cid)
    assert await plumbing.exit_of(c) == 0
    assert [(s, tag, text) for _, s, tag, text in c.log_entries()] == [
        ("stdout", "F", "/dev/pts/0"),
        ("stdout", "F", "hi"),
        ("stdout", "F", "err"),
    ]
    await plumbing.remove(c)


# ---- exec, update, stats, OOM ----------------------------------------------------------------


async def test_exec_sync_returns_output_and_exit_code(plumbing: Plumbing):
    c = await plumbing.run(IDLE)
    result = await plumbing.runc.exec_sync(c.cid, process(["sh", "-c", "echo hi; echo oops >&2; exit 5"]), 10)
    assert (result.exit_code, result.stdout, result.stderr) == (5, b"hi\n", b"oops\n")
    ok = await plumbing.runc.exec_sync(c.cid, process(["hostname"]), 10)
    assert (ok.exit_code, ok.stdout) == (0, b"plumbing\n")
    with pytest.raises(CommandFailed, match="no-such-binary"):
        await plumbing.runc.exec_sync(c.cid, process(["/no-such-binary"]), 10)
    with pytest.raises(NotFound):
        await plumbing.runc.exec_sync("nosuch", process(["true"]), 10)
    await plumbing.remove(c)
    with pytest.raises((NotFound, FailedPrecondition)):
        await plumbing.runc.exec_sync(c.cid, process(["true"]), 10)


async def live_processes(plumbing: Plumbing, cid: str) -> list[str]:
    """`STAT ARGS` of the container's processes that are not zombies, ps itself excluded."""
    ps = await plumbing.runc.exec_sync(cid, process(["ps", "-o", "stat,args"]), 10)
    rows = [line.split(None, 1) for line in ps.stdout.decode().splitlines()[1:]]
    return [args for st, args in rows if not st.startswith("Z") and not args.startswith("ps ")]


async def test_exec_sync_timeout_kills_what_it_started(plumbing: Plumbing):
    c = await plumbing.run(IDLE)
    with pytest.raises(DeadlineExceeded):
        await plumbing.runc.exec_sync(c.cid, process(["sleep", "4321"]), 1)
    # critest's check: the timed-out process is gone, not even a zombie (runc exec reaps it)
    check = await plumbing.runc.exec_sync(c.cid, process(["sh", "-c", "pidof sleep || true"]), 10)
    assert (check.exit_code, check.stdout, check.stderr) == (0, b"", b"")

    with pytest.raises(DeadlineExceeded):
        await plumbing.runc.exec_sync(c.cid, process(["sh", "-c", "sleep 4322 & sleep 4323 & wait"]), 1)
    # an orphan that kept stdout open: runc waits for it, so the timeout must find it
    with pytest.raises(DeadlineExceeded):
        await plumbing.runc.exec_sync(c.cid, process(["sh", "-c", "sleep 4324 & echo bye"]), 1)
    assert await live_processes(plumbing, c.cid) == ["tail -f /dev/null"]
    assert b"sleep 432" not in (await run(["ps", "-eo", "args"])).stdout
    await plumbing.remove(c)


async def test_exec_sync_does_not_wait_for_background_children_without_its_output(plumbing: Plumbing):
    c = await plumbing.run(IDLE)
    result = await plumbing.runc.exec_sync(c.cid, process(["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo bye"]), 20)
    assert (result.exit_code, result.stdout) == (0, b"bye\n")
    assert "sleep 30" in await live_processes(plumbing, c.cid)  # still running: exec_sync did not wait for it
    await plumbing.remove(c)


async def test_update_changes_the_memory_limit(plumbing: Plumbing):
    c = await plumbing.run(IDLE, memory_limit=64 * 2**20)
    limit = memory_limit_file(c.cgroups_path)
    assert limit.read_text().strip() == str(64 * 2**20)
    await plumbing.runc.update(c.cid, {"memory": {"limit": 32 * 2**20}})
    assert limit.read_text().strip() == str(32 * 2**20)
    await plumbing.remove(c)


async def test_stats_have_cpu_memory_and_pids(plumbing: Plumbing):
    busy = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo counted; exec tail -f /dev/null"
    c = await plumbing.run(["sh", "-c", busy])
    await eventually(lambda: c.log_path.exists() and "counted" in c.log_path.read_text(), what="the loop to finish")
    reader = CgroupStats(cgroups.controller_roots())
    usage = reader.usage(c.cgroups_path, 7)
    assert usage.timestamp == 7 and usage.cpu_usage_ns and usage.memory_usage_bytes and usage.pids == 1
    assert usage.memory_working_set_bytes is not None and usage.page_faults
    await plumbing.runc.kill(c.cid, signal.SIGKILL)
    await plumbing.exit_of(c)
    await plumbing.remove(c)
    gone = reader.usage(c.cgroups_path, 8)  # its cgroup is gone: no figures, no error
    assert (gone.cpu_usage_ns, gone.memory_usage_bytes, gone.pids) == (None, None, None)


async def test_oom_kill_is_recorded(plumbing: Plumbing):
    hog = "x=a; while :; do x=$x$x; done"  # init alone doubles a string: it is the one the kernel kills
    c = await plumbing.run(["sh", "-c", hog], memory_limit=16 * 2**20)
    assert await plumbing.exit_of(c, timeout=30) == 137, c.log_path.read_text()
    assert oom_killed(c.persist_dir)  # the OOM event reaches conmon before the death does
    await plumbing.remove(c)


# ---- logs across rotation and daemon death ---------------------------------------------------


async def test_reopen_log_moves_output_to_a_new_file(plumbing: Plumbing):
    c = await plumbing.run(LOOP)
    await eventually(lambda: c.log_path.exists() and c.log_path.stat().st_size > 0)
    rotated = c.log_path.with_suffix(".log.1")
    c.log_path.rename(rotated)
    await plumbing.conmon.reopen_log(c.bundle, c.log_path)
    await eventually(lambda: len(c.log_entries()) >= 2)  # conmon writes to the new file: it switched
    size = rotated.stat().st_size
    await eventually(lambda: len(c.log_entries()) >= 5)  # more output, all of it into the new file
    assert rotated.stat().st_size == size, "conmon still writes to the rotated file"
    assert all(stream == "stdout" and text.startswith("line ") for _, stream, _, text in c.log_entries())
    await plumbing.remove(c)
    with pytest.raises(FailedPrecondition):
        await plumbing.conmon.reopen_log(c.bundle, c.log_path)


CHILD = """
import asyncio, json, sys
from pathlib import Path
from runc_backend.conmon import Conmon
from runc_backend.runc import Runc
from tests.support.pods import log_entries
from tests.support.wait import eventually

a = json.loads(sys.argv[1])
runc = Runc(Path(a["root"]))
async def main():
    pid = await Conmon(runc, socket_dir=Path(a["sockets"])).create(
        a["cid"], Path(a["bundle"]), log_path=Path(a["log"]), exit_dir=Path(a["exits"]), persist_dir=Path(a["persist"])
    )
    await runc.start(a["cid"])
    return pid
print(asyncio.run(main()), flush=True)
sys.stdin.read()  # the test kills us here
"""


async def test_conmon_outlives_the_process_that_started_it(plumbing: Plumbing):
    c = plumbing.bundle(LOOP)
    args = {
        "root": str(plumbing.runc.root),
        "sockets": str(plumbing.conmon.socket_dir),
        "cid": c.cid,
        "bundle": str(c.bundle),
        "log": str(c.log_path),
        "exits": str(plumbing.exit_dir),
        "persist": str(c.persist_dir),
    }
    starter = await asyncio.create_subprocess_exec(
        *[sys.executable, "-c", CHILD, json.dumps(args)],
        cwd=REPO,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert starter.stdout
    pid = int(await asyncio.wait_for(starter.stdout.readline(), 30))
    os.killpg(starter.pid, signal.SIGKILL)  # the whole "daemon" process group dies hard
    await starter.wait()

    monitor = running_monitor(c.persist_dir)
    assert monitor is not None
    conmon = monitor.pid
    assert os.getsid(conmon) == conmon, "conmon is not in a session of its own"
    assert {os.readlink(f"/proc/{conmon}/fd/{fd}") for fd in (0, 1, 2)} == {"/dev/null"}
    size = c.log_path.stat().st_size
    await eventually(lambda: c.log_path.stat().st_size > size, what="the container to go on logging")
    state = await plumbing.runc.state(c.cid)
    assert state and state["status"] == "running" and state["pid"] == pid
    assert read_exit(plumbing.exit_dir, c.cid) is None

    await plumbing.runc.kill(c.cid, signal.SIGKILL)
    assert await plumbing.exit_of(c) == 137
    await eventually(lambda: running_monitor(c.persist_dir) is None)
    await plumbing.remove(c)


# ---- overlay rootfs --------------------------------------------------------------------------


def layer(base: Path, files: dict[str, bytes | None], opaque: tuple[str, ...] = ()) -> Path:
    """An unpacked layer dir: None is a whiteout (0:0 char device), `opaque` dirs hide lower contents."""
    d = base / secrets.token_hex(32)  # as long as the image store's sha256 layer dirs
    d.mkdir(parents=True)
    for name, content in files.items():
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        else:
            path.write_bytes(content)
    for name in opaque:
        (d / name).mkdir(parents=True, exist_ok=True)
        os.setxattr(d / name, "trusted.overlay.opaque", b"y")
    return d


async def test_overlay_with_a_whiteout_runs_a_container(plumbing: Plumbing):
    layers_dir = plumbing.base / "layers"
    base = busybox_tree(layers_dir / secrets.token_hex(32))
    layers = [
        base,
        layer(layers_dir, {"data/a": b"A", "data/b": b"B", "opq/hidden": b"H"}),
        layer(layers_dir, {"data/a": None, "data/c": b"C", "opq/shown": b"S"}, opaque=("opq",)),
    ]
    ctr = plumbing.base / "ctr"
    target = ctr / "rootfs"
    await mount_rootfs(layers, ctr / "upper", ctr / "work", target)
    await mount_rootfs(layers, ctr / "upper", ctr / "work", target)  # already mounted: a no-op
    assert is_mounted(target)
    assert sorted(os.listdir(target / "data")) == ["b", "c"]
    assert os.listdir(target / "opq") == ["shown"]

    c = await plumbing.run(["sh", "-c", "ls /data; echo new > /data/d"], root=target, readonly=False)
    assert await plumbing.exit_of(c) == 0
    assert [text for *_, text in c.log_entries()] == ["b", "c"]
    assert (ctr / "upper/data/d").read_bytes() == b"new\n"
    used, inodes = measure(ctr / "upper")
    assert used > 0 and inodes >= 3  # upper, data, data/d
    await plumbing.remove(c)

    await unmount(target)
    assert not is_mounted(target)
    await unmount(target)
    assert (layers[1] / "data/a").read_bytes() == b"A", "a lower layer was modified"


async def test_overlay_with_200_layers_exceeds_no_option_limit(plumbing: Plumbing):
    layers_dir = plumbing.base / "layers"
    layers = [layer(layers_dir, {f"f{i}": str(i).encode(), "top": str(i).encode()}) for i in range(200)]
    assert sum(len(str(x)) for x in layers) > 4096
    ctr = plumbing.base / "ctr"
    target = ctr / "rootfs"
    await mount_rootfs(layers, ctr / "upper", ctr / "work", target)
    assert is_mounted(target)
    assert len([n for n in os.listdir(target) if n.startswith("f")]) == 200
    assert (target / "top").read_text() == "199"  # the last layer is the topmost
    assert (ctr / LINKS_DIR).is_dir()
    await unmount(target)
    assert not is_mounted(target)


async def test_overlay_with_no_layers_is_empty_and_writable(plumbing: Plumbing):
    ctr = plumbing.base / "ctr"
    target = ctr / "rootfs"
    await mount_rootfs([], ctr / "upper", ctr / "work", target)
    assert os.listdir(target) == []
    (target / "x").write_text("y")
    assert (ctr / "upper/x").read_text() == "y"
    assert measure(ctr / "upper")[1] == 2  # upper itself and x
    busy = os.open(target / "x", os.O_RDONLY)
    try:
        await unmount(target)  # busy: detached lazily
        assert not is_mounted(target)
    finally:
        os.close(busy)
