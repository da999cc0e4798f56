"""core.proc: the runner's pieces that need no external program beyond a shell's `sleep`."""

import asyncio
import os
import signal
import threading

import pytest

from core import proc
from core.errors import InvalidArgument, Unavailable
from core.proc import ProcessIdentity, kill_and_wait, spawn, spawn_detached, start_detached, wait_exit, wait_pidfd


def test_an_identity_is_this_process_and_no_other():
    me = ProcessIdentity.of(os.getpid())
    assert me is not None and me.alive() and me.exists()
    assert not ProcessIdentity(me.pid, me.start_time + 1).exists()  # a later process with the same pid
    assert ProcessIdentity.from_list(me.to_list()) == me
    assert ProcessIdentity.from_list(None) is None and ProcessIdentity.from_list([1, "x"]) is None


def test_an_identity_survives_a_file(tmp_path):
    me = ProcessIdentity.of(os.getpid())
    me.save(tmp_path / "pid")
    assert ProcessIdentity.load(tmp_path / "pid") == me
    (tmp_path / "bad").write_text("12\n")  # a plain pidfile is no identity
    assert ProcessIdentity.load(tmp_path / "bad") is None
    assert ProcessIdentity.load(tmp_path / "missing") is None


async def test_a_zombie_exists_but_is_not_alive_and_waiting_reaps_it(tmp_path):
    child = await asyncio.to_thread(spawn_detached, ["sleep", "30"], tmp_path / "log")
    assert child.alive()
    pidfd = child.open()
    assert pidfd is not None
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        assert await wait_pidfd(pidfd, 10)  # dead, not reaped
    finally:
        os.close(pidfd)
    assert child.exists() and not child.alive()
    assert await wait_exit(child, 10)
    assert not child.exists()  # reaped
    assert child.open() is None


async def test_spawn_wires_stdio():
    process = await spawn(["sh", "-c", "echo out"], stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    assert out == b"out\n" and process.returncode == 0


async def test_a_program_that_cannot_start_is_a_domain_error_never_an_oserror():
    """An argv or environment the kernel refuses (E2BIG) must not escape as OSError: cleanup steps
    catch domain errors, and a pod whose CNI teardown raised OSError could never be removed."""
    huge = "x" * (4 * 2**20)
    with pytest.raises(InvalidArgument, match="too long"):
        await proc.run(["true", huge])
    with pytest.raises(InvalidArgument, match="too long"):
        await proc.run(["true"], env={"HUGE": huge})
    with pytest.raises(InvalidArgument, match="too long"):
        proc.run_blocking(["true", huge])
    with pytest.raises(Unavailable, match="not installed"):
        await proc.run(["/nonexistent/program"])


async def test_a_start_cancelled_while_its_thread_spawns_still_records_who_it_started(tmp_path, monkeypatch):
    """The daemon's shutdown cancelled a warm VM's boot while QEMU was being spawned: the process must be in its
    pidfile when the cancellation arrives, or the cleanup that follows cannot find it."""
    entered, release = threading.Event(), threading.Event()
    real = proc.spawn_detached

    def slow_spawn(*args):
        entered.set()
        release.wait(10)
        return real(*args)

    monkeypatch.setattr(proc, "spawn_detached", slow_spawn)
    pidfile = tmp_path / "pid"
    starting = asyncio.create_task(start_detached(["sleep", "30"], tmp_path / "log", pidfile))
    await asyncio.to_thread(entered.wait, 10)
    starting.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await starting
    started = ProcessIdentity.load(pidfile)
    assert started is not None and started.alive()
    os.kill(started.pid, signal.SIGKILL)
    assert await wait_exit(started, 10)


async def test_a_start_records_who_it_started(tmp_path):
    started = await start_detached(["sleep", "30"], tmp_path / "log", tmp_path / "pid")
    assert ProcessIdentity.load(tmp_path / "pid") == started and started.alive()
    os.kill(started.pid, signal.SIGKILL)
    assert await wait_exit(started, 10)


async def test_kill_and_wait_ends_a_process_and_takes_one_already_gone_for_success(tmp_path):
    started = await start_detached(["sleep", "30"], tmp_path / "log", tmp_path / "pid")
    assert await kill_and_wait(started, 10)
    assert not started.exists()  # killed and reaped
    assert await kill_and_wait(started, 10)  # gone already: nothing to do, and no later process with its pid is hit
