"""`tandem`: the daemon and the operator's tools."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path

from core import logfmt
from core.errors import TandemError
from core.settings import LOG_LEVELS, Config, load_config
from cri.version import CRI_API_VERSION, RUNTIME_NAME, RUNTIME_VERSION


def _config(args: argparse.Namespace) -> Config:
    config = load_config(Path(args.config) if args.config else None)
    overrides = {
        key: value
        for key, value in {
            "socket": Path(args.socket) if args.socket else None,
            "state_dir": Path(args.state_dir) if args.state_dir else None,
            "log_level": args.log_level,
        }.items()
        if value is not None
    }
    return dataclasses.replace(config, **overrides)


def _serve(args: argparse.Namespace) -> int:
    from cri.server import serve

    config = _config(args)
    logfmt.configure(config.log_level)
    asyncio.run(serve(config))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from cri.doctor import run_doctor

    return run_doctor(args.config and Path(args.config))


def _assets(args: argparse.Namespace) -> int:
    """Build (or confirm) the guest kernel, initramfs and userland image and probe the accelerator; print them."""
    from vm_backend.accel import choose_accel
    from vm_backend.guest_image import ensure_assets

    config = load_config(Path(args.config) if args.config else None)
    state_dir = Path(args.state_dir) if args.state_dir else config.state_dir

    async def build() -> None:
        assets = await ensure_assets(state_dir, force=args.force)
        print(f"assets     {assets.dir} ({assets.digest})")
        print(f"kernel     {assets.kernel} ({assets.kernel_release})")
        print(f"initramfs  {assets.initramfs} ({assets.manifest['initramfs_bytes'] / 2**20:.1f} MiB)")
        print(f"userland   {assets.userland} ({assets.userland_bytes / 2**20:.1f} MiB, mapped by every VM)")
        choice = await choose_accel(config.vm.accel, state_dir, assets, config.vm.qemu)
        print(f"accel      {choice.accel}: {choice.reason}")

    asyncio.run(build())
    return 0


def _console(args: argparse.Namespace) -> int:
    from vm_backend.console import run_console

    config = load_config(Path(args.config) if args.config else None)
    if args.state_dir:
        config = dataclasses.replace(config, state_dir=Path(args.state_dir))
    return run_console(config.state_dir, config.vm_backend().run_dir, args.pod_id, tail=not args.no_log)


def _config_default(args: argparse.Namespace) -> int:
    from core.default_config import default_config_text

    print(default_config_text(), end="")
    return 0


def _runtime_classes(args: argparse.Namespace) -> int:
    from cri.runtimeclass import runtime_classes

    config = load_config(Path(args.config) if args.config else None)
    print(runtime_classes(config), end="")
    return 0


def _version(args: argparse.Namespace) -> int:
    print(f"{RUNTIME_NAME} {RUNTIME_VERSION} (CRI {CRI_API_VERSION})")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tandem", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the CRI on a unix socket until SIGTERM")
    serve.add_argument("--config", help="TOML config file (default /etc/tandem/tandem.toml if present)")
    serve.add_argument("--socket", help="unix socket path (default /run/tandem/tandem.sock)")
    serve.add_argument("--state-dir", help="persistent state directory (default /var/lib/tandem)")
    serve.add_argument("--log-level", choices=LOG_LEVELS, help="log level (default info)")
    serve.set_defaults(run=_serve)

    doctor = commands.add_parser("doctor", help="check this host and say what to fix")
    doctor.add_argument("--config", help="TOML config file to check")
    doctor.set_defaults(run=_doctor)

    assets = commands.add_parser("assets", help="build the VM guest kernel, initramfs, userland image if stale")
    assets.add_argument("--config", help="TOML config file (default /etc/tandem/tandem.toml if present)")
    assets.add_argument("--state-dir", help="persistent state directory (default /var/lib/tandem)")
    assets.add_argument("--force", action="store_true", help="rebuild even if the inputs did not change")
    assets.set_defaults(run=_assets)

    console = commands.add_parser(
        "console", help="connect this terminal to a VM pod's serial console (Ctrl-] detaches)"
    )
    console.add_argument("pod_id", metavar="POD_ID", help="the pod's ID or a unique prefix of it")
    console.add_argument("--config", help="TOML config file (default /etc/tandem/tandem.toml if present)")
    console.add_argument("--state-dir", help="persistent state directory (default /var/lib/tandem)")
    console.add_argument("--no-log", action="store_true", help="do not print the tail of the console log first")
    console.set_defaults(run=_console)

    config = commands.add_parser("config", help="print the config file or RuntimeClass manifests for this node")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    default = config_commands.add_parser("default", help="the config file: every key at its default, commented")
    default.set_defaults(run=_config_default)
    classes = config_commands.add_parser(
        "runtimeclasses", help="a RuntimeClass per [runtimes.*] handler, VM ones with their overhead.podFixed"
    )
    classes.add_argument("--config", help="TOML config file (default /etc/tandem/tandem.toml if present)")
    classes.set_defaults(run=_runtime_classes)

    version = commands.add_parser("version", help="print the version")
    version.set_defaults(run=_version)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except TandemError as e:
        print(f"tandem: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
