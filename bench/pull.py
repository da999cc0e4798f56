"""Image pull time, Tandem vs containerd, side by side in one run.

    .venv/bin/python -m bench.pull [--samples N] [--warmup N] [--workload NAME ...] [--keep]

Prints one table row per sample and, per workload, the median Tandem time, the
median containerd time and the median of per-sample ratios Tandem/containerd
with their min and max (goal: ratio <= 1.0).

What keeps the comparison fair on a small, noisy machine:
- everything is started here, in one temp dir on one filesystem: a LocalRegistry,
  an isolated Tandem and a private containerd (bench.containerd), both with the
  same registry mirrors; all of it is stopped again, also on failure or SIGTERM;
- one Python gRPC client (ImageService PullImage/RemoveImage over unix sockets)
  drives both, so client overhead is identical;
- runs alternate Tandem, containerd, Tandem, containerd..., so drift in machine
  load hits both sides alike, and ratios are taken per pair, not per side;
- every timed run starts from an empty image store (checked on disk, not
  trusted from the API) and after a sync(), so nobody pays for the writeback of
  the other's (or the registry's) dirty pages;
- one untimed warm-up sample per workload (imports, connection pools);
- every pull is checked afterwards (image ID or repo digest), untimed.

Workloads:
- pull-20-layers: a 20-layer image (busybox + 19 layers of ~400 KiB of half
  random, half hex data), a fresh variant per sample (a nonce in every layer),
  so no cache anywhere helps either side;
- pull-critest-images: every ref in the critest mirror's images.txt, pulled by
  the names critest uses (registry.k8s.io, gcr.io, ...) through mirrors to the
  registry on 127.0.0.1:5000; all images are removed between samples.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import grpc
import httpx

from bench.containerd import ContainerdInstance, installed
from protos import cri_pb2 as pb
from protos import cri_pb2_grpc
from tests.support.daemon import TandemDaemon
from tests.support.images import (
    CREATED,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    PATH_ENV,
    Blob,
    Image,
    busybox_layer,
    push,
    sha256_digest,
)
from tests.support.registry import REGISTRY_BIN, LocalRegistry

CRITEST_MIRROR_DIR = Path("/var/tmp/critest-mirror")
CRITEST_REGISTRY = "127.0.0.1:5000"
# the hosts critest pulls from, plus docker.io for images.txt entries critest does not know
CRITEST_HOSTS = ("registry.k8s.io", "gcr.io", "k8s.gcr.io", "docker.io")

LAYERS = 20
FILES_PER_LAYER = 8
FILE_BYTES = 48 * 1024
PULL_TIMEOUT = 600.0
EMPTY_TIMEOUT = 60.0


# ---- the runtimes under test ------------------------------------------------------------------


@dataclass
class Side:
    """One runtime as the benchmark drives it: its ImageService, and where its content lives on disk."""

    name: str
    images: cri_pb2_grpc.ImageServiceStub
    leftovers: Callable[[], list[Path]]
    slowest_cleanup: float = 0.0  # longest wait for content to leave the disk after RemoveImage returned

    def pull(self, ref: str) -> str:
        request = pb.PullImageRequest(image=pb.ImageSpec(image=ref))
        return str(self.images.PullImage(request, timeout=PULL_TIMEOUT).image_ref)

    def remove_all(self) -> None:
        for image in self.images.ListImages(pb.ListImagesRequest(), timeout=60).images:
            self.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image.id)), timeout=60)

    def wait_empty(self) -> float:
        """Wait until no image content is left on disk; returns how long that took."""
        started = time.monotonic()
        while left := self.leftovers():
            if time.monotonic() - started > EMPTY_TIMEOUT:
                shown = ", ".join(str(p) for p in left[:5])
                raise RuntimeError(f"{self.name}: content still on disk {EMPTY_TIMEOUT}s after removal: {shown}")
            time.sleep(0.02)
        return time.monotonic() - started

    def repo_digests(self, ref: str) -> list[str]:
        status = self.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)), timeout=60)
        return list(status.image.repo_digests)


def tandem_leftovers(state_dir: Path) -> Callable[[], list[Path]]:
    root = state_dir / "images"
    dirs = (root / "layers" / "sha256", root / "blobs" / "sha256", root / "blobs" / "ingest")
    return lambda: [entry for d in dirs if d.is_dir() for entry in d.iterdir()]


def mirror_config_toml(mirrors: dict[str, str]) -> str:
    lines = ["[registry.mirrors]", *(f'"{host}" = ["{endpoint}"]' for host, endpoint in mirrors.items())]
    return "\n".join(lines) + "\n"


# ---- workloads --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pull:
    """A reference to pull and what must come out: the image ID or a manifest digest among repo_digests."""

    ref: str
    image_id: str = ""
    manifest_digest: str = ""


@dataclass
class Workload:
    name: str
    prepare: Callable[[int], list[Pull]]  # sample index -> what to pull in that sample (pushing if need be)
    pairs: list[tuple[float, float]] = field(default_factory=list)


def _data_layer(index: int, nonce: bytes) -> tuple[Blob, str]:
    """~400 KiB per layer, half random and half hex text: gzip has real work, downloads real bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, data: bytes | None) -> None:
            info = tarfile.TarInfo(name)
            info.mtime = 1704067200
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))

        add("data", None)
        add(f"data/{index}", None)
        add(f"data/{index}/nonce", nonce)
        for j in range(FILES_PER_LAYER):
            add(f"data/{index}/f{j}", os.urandom(FILE_BYTES // 2) + os.urandom(FILE_BYTES // 4).hex().encode())
    raw = buf.getvalue()
    return Blob(OCI_LAYER, gzip.compress(raw, compresslevel=6, mtime=0)), sha256_digest(raw)


def layered_variant(nonce: bytes) -> Image:
    """A 20-layer OCI image whose every layer, and so every digest, depends on `nonce`."""
    base = busybox_layer("oci", {"nonce": nonce})
    layers = [(base.blob, base.diff_id), *(_data_layer(i, nonce) for i in range(1, LAYERS))]
    config = {
        "created": CREATED,
        "os": "linux",
        "architecture": "amd64",
        "config": {"Env": [PATH_ENV], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]},
        "history": [{"created": CREATED, "created_by": "bench.pull"} for _ in layers],
    }
    config_blob = Blob(OCI_CONFIG, json.dumps(config, sort_keys=True).encode())
    return Image(OCI_MANIFEST, config_blob, tuple(blob for blob, _ in layers))


def layered_workload(registry: LocalRegistry) -> Workload:
    def prepare(sample: int) -> list[Pull]:
        image = layered_variant(secrets.token_hex(16).encode())
        push(registry.host, "bench/layered", f"s{sample}", image)
        return [Pull(f"{registry.host}/bench/layered:s{sample}", image_id=image.config.digest)]

    return Workload(f"pull-{LAYERS}-layers", prepare)


def critest_pulls(mirror_dir: Path) -> list[Pull]:
    """images.txt lists `localhost:5000/<path>:<tag>\\t<digest>`; critest asks for them by upstream names."""
    pulls = []
    for line in (mirror_dir / "images.txt").read_text().splitlines():
        if not line.strip():
            continue
        mirrored, digest = line.split()
        path = mirrored.split("/", 1)[1]
        if path.startswith("k8s-staging-cri-tools/"):
            host = "gcr.io"
        elif path.startswith("e2e-test-images/") or path.startswith("pause:"):
            host = "registry.k8s.io"
        else:
            host = "docker.io"
        pulls.append(Pull(f"{host}/{path}", manifest_digest=digest))
    return pulls


def registry_answers(host: str) -> bool:
    try:
        return httpx.get(f"http://{host}/v2/", timeout=2.0).status_code == 200
    except httpx.TransportError:
        return False


@contextlib.contextmanager
def critest_registry(mirror_dir: Path) -> Iterator[None]:
    """Use the critest mirror registry; if it is down but was built here, run it until we are done."""
    if not (mirror_dir / "images.txt").exists():
        raise MirrorUnavailable(
            f"no {mirror_dir / 'images.txt'}; build the mirror as /work/shared/critest-mirror/README.md says "
            f"(OUT_DIR={mirror_dir} /work/shared/critest-mirror/build-mirror.sh)"
        )
    if registry_answers(CRITEST_REGISTRY):
        yield
        return
    config = mirror_dir / "registry-config.yml"
    if not (config.exists() and REGISTRY_BIN.exists()):
        raise MirrorUnavailable(
            f"nothing answers on http://{CRITEST_REGISTRY}/v2/ and there is no built mirror in {mirror_dir}; "
            "build it as /work/shared/critest-mirror/README.md says "
            f"(OUT_DIR={mirror_dir} /work/shared/critest-mirror/build-mirror.sh)"
        )
    print(f"# starting the critest mirror registry ({config}) for this run")
    log = (mirror_dir / "registry.log").open("ab")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}  # as LocalRegistry does
    proc = subprocess.Popen(
        [str(REGISTRY_BIN), "serve", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
    )
    log.close()
    try:
        deadline = time.monotonic() + 15
        while not registry_answers(CRITEST_REGISTRY):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise MirrorUnavailable(f"docker-registry did not come up on {CRITEST_REGISTRY}; see {log.name}")
            time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


class MirrorUnavailable(RuntimeError):
    pass


# ---- running and reporting --------------------------------------------------------------------


def timed_run(side: Side, pulls: Sequence[Pull]) -> float:
    """Pull everything into an empty store, one ref after another as kubelet or critest would."""
    side.wait_empty()
    os.sync()
    started = time.perf_counter()
    for p in pulls:
        side.pull(p.ref)
    elapsed = time.perf_counter() - started
    check(side, pulls)
    side.remove_all()
    side.slowest_cleanup = max(side.slowest_cleanup, side.wait_empty())
    return elapsed


def check(side: Side, pulls: Sequence[Pull]) -> None:
    """Untimed: both runtimes must have pulled exactly the content asked for."""
    for p in pulls:
        if p.image_id:
            status = side.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=p.ref)), timeout=60)
            if status.image.id != p.image_id:
                raise RuntimeError(f"{side.name}: {p.ref} has image ID {status.image.id!r}, expected {p.image_id}")
        if p.manifest_digest and not any(d.endswith(f"@{p.manifest_digest}") for d in side.repo_digests(p.ref)):
            raise RuntimeError(f"{side.name}: {p.ref} was not pulled at {p.manifest_digest}")


def run_workload(workload: Workload, sides: Sequence[Side], samples: int, warmup: int) -> None:
    for sample in range(-warmup, samples):
        pulls = workload.prepare(sample + warmup)
        tandem, containerd = (timed_run(side, pulls) for side in sides)
        label = "warm-up" if sample < 0 else str(sample + 1)
        if sample >= 0:
            workload.pairs.append((tandem, containerd))
        print(
            f"{workload.name:<22} {label:>7} {tandem:>9.3f}s {containerd:>10.3f}s {tandem / containerd:>7.2f}",
            flush=True,
        )


def summary(workload: Workload) -> str:
    ratios = [t / c for t, c in workload.pairs]
    return (
        f"{workload.name}: tandem {statistics.median(t for t, _ in workload.pairs):.2f}s "
        f"containerd {statistics.median(c for _, c in workload.pairs):.2f}s "
        f"ratio {statistics.median(ratios):.2f} (min {min(ratios):.2f} max {max(ratios):.2f})"
    )


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds the ExitStack: everything started gets stopped


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except (RuntimeError, grpc.RpcError) as e:  # everything started is stopped by now
        print(f"bench.pull: failed: {e}", file=sys.stderr)
        return 1


def _run(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pull", description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=5, help="timed samples per workload (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed samples first (default 1)")
    parser.add_argument(
        "--workload",
        action="append",
        choices=[f"pull-{LAYERS}-layers", "pull-critest-images"],
        help="run only this workload (repeatable; default: all)",
    )
    parser.add_argument("--critest-mirror", type=Path, default=CRITEST_MIRROR_DIR, help="built critest mirror dir")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, configs) for inspection")
    args = parser.parse_args(argv)
    if args.samples < 1 or args.warmup < 0:
        parser.error("--samples must be >= 1 and --warmup >= 0")
    if not installed():
        print("containerd is not installed; it is the reference: apt-get install containerd", file=sys.stderr)
        return 1
    selected = args.workload or [f"pull-{LAYERS}-layers", "pull-critest-images"]
    signal.signal(signal.SIGTERM, _sigterm)
    failed = False

    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="tandem-bench-pull-"))
        if args.keep:
            stack.callback(print, f"# work dir kept: {workdir}")
        else:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        registry = stack.enter_context(LocalRegistry())
        mirrors = {host: f"http://{CRITEST_REGISTRY}" for host in CRITEST_HOSTS}
        mirrors[registry.host] = f"http://{registry.host}"

        (workdir / "tandem").mkdir()
        tandem = TandemDaemon.isolated(workdir / "tandem", mirror_config_toml(mirrors))
        stack.callback(_stop_tandem, tandem)
        tandem.start()
        containerd = ContainerdInstance(workdir / "containerd", mirrors)
        stack.callback(containerd.stop)
        containerd.start()
        sides = (
            Side("tandem", tandem.images, tandem_leftovers(tandem.state_dir)),
            Side("containerd", containerd.images, containerd.content_files),
        )
        versions = f"{_version(tandem.runtime)} vs {_version(containerd.runtime)}"
        print(f"# {versions}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        print(f"# {args.samples} samples per workload after {args.warmup} warm-up; runs alternate tandem, containerd")
        print(f"{'workload':<22} {'sample':>7} {'tandem':>10} {'containerd':>11} {'ratio':>7}")

        done: list[Workload] = []
        if f"pull-{LAYERS}-layers" in selected:
            workload = layered_workload(registry)
            run_workload(workload, sides, args.samples, args.warmup)
            done.append(workload)
        if "pull-critest-images" in selected:
            try:
                with critest_registry(args.critest_mirror):
                    pulls = critest_pulls(args.critest_mirror)
                    workload = Workload("pull-critest-images", lambda _sample: pulls)
                    run_workload(workload, sides, args.samples, args.warmup)
                    done.append(workload)
            except MirrorUnavailable as e:
                print(f"pull-critest-images: SKIPPED: {e}", file=sys.stderr)
                failed = True
        cleanup = ", ".join(f"{side.name} {side.slowest_cleanup * 1000:.0f} ms" for side in sides)
        print(f"# image content gone from disk at most this long after RemoveImage returned: {cleanup}")
        print()
        for workload in done:
            print(summary(workload))
    return 1 if failed else 0


def _stop_tandem(daemon: TandemDaemon) -> None:
    try:
        daemon.stop()
    except subprocess.TimeoutExpired:
        daemon.kill()


def _version(runtime: cri_pb2_grpc.RuntimeServiceStub) -> str:
    v = runtime.Version(pb.VersionRequest(), timeout=10)
    return f"{v.runtime_name} {v.runtime_version}"


if __name__ == "__main__":
    sys.exit(main())
