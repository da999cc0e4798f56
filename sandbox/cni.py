"""CNI configuration discovery: which network a pod will join, and whether the node's network is ready.

Follows libcni's rules: the lexically first usable `.conflist`/`.conf`/`.json`
file in the conf dir is the pod network, and every plugin it names must exist
in one of the bin dirs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONF_SUFFIXES = (".conflist", ".conf", ".json")


@dataclass(frozen=True)
class NetworkConfigList:
    name: str
    cni_version: str
    plugins: list[dict[str, Any]]
    source: Path


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str = ""
    message: str = ""


def _parse(path: Path) -> NetworkConfigList:
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    plugins = doc.get("plugins") if path.suffix == ".conflist" else [doc]
    if (
        not isinstance(plugins, list)
        or not plugins
        or not all(isinstance(p, dict) and p.get("type") for p in plugins)
    ):
        raise ValueError("no plugins with a type")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("no network name")
    return NetworkConfigList(name, str(doc.get("cniVersion", "")), plugins, path)


def find_network(conf_dir: Path) -> NetworkConfigList | None:
    """The pod network: the first config file in `conf_dir` that parses."""
    if not conf_dir.is_dir():
        return None
    for path in sorted(p for p in conf_dir.iterdir() if p.suffix in CONF_SUFFIXES):
        try:
            return _parse(path)
        except (OSError, ValueError):
            continue
    return None


def find_plugin(plugin: str, bin_dirs: tuple[Path, ...]) -> Path | None:
    for d in bin_dirs:
        candidate = d / plugin
        if candidate.is_file():
            return candidate
    return None


def readiness(conf_dir: Path, bin_dirs: tuple[Path, ...]) -> Readiness:
    """NetworkReady as kubelet reads it: a usable network config whose plugins are installed."""
    network = find_network(conf_dir)
    if network is None:
        return Readiness(False, "NetworkPluginNotReady", f"no valid CNI network config in {conf_dir}")
    missing = [p["type"] for p in network.plugins if find_plugin(p["type"], bin_dirs) is None]
    if missing:
        dirs = ", ".join(str(d) for d in bin_dirs)
        return Readiness(
            False,
            "NetworkPluginNotReady",
            f"CNI plugin(s) {', '.join(missing)} of {network.source} not in {dirs}",
        )
    return Readiness(True)
