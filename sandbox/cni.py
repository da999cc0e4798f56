"""CNI: which network a pod joins, whether the node's network is ready, and running the plugins.

Follows libcni's rules: the lexically first usable `.conflist`/`.conf`/`.json`
file in the conf dir is the pod network, every plugin it names must exist in
one of the bin dirs, and ADD/DEL run the plugins as libcni does (spec 1.0.0,
also 0.4.0/0.3.1 results). While the conf dir holds no usable file, pods join
the default network (sandbox/default_network.py) instead. There is no result
cache on disk: the caller keeps the `CniAttachment` with its sandbox, so
teardown uses exactly what setup used, whatever the conf dir says by then.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import proc
from core.errors import FailedPrecondition, TandemError, Unavailable
from sandbox import netns as netns_mod

log = logging.getLogger("tandem.cni")

CONF_SUFFIXES = (".conflist", ".conf", ".json")

# CNI error codes that mean the configuration or versions are wrong, so a retry cannot help
# (incompatible version, unsupported field, invalid env, undecodable content, invalid config).
_CONFIG_ERROR_CODES = frozenset({1, 2, 4, 6, 7})


@dataclass(frozen=True)
class NetworkConfigList:
    name: str
    cni_version: str
    plugins: list[dict[str, Any]]
    source: Path

    def conflist(self) -> dict[str, Any]:
        """The network as one conflist document, also when it came from a single-plugin `.conf`."""
        return {"cniVersion": self.cni_version, "name": self.name, "plugins": self.plugins}


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
    if not isinstance(plugins, list) or not plugins or not all(isinstance(p, dict) and p.get("type") for p in plugins):
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


@dataclass(frozen=True)
class PodNetwork:
    """The network new pods join (None: none, pods are refused), and why, in an operator's words."""

    network: NetworkConfigList | None
    is_default: bool
    why: str

    def describe(self) -> dict[str, Any]:
        """For logs, `tandem doctor` and the runtime's Status: name, file, whether it is Tandem's own, why."""
        name, source = (self.network.name, str(self.network.source)) if self.network else ("", "")
        return {"network": name, "source": source, "default": self.is_default, "why": self.why}


def choose_network(conf_dir: Path, default: NetworkConfigList | None) -> PodNetwork:
    """The conf dir's network if it holds one, else the default network (if there is one)."""
    network = find_network(conf_dir)
    if network is not None:
        return PodNetwork(network, False, f"the first valid network config in {conf_dir}")
    if default is not None:
        return PodNetwork(default, True, f"{conf_dir} holds no valid network config")
    return PodNetwork(None, False, f"no valid CNI network config in {conf_dir}")


def _plugin_types(network: NetworkConfigList) -> list[str]:
    """Every plugin the network runs: the chain's, and the IPAM plugins they call."""
    types: list[str] = []
    for plugin in network.plugins:
        ipam = plugin.get("ipam")
        for kind in (plugin["type"], ipam.get("type") if isinstance(ipam, dict) else None):
            if isinstance(kind, str) and kind and kind not in types:
                types.append(kind)
    return types


def readiness(choice: PodNetwork, bin_dirs: tuple[Path, ...]) -> Readiness:
    """NetworkReady as kubelet reads it: a network for new pods whose plugins are installed."""
    if choice.network is None:
        return Readiness(False, "NetworkPluginNotReady", choice.why)
    missing = [t for t in _plugin_types(choice.network) if find_plugin(t, bin_dirs) is None]
    if missing:
        dirs = ", ".join(str(d) for d in bin_dirs)
        return Readiness(
            False,
            "NetworkPluginNotReady",
            f"CNI plugin(s) {', '.join(missing)} of {choice.network.source} not in {dirs}",
        )
    return Readiness(True)


def _fingerprint(conf_dir: Path) -> tuple[tuple[str, int, int, int], ...] | None:
    """What the conf dir's config files are right now (name, inode, mtime, size): a change means re-read."""
    found = []
    try:
        with os.scandir(conf_dir) as entries:
            for entry in entries:
                if entry.name.endswith(CONF_SUFFIXES):
                    try:
                        st = entry.stat()
                    except OSError:  # a dangling symlink: find_network skips it too
                        continue
                    found.append((entry.name, st.st_ino, st.st_mtime_ns, st.st_size))
    except OSError:
        return None
    return tuple(sorted(found))


@dataclass(frozen=True)
class PortMapping:
    """A hostPort, in CRI's terms; handed to plugins with the `portMappings` capability."""

    container_port: int
    host_port: int
    protocol: str = "tcp"
    host_ip: str = ""

    def to_cni(self) -> dict[str, Any]:
        return {
            "hostPort": self.host_port,
            "containerPort": self.container_port,
            "protocol": self.protocol.lower(),
            "hostIP": self.host_ip,
        }


@dataclass
class CniAttachment:
    """What setup did, kept with the sandbox so teardown works even after the conf dir changed."""

    network: dict[str, Any]  # the conflist document that was used
    ifname: str
    result: dict[str, Any]  # the final ADD result

    def ips(self) -> list[str]:
        """The pod's addresses without prefix length, IPv4 first; addresses on host-side interfaces excluded."""
        interfaces = self.result.get("interfaces") or []
        found: list[str] = []
        for ip in self.result.get("ips") or []:
            index = ip.get("interface")
            if isinstance(index, int) and 0 <= index < len(interfaces) and not interfaces[index].get("sandbox"):
                continue  # the bridge or the host end of a veth
            address = str(ip.get("address", "")).partition("/")[0]
            if address and address not in found:
                found.append(address)
        return sorted(found, key=lambda a: ":" in a)

    def to_dict(self) -> dict[str, Any]:
        return {"network": self.network, "ifname": self.ifname, "result": self.result}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CniAttachment:
        return cls(data["network"], data["ifname"], data["result"])


def k8s_args(*, pod_namespace: str, pod_name: str, container_id: str, pod_uid: str) -> str:
    """CNI_ARGS as kubelet's runtimes set it; IgnoreUnknown lets plugins that know none of these keys run."""
    return (
        f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod_namespace};K8S_POD_NAME={pod_name};"
        f"K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={pod_uid}"
    )


def _version(text: str) -> tuple[int, ...]:
    """ "0.4.0" as (0, 4, 0), for comparing spec versions; anything unparsable counts as the oldest."""
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        return (0,)


def _netns_arg(netns: Path | None) -> str:
    """CNI_NETNS: empty when the netns is gone, which the spec allows for DEL (plugins then only free IPs)."""
    return str(netns) if netns is not None and netns_mod.exists(netns) else ""


@dataclass(frozen=True)
class _Invocation:
    """Everything about one pod's plugin calls except the command and the plugin."""

    container_id: str
    netns: str
    ifname: str
    args: str
    runtime_config: dict[str, Any]


def _plugin_error(plugin: str, command: str, done: proc.Completed) -> TandemError:
    """The plugin's JSON error ({code, msg, details} on stdout) as a domain error; stderr if it printed none."""
    try:
        doc = json.loads(done.stdout)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and doc.get("msg"):
        code = doc.get("code")
        text = f"{doc['msg']}: {doc['details']}" if doc.get("details") else str(doc["msg"])
    else:
        code = None
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
        text = "; ".join(tail) or f"exited with {done.returncode}"
    kind = FailedPrecondition if isinstance(code, int) and code in _CONFIG_ERROR_CODES else Unavailable
    return kind(f"CNI plugin {plugin} {command} failed: {text}")


class CniPlugins:
    """Runs the pod network for pods: ADD on setup, DEL on teardown.

    Which network new pods join is decided again whenever the conf dir changed, so a cluster's
    network installed there takes over at once, without a restart. The check is a stat of the
    dir's config files on each use (RunPodSandbox, and kubelet's Status calls every few seconds):
    microseconds for a handful of files, and nothing to keep running, unlike an inotify watch.
    """

    def __init__(
        self,
        conf_dir: Path,
        bin_dirs: tuple[Path, ...],
        timeout: float = 60,
        default: NetworkConfigList | None = None,
    ) -> None:
        self.conf_dir = conf_dir
        self.bin_dirs = bin_dirs
        self.timeout = timeout
        self.default = default
        self._seen: tuple[tuple[str, int, int, int], ...] | None = None
        self._current: PodNetwork | None = None

    def current(self) -> PodNetwork:
        """The network new pods join now; a change (or the first look) is logged with the reason."""
        seen = _fingerprint(self.conf_dir)
        if self._current is None or seen != self._seen:
            choice = choose_network(self.conf_dir, self.default)
            if self._current is None or choice.describe() != self._current.describe():
                log.info("pod network", extra=choice.describe())
            self._current, self._seen = choice, seen
        return self._current

    def readiness(self) -> Readiness:
        return readiness(self.current(), self.bin_dirs)

    async def setup(
        self,
        container_id: str,
        netns: Path,
        *,
        pod_name: str,
        pod_namespace: str,
        pod_uid: str,
        port_mappings: list[PortMapping],
        network: NetworkConfigList | None = None,
        ifname: str = "eth0",
    ) -> CniAttachment:
        """ADD every plugin of `network` (default: the one new pods join now) in order; on failure,
        DEL what may have been added, then raise."""
        if network is None:
            network = self.network_for_new_pod()
        conflist = network.conflist()
        call = self._invocation(container_id, str(netns), ifname, pod_name, pod_namespace, pod_uid, port_mappings)
        result: dict[str, Any] = {}
        for i, plugin in enumerate(conflist["plugins"]):
            try:
                result = await self._exec("ADD", conflist, plugin, call, result)
            except BaseException:
                # The failing plugin may have half-succeeded (bridge with an IP already leased), so it gets DEL too.
                undo = dataclasses.replace(call, netns=_netns_arg(netns))
                with contextlib.suppress(TandemError):
                    await self._delete(conflist, conflist["plugins"][: i + 1], undo, result)
                raise
        return CniAttachment(conflist, ifname, result)

    def network_for_new_pod(self) -> NetworkConfigList:
        choice = self.current()
        if choice.network is None:
            raise FailedPrecondition(choice.why)
        return choice.network

    async def teardown(
        self,
        container_id: str,
        netns: Path | None,
        attachment: CniAttachment,
        *,
        pod_name: str,
        pod_namespace: str,
        pod_uid: str,
        port_mappings: list[PortMapping],
    ) -> None:
        """DEL in reverse order with the stored result; idempotent, and frees IP leases even without the netns."""
        call = self._invocation(
            container_id, _netns_arg(netns), attachment.ifname, pod_name, pod_namespace, pod_uid, port_mappings
        )
        await self._delete(attachment.network, attachment.network["plugins"], call, attachment.result)

    def _invocation(
        self,
        container_id: str,
        netns: str,
        ifname: str,
        pod_name: str,
        pod_namespace: str,
        pod_uid: str,
        port_mappings: list[PortMapping],
    ) -> _Invocation:
        # Like containerd: only ports actually published on the host are the portmap plugin's business.
        ports = [p.to_cni() for p in port_mappings if p.host_port > 0]
        args = k8s_args(pod_namespace=pod_namespace, pod_name=pod_name, container_id=container_id, pod_uid=pod_uid)
        return _Invocation(container_id, netns, ifname, args, {"portMappings": ports} if ports else {})

    async def _delete(
        self,
        conflist: dict[str, Any],
        plugins: Iterable[dict[str, Any]],
        call: _Invocation,
        prev: dict[str, Any],
    ) -> None:
        """DEL each plugin, last first; all are tried so a failing one cannot strand the IP lease of another."""
        first: TandemError | None = None
        for plugin in reversed(list(plugins)):
            try:
                await self._exec("DEL", conflist, plugin, call, prev)
            except TandemError as e:
                log.warning("CNI DEL of %s for %s: %s", plugin.get("type"), call.container_id, e)
                first = first or e
        if first is not None:
            raise first

    async def _exec(
        self,
        command: str,
        conflist: dict[str, Any],
        plugin: dict[str, Any],
        call: _Invocation,
        prev: dict[str, Any],
    ) -> dict[str, Any]:
        """Run one plugin as libcni does; its parsed result for ADD, {} otherwise."""
        kind = str(plugin["type"])
        path = find_plugin(kind, self.bin_dirs)
        if path is None:
            dirs = ", ".join(str(d) for d in self.bin_dirs)
            raise FailedPrecondition(f"CNI plugin {kind} not in {dirs}")
        conf = {**plugin, "name": conflist["name"], "cniVersion": conflist["cniVersion"]}
        declared = plugin.get("capabilities")
        if isinstance(declared, dict):
            runtime = {k: v for k, v in call.runtime_config.items() if declared.get(k)}
            if runtime:
                conf["runtimeConfig"] = runtime
        # libcni hands DEL the cached result only from 0.4.0 on; ADD chains results in every version.
        if prev and (command == "ADD" or _version(conflist["cniVersion"]) >= (0, 4, 0)):
            conf["prevResult"] = prev
        env = {
            **os.environ,
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": call.container_id,
            "CNI_NETNS": call.netns,
            "CNI_IFNAME": call.ifname,
            "CNI_PATH": os.pathsep.join(str(d) for d in self.bin_dirs),
            "CNI_ARGS": call.args,
        }
        done = await proc.run([path], input=json.dumps(conf).encode(), env=env, timeout=self.timeout, check=False)
        if done.returncode != 0:
            raise _plugin_error(kind, command, done)
        if command != "ADD":
            return {}
        try:
            result = json.loads(done.stdout)
        except ValueError:
            result = None
        if not isinstance(result, dict):
            raise Unavailable(f"CNI plugin {kind} ADD printed no result: {done.stdout[:200]!r}")
        return result
