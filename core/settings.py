"""Tandem's configuration: one TOML file, every key with a default that works on a fresh Debian host.

The names under `default_workload_trust`, `[runtimes.*]` and `[registry]` are a
contract with scripts outside the project (see design §9). Unknown keys are
errors, so a typo stops the daemon instead of being silently ignored.

Every layer reads its settings from here, so this module imports nothing of
Tandem but `core`. Each part of the daemon gets only its own section (and the
directories it owns), handed to it by the composition root (`cri/server.py`).
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from core.errors import InvalidArgument

DEFAULT_CONFIG_PATH = Path("/etc/tandem/tandem.toml")
BACKENDS = ("runc", "vm")
TRUST_LEVELS = ("trusted", "untrusted")
LOG_LEVELS = ("debug", "info", "warning", "error")
ACCELS = ("auto", "kvm", "tcg")
HOST_POD_POLICIES = ("runc", "refuse")


class ConfigError(InvalidArgument):
    """A config file that cannot be used; the message names the file, the key and the reason."""


T = TypeVar("T")


@dataclass
class RegistrySettings:
    """`[registry]` in the config: which hosts may be plain HTTP, and mirrors per registry domain."""

    insecure: list[str] = field(default_factory=list)
    mirrors: dict[str, list[str]] = field(default_factory=dict)
    timeout: float = 60.0
    max_manifest_bytes: int = 4 * 2**20
    max_token_bytes: int = 2**20  # a token answer; real ones are a few KiB


@dataclass(frozen=True)
class RuntimeHandler:
    """One `[runtimes.<name>]` entry: a RuntimeClass handler and the backend that serves it."""

    name: str
    backend: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageSettings:
    allow_device_nodes: bool = False
    max_layers: int = 128
    max_layer_bytes: int = 32 * 2**30
    max_layer_entries: int = 500_000
    parallel_downloads: int = 4


@dataclass(frozen=True)
class DefaultNetworkSettings:
    """Tandem's own pod network, joined while `[cni] conf_dir` holds no valid network.

    10.157.0.0/24 is outside every default we know of: containerd's and CRI-O's examples and
    podman (10.88/16, 10.89.x/24), Kubernetes services (10.96/12), flannel and kind (10.244/16),
    k3s (10.42/16, 10.43/16), weave (10.32/12), microk8s (10.1/16, 10.152.183/24), OpenShift
    (10.128/14, 172.30/16), docker (172.17-31/16, 192.168/16) and calico (192.168/16). A /24 holds
    253 pods, more than kubelet's default max-pods (110), and claims little of the node's network.
    """

    enabled: bool = True  # False: no network until one is installed in conf_dir (containerd's behaviour)
    bridge: str = "tandem0"
    subnet: str = "10.157.0.0/24"
    masquerade: bool = True  # NAT the pods' traffic out of the node; off where the subnet is routed


@dataclass(frozen=True)
class CniSettings:
    conf_dir: Path = Path("/etc/cni/net.d")
    bin_dirs: tuple[Path, ...] = (Path("/opt/cni/bin"), Path("/usr/lib/cni"))
    default: DefaultNetworkSettings = field(default_factory=DefaultNetworkSettings)


@dataclass(frozen=True)
class StreamingSettings:
    """Where the exec/attach/port-forward server listens; its one-time URLs are the only access control."""

    address: str = "127.0.0.1"
    port: int = 0  # 0: any free port (the URLs name the one chosen)
    token_ttl_seconds: int = 60


JAIL_UID_FIRST = 0x70000000  # 1879048192: above systemd's container range, below 2**31 (see README)
JAIL_UID_COUNT = 65536


@dataclass(frozen=True)
class VmSettings:
    """The untrusted path's micro-VMs: accelerator choice, size and its caps, boot deadline, programs, the jail."""

    accel: str = "auto"  # auto: KVM if a probe guest boots on it, else TCG (with a warning)
    default_vcpus: int = 1
    default_memory_mib: int = 256
    max_vcpus: int | None = None  # None: the node's CPU count
    max_memory_mib: int | None = None  # None: 3/4 of the node's MemTotal
    jail: bool = True  # False only to measure what the jail costs: QEMU then runs as root, unconfined
    jail_uid_first: int = JAIL_UID_FIRST  # each VM's QEMU runs as its own uid (= gid) from this range
    jail_uid_count: int = JAIL_UID_COUNT
    boot_timeout_seconds: float = 30.0  # TCG boots take ~2-3 s; a hung boot is killed and retried once
    qemu: Path = Path("/usr/bin/qemu-system-x86_64")
    virtiofsd: Path = Path("/usr/lib/qemu/virtiofsd")


@dataclass(frozen=True)
class PolicySettings:
    """`[policy]`: what a pod that wants the host gets on a node whose default trust is untrusted."""

    host_pods_on_untrusted_node: str = "refuse"  # or "runc"; see README, Trust dispatch


@dataclass(frozen=True)
class Config:
    default_workload_trust: str = "trusted"
    socket: Path = Path("/run/tandem/tandem.sock")
    state_dir: Path = Path("/var/lib/tandem")
    runtime_dir: Path = Path("/run/tandem")
    log_level: str = "info"
    runtimes: dict[str, RuntimeHandler] = field(
        default_factory=lambda: {b: RuntimeHandler(name=b, backend=b) for b in BACKENDS}
    )
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    images: ImageSettings = field(default_factory=ImageSettings)
    cni: CniSettings = field(default_factory=CniSettings)
    vm: VmSettings = field(default_factory=VmSettings)
    streaming: StreamingSettings = field(default_factory=StreamingSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    source: str = "embedded defaults"

    def trust(self) -> TrustSettings:
        return TrustSettings(
            default_workload_trust=self.default_workload_trust,
            runtimes=self.runtimes,
            host_pods_on_untrusted_node=self.policy.host_pods_on_untrusted_node,
        )

    def runc_backend(self) -> RuncBackendSettings:
        return RuncBackendSettings(
            run_dir=self.runtime_dir / "runc", state_dir=self.state_dir / "runc", attach_dir=self.runtime_dir / "a"
        )

    def vm_backend(self) -> VmBackendSettings:
        return VmBackendSettings(vm=self.vm, run_dir=self.runtime_dir / "vm", state_dir=self.state_dir)


@dataclass(frozen=True)
class TrustSettings:
    """What trust dispatch decides by: the default trust, the RuntimeClass handlers and `[policy]`."""

    default_workload_trust: str
    runtimes: dict[str, RuntimeHandler]
    host_pods_on_untrusted_node: str  # [policy]: "runc" or "refuse"


@dataclass(frozen=True)
class RuncBackendSettings:
    """What the runc backend owns: no config keys of its own, only its directories."""

    run_dir: Path  # runc's state, bundles, exit files, pod dirs (tmpfs: gone on reboot, as the containers are)
    state_dir: Path  # writable layers and the infra containers' root
    attach_dir: Path  # conmon's attach-socket links: short, as a unix socket path must be


@dataclass(frozen=True)
class VmBackendSettings:
    """What the VM backend owns: `[vm]`, the VMs' run dirs, and its part of the state dir."""

    vm: VmSettings
    run_dir: Path  # one run dir per pod VM
    state_dir: Path  # the daemon's state dir: guest assets, the accelerator choice and layers live under vm/


class _Reader:
    """Walks one TOML table, typing each key and remembering which keys were used."""

    def __init__(self, source: str, prefix: str, table: dict[str, Any]) -> None:
        self.source = source
        self.prefix = prefix
        self.table = table
        self.used: set[str] = set()

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"config {self.source}: key '{self.prefix}{key}': {reason}")

    def _value(self, key: str, kinds: tuple[type, ...]) -> object | None:
        """The key's value if it is set (None if not), refused unless it is one of `kinds` (a bool is no int)."""
        self.used.add(key)
        if key not in self.table:
            return None
        value = self.table[key]
        if (int in kinds and isinstance(value, bool)) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.fail(key, f"must be a {names}, got {type(value).__name__}")
        return value

    def get(self, key: str, kind: type[T], default: T) -> T:
        value = self._value(key, (kind,))
        return default if value is None else cast(T, value)

    def number(self, key: str, default: float) -> float:
        value = self._value(key, (int, float))
        return default if value is None else float(cast(float, value))

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def positive(self, key: str, default: int) -> int:
        value = self.get(key, int, default)
        if value <= 0:
            raise self.fail(key, f"must be positive, got {value}")
        return value

    def path(self, key: str, default: Path) -> Path:
        value = Path(self.get(key, str, str(default)))
        if not value.is_absolute():
            raise self.fail(key, f"must be an absolute path, got {str(value)!r}")
        return value

    def strings(self, key: str, default: list[str]) -> list[str]:
        value: list[Any] = self.get(key, list, default)
        if not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, "must be a list of non-empty strings")
        return [str(v) for v in value]

    def sub(self, key: str) -> _Reader:
        table: dict[str, Any] = self.get(key, dict, {})
        return _Reader(self.source, f"{self.prefix}{key}.", table)

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.fail(unknown[0], "unknown key")


def _default_network(table: _Reader, defaults: DefaultNetworkSettings) -> DefaultNetworkSettings:
    """`[cni.default]`: on or off, a Linux interface name, an IPv4 subnet with room for pods, masquerade on or off."""
    bridge = table.get("bridge", str, defaults.bridge)
    if not 0 < len(bridge.encode()) < 16 or any(c in bridge for c in "/: \t\n") or bridge in (".", ".."):
        reason = f"must be a network interface name (1-15 bytes, no '/', ':' or spaces), got {bridge!r}"
        raise table.fail("bridge", reason)
    subnet = table.get("subnet", str, defaults.subnet)
    try:
        network = ipaddress.IPv4Network(subnet)
    except ValueError as e:
        raise table.fail("subnet", f"must be an IPv4 network like 10.157.0.0/24: {e}") from None
    if network.prefixlen > 29:
        raise table.fail("subnet", f"must be /29 or larger (room for a gateway and pods), got {subnet}")
    settings = DefaultNetworkSettings(
        enabled=table.get("enabled", bool, defaults.enabled),
        bridge=bridge,
        subnet=str(network),
        masquerade=table.get("masquerade", bool, defaults.masquerade),
    )
    table.done()
    return settings


def parse_config(data: dict[str, Any], source: str = "<string>") -> Config:
    """Build a Config from parsed TOML, failing on the first bad key with its name and the reason."""
    defaults = Config()
    top = _Reader(source, "", data)
    trust = top.choice("default_workload_trust", TRUST_LEVELS, defaults.default_workload_trust)
    socket = top.path("socket", defaults.socket)
    state_dir = top.path("state_dir", defaults.state_dir)
    runtime_dir = top.path("runtime_dir", defaults.runtime_dir)
    log_level = top.choice("log_level", LOG_LEVELS, defaults.log_level)

    runtimes = dict(defaults.runtimes)
    runtimes_table = top.sub("runtimes")
    for name in list(runtimes_table.table):
        entry = runtimes_table.sub(name)
        backend = entry.choice("backend", BACKENDS, "")
        options = {k: v for k, v in entry.table.items() if k != "backend"}
        runtimes[name] = RuntimeHandler(name=name, backend=backend, options=options)
    runtimes_table.done()

    reg = top.sub("registry")
    mirrors_table = reg.sub("mirrors")
    mirrors = {host: mirrors_table.strings(host, []) for host in list(mirrors_table.table)}
    mirrors_table.done()
    registry = RegistrySettings(
        insecure=reg.strings("insecure", []),
        mirrors=mirrors,
        timeout=reg.number("timeout_seconds", defaults.registry.timeout),
    )
    reg.done()

    img = top.sub("images")
    images = ImageSettings(
        allow_device_nodes=img.get("allow_device_nodes", bool, defaults.images.allow_device_nodes),
        max_layers=img.positive("max_layers", defaults.images.max_layers),
        max_layer_bytes=img.positive("max_layer_bytes", defaults.images.max_layer_bytes),
        max_layer_entries=img.positive("max_layer_entries", defaults.images.max_layer_entries),
        parallel_downloads=img.positive("parallel_downloads", defaults.images.parallel_downloads),
    )
    img.done()

    cni_table = top.sub("cni")
    cni = CniSettings(
        conf_dir=cni_table.path("conf_dir", defaults.cni.conf_dir),
        bin_dirs=tuple(Path(p) for p in cni_table.strings("bin_dirs", [str(p) for p in defaults.cni.bin_dirs])),
        default=_default_network(cni_table.sub("default"), defaults.cni.default),
    )
    cni_table.done()

    stream_table = top.sub("streaming")
    address = stream_table.get("address", str, defaults.streaming.address)
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise stream_table.fail("address", f"must be an IP address, got {address!r}") from None
    port = stream_table.get("port", int, defaults.streaming.port)
    if not 0 <= port <= 65535:
        raise stream_table.fail("port", f"must be 0 (any free port) to 65535, got {port}")
    streaming = StreamingSettings(
        address=address,
        port=port,
        token_ttl_seconds=stream_table.positive("token_ttl_seconds", defaults.streaming.token_ttl_seconds),
    )
    stream_table.done()

    vm_table = top.sub("vm")
    vm = VmSettings(
        accel=vm_table.choice("accel", ACCELS, defaults.vm.accel),
        default_vcpus=vm_table.positive("default_vcpus", defaults.vm.default_vcpus),
        default_memory_mib=vm_table.positive("default_memory_mib", defaults.vm.default_memory_mib),
        boot_timeout_seconds=vm_table.number("boot_timeout_seconds", defaults.vm.boot_timeout_seconds),
        qemu=vm_table.path("qemu", defaults.vm.qemu),
        virtiofsd=vm_table.path("virtiofsd", defaults.vm.virtiofsd),
        max_vcpus=vm_table.positive("max_vcpus", 1) if "max_vcpus" in vm_table.table else None,
        max_memory_mib=vm_table.positive("max_memory_mib", 1) if "max_memory_mib" in vm_table.table else None,
        jail=vm_table.get("jail", bool, defaults.vm.jail),
        jail_uid_first=vm_table.positive("jail_uid_first", defaults.vm.jail_uid_first),
        jail_uid_count=vm_table.positive("jail_uid_count", defaults.vm.jail_uid_count),
    )
    for key, cap, default in (
        ("max_vcpus", vm.max_vcpus, vm.default_vcpus),
        ("max_memory_mib", vm.max_memory_mib, vm.default_memory_mib),
    ):
        if cap is not None and cap < default:
            raise vm_table.fail(key, f"must be at least default_{key[4:]} ({default}), got {cap}")
    if vm.jail_uid_first + vm.jail_uid_count > 2**31:
        end = vm.jail_uid_first + vm.jail_uid_count
        raise vm_table.fail("jail_uid_count", f"the range must end at or below 2**31 (2147483648), it ends at {end}")
    if vm.default_memory_mib < 128:
        memory = vm.default_memory_mib
        raise vm_table.fail("default_memory_mib", f"must be at least 128 (the guest kernel's own share), got {memory}")
    if vm.boot_timeout_seconds <= 0:
        raise vm_table.fail("boot_timeout_seconds", f"must be positive, got {vm.boot_timeout_seconds:g}")
    vm_table.done()

    policy_table = top.sub("policy")
    policy = PolicySettings(
        host_pods_on_untrusted_node=policy_table.choice(
            "host_pods_on_untrusted_node", HOST_POD_POLICIES, defaults.policy.host_pods_on_untrusted_node
        )
    )
    policy_table.done()
    top.done()
    return Config(
        default_workload_trust=trust,
        socket=socket,
        state_dir=state_dir,
        runtime_dir=runtime_dir,
        log_level=log_level,
        runtimes=runtimes,
        registry=registry,
        images=images,
        cni=cni,
        vm=vm,
        streaming=streaming,
        policy=policy,
        source=source,
    )


def load_config(path: Path | None) -> Config:
    """Read the config file; with no path, the default file if it exists, else the embedded defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"config {path}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path}: not valid TOML: {e}") from None
    return parse_config(data, str(path))
