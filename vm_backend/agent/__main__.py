"""`python3 -m vm_backend.agent`: the guest agent's entry point (exec'd by the guest's /init, maybe as PID 1)."""

from __future__ import annotations

import asyncio
import getopt
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import syscalls
from .pod import DrySystem, System
from .procs import Reaper
from .server import Agent, find_port, serve_port, serve_socket

log = logging.getLogger("tandem.agent")

FLUSH_TIMEOUT = 2.0


USAGE = """usage: python3 -m vm_backend.agent [options]

  --port DEV         the virtio-serial port device (default: the port named --port-name)
  --socket PATH      listen on this unix socket instead of a port (tests)
  --port-name NAME   the port's name as QEMU gave it (default: agent)
  --run-dir DIR      bundles, runtime root, pod files (default: /run/tandem)
  --runtime PATH     the OCI runtime, with runc's command line (default: crun)
  --dry-setup        SetupPod writes pod files but only logs hostname, network, etc.
  --log-level LEVEL  (default: info)
"""


@dataclass
class Options:
    port: Path | None = None
    socket: Path | None = None
    port_name: str = "agent"
    run_dir: Path = Path("/run/tandem")
    runtime: str = "crun"
    dry_setup: bool = False
    log_level: str = "info"


def _parse(argv: list[str]) -> Options:
    """getopt, not argparse: importing argparse costs 0.1 s of a TCG guest's boot."""
    try:
        pairs, rest = getopt.getopt(
            argv, "h", ["port=", "socket=", "port-name=", "run-dir=", "runtime=", "dry-setup", "log-level=", "help"]
        )
        if rest:
            raise getopt.GetoptError(f"unexpected argument {rest[0]!r}")
    except getopt.GetoptError as e:
        sys.stderr.write(f"{USAGE}\nerror: {e}\n")
        sys.exit(2)
    options = Options()
    for name, value in pairs:
        if name in ("-h", "--help"):
            sys.stdout.write(USAGE)
            sys.exit(0)
        if name == "--dry-setup":
            options.dry_setup = True
        elif name in ("--port", "--socket", "--run-dir"):
            setattr(options, name[2:].replace("-", "_"), Path(value))
        else:
            setattr(options, name[2:].replace("-", "_"), value)
    if options.port is not None and options.socket is not None:
        sys.stderr.write(f"{USAGE}\nerror: --port and --socket exclude each other\n")
        sys.exit(2)
    return options


async def _serve(args: Options) -> None:
    reaper = Reaper()
    reaper.install()
    system = DrySystem() if args.dry_setup else System()
    agent = Agent(run_dir=args.run_dir, runtime=args.runtime, system=system, reaper=reaper)
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
    args = _parse(sys.argv[1:] if argv is None else argv)
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
