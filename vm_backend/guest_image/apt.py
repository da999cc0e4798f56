"""The guest's Debian packages through the host's apt: versions, downloads, unpacking.

Packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x`
into a build directory: nothing is ever installed on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from core import proc
from core.errors import FailedPrecondition
from core.files import private_dir

Progress = Callable[[str], None]
"""Where a long step reports what it is doing (a line for the operator)."""


def parse_records(text: str) -> dict[str, dict[str, str]]:
    """`apt-cache show` output -> {package: {field: value}} (first record of each package wins)."""
    records: dict[str, dict[str, str]] = {}
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(" "))
        if "Package" in fields:
            records.setdefault(fields["Package"], fields)
    return records


async def show(packages: list[str], update: bool) -> dict[str, dict[str, str]]:
    """The candidate record of each package; with `update`, a failed lookup runs `apt-get update` once."""
    argv = ["apt-cache", "show", "--no-all-versions", *packages]
    result = await proc.run(argv, check=False, timeout=120)
    if result.returncode != 0 and update:
        await proc.run(["apt-get", "update", "-q"], timeout=600)
        result = await proc.run(argv, check=False, timeout=120)
    if result.returncode != 0:
        raise FailedPrecondition(
            f"apt-cache cannot find the guest packages ({result.stderr.decode(errors='replace').strip()}); "
            "run `apt-get update`"
        )
    return parse_records(result.stdout.decode())


def _deb_prefix(package: str, version: str) -> str:
    """The file name `apt-get download` gives a package, up to the architecture."""
    return f"{package}_{version.replace(':', '%3a')}_"


async def download(cache: Path, packages: dict[str, str], progress: Progress) -> list[Path]:
    """The packages' .deb files, from the cache or `apt-get download`; stale cached .debs are removed."""
    private_dir(cache)

    def cached(package: str, version: str) -> Path | None:
        return next(iter(sorted(cache.glob(f"{_deb_prefix(package, version)}*.deb"))), None)

    missing = [f"{p}={v}" for p, v in packages.items() if cached(p, v) is None]
    if missing:
        progress(f"downloading {len(missing)} Debian packages: {' '.join(missing)}")
        await proc.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *missing], cwd=cache, timeout=900)
    debs = []
    for package, version in packages.items():
        deb = cached(package, version)
        if deb is None:
            raise FailedPrecondition(f"apt-get download left no .deb for {package}={version} in {cache}")
        debs.append(deb)
    for stale in set(cache.glob("*.deb")) - set(debs):
        stale.unlink()
    return debs


async def unpack(debs: list[Path], dest: Path) -> None:
    """Unpack every package's files into `dest`, in order (a later package's file wins)."""
    for deb in debs:
        await proc.run(["dpkg-deb", "-x", str(deb), str(dest)], timeout=300)
