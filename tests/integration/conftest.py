"""Pod fixtures shared by the integration tests: a real daemon on a private network, busybox pulled."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.settings import Config
from protos import cri_pb2 as pb
from tests.support.daemon import TandemDaemon
from tests.support.network import PrivateNetwork, write_bridge_network
from tests.support.pods import remove_pods_and_stop, warm_pool
from tests.support.wait import wait_for
from vm_backend.guest_image import GuestAssets, assets_root
from vm_backend.guest_image.inputs import resolve_inputs
from vm_backend.guest_image.store import load as load_assets


@dataclass
class PodEnv:
    daemon: TandemDaemon
    image: str  # busybox, pulled
    tmp: Path  # the daemon's workdir; pod logs go to tmp/logs
    network: PrivateNetwork


@pytest.fixture
def pod_env(tmp_path: Path, busybox_ref: str) -> Iterator[Callable[[str], PodEnv]]:
    """Factory: `pod_env(config_toml)` starts a daemon whose conf dir holds a private bridge network.

    Teardown removes every pod (restarting a daemon a test left stopped), then stops it and deletes the bridge.
    """
    made: list[PodEnv] = []

    def make(config_toml: str = "") -> PodEnv:
        network = write_bridge_network(tmp_path / "net.d")
        env = PodEnv(TandemDaemon.isolated(tmp_path, config_toml), busybox_ref, tmp_path, network)
        made.append(env)
        env.daemon.start()
        env.daemon.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=busybox_ref)))
        return env

    yield make
    for env in made:
        if env.daemon.process is None:
            env.daemon.start()
        remove_pods_and_stop(env.daemon, env.tmp, env.network.bridge)


@pytest.fixture(scope="session")
def guest_assets(tmp_path_factory: pytest.TempPathFactory) -> GuestAssets:
    """The guest assets `make setup` built from this checkout for the default state dir (their absence fails the
    test), hard-linked into the session's tmp: a rebuild of the shared state dir during the run (another
    checkout's `make setup` replaces and deletes them) cannot pull them away from under the tests."""
    root = assets_root(Config().state_dir)
    digest = asyncio.run(resolve_inputs()).digest()  # this checkout's agent: another checkout may own `current`
    assets = load_assets(root / digest)
    if assets is None:
        pytest.fail(f"no guest assets built from this checkout ({digest}) under {root}: run `make setup`")
    copy = tmp_path_factory.mktemp("guest-assets") / assets.dir.name
    shutil.copytree(assets.dir, copy, copy_function=os.link)
    return dataclasses.replace(
        assets,
        dir=copy,
        kernel=copy / assets.kernel.relative_to(assets.dir),
        initramfs=copy / assets.initramfs.relative_to(assets.dir),
        userland=copy / assets.userland.relative_to(assets.dir),
    )


def _vm_env(pod_env: Callable[[str], PodEnv], guest_assets: GuestAssets, tmp_path: Path, vm_config: str) -> PodEnv:
    root = assets_root(tmp_path / "state")
    root.mkdir(parents=True)
    (root / "current").symlink_to(guest_assets.dir)
    return pod_env(f'[vm]\naccel = "tcg"\n{vm_config}')


@pytest.fixture
def vm_pod_env(pod_env: Callable[[str], PodEnv], guest_assets: GuestAssets, tmp_path: Path) -> PodEnv:
    """A pod daemon that boots VM pods (TCG) from the assets `make setup` built, each for its pod."""
    return _vm_env(pod_env, guest_assets, tmp_path, "")


@pytest.fixture
def vm_pool_env(pod_env: Callable[[str], PodEnv], guest_assets: GuestAssets, tmp_path: Path) -> PodEnv:
    """`vm_pod_env` with a warm pool of one VM, booted (its agent answered) before the test begins."""
    env = _vm_env(pod_env, guest_assets, tmp_path, "warm_pool = 1\n")
    wait_for(lambda: warm_pool(env.daemon)["ready"] == 1, 180, "the warm pool to fill")
    return env


@pytest.fixture(params=[False, True], ids=["cold", "warm-pool"])
def vm_either_env(request: pytest.FixtureRequest) -> PodEnv:
    """VM pods booted for them, then (the same test again) from a warm pool."""
    return request.getfixturevalue("vm_pool_env" if request.param else "vm_pod_env")
