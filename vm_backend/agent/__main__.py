"""`python3 -m vm_backend.agent`: the guest agent's entry point (exec'd by the guest's /init, maybe as PID 1)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from . import syscalls
from .pod import DrySystem, System
from .procs import Reaper
from .server import Agent, find_port, serve_port, serve_socket

log = logging.getLogger("tandem.agent")

FLUSH_TIMEOUT = 2.0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m vm_backend.agent", description=__doc__)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--port", type=Path, help="the virtio-serial port device (default: the port named --port-name)")
    where.add_argument("--socket", type=Path, help="listen on this unix socket instead of a port (tests)")
    parser.add_argument("--port-name", default="agent", help="the port's name as QEMU gave it (default: agent)")
    parser.add_argument("--run-dir", type=Path, default=Path("/run/tandem"), help="bundles, runc root, pod files")
    parser.add_argument("--runc", default="runc", help="the runc binary (default: runc from PATH)")
    parser.add_argument(
        "--dry-setup", action="store_true", help="SetupPod writes pod files but only logs hostname, network, etc."
    )
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    reaper = Reaper()
    reaper.install()
    system = (DrySystem if args.dry_setup else System)(reaper)
    agent = Agent(run_dir=args.run_dir, runc=args.runc, system=system, reaper=reaper)
    if args.socket is not None:
        server = await serve_socket(agent, args.socket)
        log.info("agent %s serving on %s", agent.instance_id, args.socket)
        await agent.stopped.wait()
        await agent.flush(FLUSH_TIMEOUT)
        server.close()
        args.socket.unlink(missing_ok=True)
        await agent.disconnect()
        return
    port = args.port or find_port(args.port_name)
    log.info("agent %s serving on %s", agent.instance_id, port)
    serving = asyncio.create_task(serve_port(agent, port))
    stopped = asyncio.create_task(agent.stopped.wait())
    done, _ = await asyncio.wait([serving, stopped], return_when=asyncio.FIRST_COMPLETED)
    if stopped in done:
        await agent.flush(FLUSH_TIMEOUT)
    serving.cancel()
    stopped.cancel()
    if serving in done:
        serving.result()  # the port failed: raise why


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s tandem-agent %(levelname)s %(message)s"
    )
    try:
        asyncio.run(_serve(args))
    except Exception:
        log.exception("agent failed")
        if os.getpid() != 1:
            return 1
    finally:
        os.sync()
        if os.getpid() == 1:  # PID 1 must not exit (the kernel would panic): power the VM off instead
            syscalls.power_off()
    return 0


if __name__ == "__main__":
    sys.exit(main())
