"""The one way Tandem runs external programs (runc, conmon, QEMU, CNI plugins, ...).

Every call is logged, bounded by a timeout, and a failure becomes a
`CommandFailed` carrying the program's stderr.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from core.errors import CommandFailed, DeadlineExceeded, Unavailable

log = logging.getLogger("tandem.proc")


@dataclass(frozen=True)
class Completed:
    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes


async def run(
    argv: Sequence[str],
    *,
    timeout: float = 60.0,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    check: bool = True,
) -> Completed:
    """Run `argv` to completion; raise `CommandFailed` on a non-zero exit when `check`."""
    args = [str(a) for a in argv]
    log.debug("exec %s", shlex.join(args))
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    except FileNotFoundError as e:
        raise Unavailable(f"{args[0]} is not installed (run `tandem doctor`)") from e
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(input), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise DeadlineExceeded(f"{args[0]} did not finish within {timeout:g}s") from None
    except asyncio.CancelledError:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    assert proc.returncode is not None
    result = Completed(args, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise CommandFailed(args, proc.returncode, stderr.decode(errors="replace"))
    return result
